"""The `openai` backend against a real OpenAI-compatible server process: llama.cpp's server
(`featurescope llm-serve`, over the GGUF of the built-in model), which answers chat completions
with token usage and log-probabilities. An endpoint without log-probabilities is refused at once;
the retry policy is checked on an httpx transport that answers 429 / 5xx as told."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from explain_world import SAE_SOURCE, copy_db, explanations, harvest_db, query

from app.cli import main
from app.commands.llm_serve import served_name
from workers.explain import remote
from workers.explain.explainers import clean, shown
from workers.explain.local import LocalLM
from workers.explain.remote import EndpointError, OpenAIChat
from workers.loading import default_gguf, prepare_default_model

SHARED_CACHE = Path(__file__).resolve().parents[1] / "data" / "cache"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def harvested(tmp_path_factory, tiny_llama_dir):
    return harvest_db(tiny_llama_dir, tmp_path_factory.mktemp("openai"))


@pytest.fixture(scope="module")
def llama_cpp():
    """`featurescope llm-serve` (llama.cpp's server over the built-in model's GGUF) on a free
    port: (base URL, the model name it serves)."""
    port = free_port()
    cli = Path(sys.executable).with_name("featurescope")
    proc = subprocess.Popen([str(cli), "llm-serve", "--port", str(port), "--threads", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = proc.stdout.readline()
        assert f"127.0.0.1:{port}/v1" in line, line + proc.stdout.read()[-2000:]
        url = f"http://127.0.0.1:{port}"
        assert httpx.get(f"{url}/health", timeout=10).status_code == 200
        yield f"{url}/v1", served_name(default_gguf())
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def local_lm():
    return LocalLM(str(prepare_default_model(SHARED_CACHE)))


def test_openai_explainer_against_llama_cpp(llama_cpp, local_lm, harvested, tmp_path, capsys):
    base_url, name = llama_cpp
    db = copy_db(harvested.db, tmp_path)
    assert main(["explain", "--model", harvested.model, "--source", SAE_SOURCE,
                 "--features", "0-11", "--explainer", "openai", "--base-url", base_url,
                 "--explainer-model", name, "--db", f"sqlite:///{db}", "-q"]) == 0, \
        capsys.readouterr().err
    rows = explanations(db)
    fired = [f for f in range(12)
             if bool((harvested.states[SAE_SOURCE].top.score[:, f] > float("-inf")).any())]
    assert [r[1] for r in rows] == fired and len(fired) >= 3
    assert {r[3:] for r in rows} == {("openai", name, "explain-v1")}
    assert all(r[2] == clean(r[2]) and r[2] for r in rows)
    # the server's usage counts the prompt the explainer built: the same chat template and
    # excerpts, tokenized in-process, plus the answer
    from sqlalchemy.orm import Session

    from app.db import queries
    from app.db.engine import make_engine
    from workers.explain.examples import feature_examples, source
    from workers.explain.prompts import excerpts, prompt

    eng = make_engine(f"sqlite:///{db}")
    with Session(eng) as session:
        src = source(session, harvested.model, SAE_SOURCE)
        exs = [feature_examples(session, queries.VocabCache(), src, f) for f in fired]
    eng.dispose()
    used = [u for u, in query(db, "SELECT tokens_used FROM explanations ORDER BY feature_idx")]
    for ex, u in zip(exs, used, strict=True):
        n_prompt = len(local_lm._ids(prompt("explain-v1").messages(
            examples=excerpts(shown(ex, 8)))))
        assert n_prompt < u <= n_prompt + 1 + 24  # at most max_new_tokens (+ its end token)


def test_openai_scorers_read_llama_cpp_logprobs(llama_cpp, local_lm, harvested, tmp_path,
                                                 capsys):
    """Detection and fuzzing on the server: every explanation scored beside its control, and
    the server's P(yes) (from top_logprobs) is the in-process model's P(yes) (from its logits)
    for the same prompts, up to the 4-bit kernels of llama.cpp."""
    import numpy as np

    base_url, name = llama_cpp
    db = copy_db(harvested.db, tmp_path)
    assert main(["explain", "--model", harvested.model, "--source", SAE_SOURCE,
                 "--features", "0-7", "--scorer", "detection,fuzzing", "--base-url", base_url,
                 "--scorer-model", name, "--score-examples", "3", "--db", f"sqlite:///{db}",
                 "-q"]) == 0, capsys.readouterr().err
    scores = query(db, "SELECT e.feature_idx, s.scorer, s.scorer_model, s.value, s.control "
                   "FROM explanation_scores s JOIN explanations e ON e.id = s.explanation_id "
                   "ORDER BY e.feature_idx, s.scorer")
    fired = [f for f in range(8)
             if bool((harvested.states[SAE_SOURCE].top.score[:, f] > float("-inf")).any())]
    assert len(fired) >= 3  # features that never fired have no examples to score
    assert [s[:2] for s in scores] == [(f, s) for f in fired for s in ("detection", "fuzzing")]
    assert {s[1:3] for s in scores} == {("detection", name), ("fuzzing", name)}
    assert all(0 <= v <= 1 and 0 <= c <= 1 for *_, v, c in scores)

    from workers.explain.prompts import prompt

    texts = ["'def area(r):\\n    return 3.14 * r * r'", "'The cat sat on the mat.'",
             "'import os, sys'", "'In 1999 the city had 40,000 people'"]
    msgs = [prompt(v).messages(explanation=e, text=t)
            for v in ("detection-v1", "fuzzing-v1")
            for e in ("python function definitions", "years and numbers") for t in texts]
    remote = np.array(OpenAIChat(base_url, name).p_yes(msgs))
    local = np.array(local_lm.p_yes(msgs))
    # llama.cpp's answers vary by a few hundredths with how requests are batched together
    assert np.abs(remote - local).max() < 0.1, (remote, local)
    assert np.abs(remote - local).mean() < 0.05, (remote, local)


def test_scorers_refuse_an_endpoint_without_logprobs(harvested, tmp_path, capsys,
                                                     monkeypatch):
    """An endpoint that answers chat completions without logprobs is refused at once by the
    command, before anything is written."""
    def handle(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"choices": [{"message": {"content": "Yes"}}]})

    client = httpx.Client
    monkeypatch.setattr(remote.httpx, "Client", lambda **kw: client(
        **{**kw, "transport": httpx.MockTransport(handle)}))
    db = copy_db(harvested.db, tmp_path)
    assert main(["explain", "--model", harvested.model, "--source", SAE_SOURCE,
                 "--features", "0-3", "--scorer", "detection", "--base-url",
                 "http://no-logprobs.invalid/v1", "--scorer-model", "m", "--db",
                 f"sqlite:///{db}", "-q"]) == 2
    err = capsys.readouterr().err
    assert "returned no logprobs" in err and err.count("\n") == 1
    assert explanations(db) == []  # refused before anything was written


def answering(codes: list[int], calls: list):
    """An httpx transport answering each request with the next status of `codes` (the last one
    again once they run out); a 200 carries a chat completion."""
    def handle(request: httpx.Request) -> httpx.Response:
        code = codes[min(len(calls), len(codes) - 1)]
        calls.append(request)
        if code != 200:
            return httpx.Response(code, text="busy")
        return httpx.Response(200, json={
            "choices": [{"message": {"content": "closing brackets"}}],
            "usage": {"total_tokens": 77}})
    return httpx.MockTransport(handle)


@pytest.mark.parametrize("codes, n_calls, ok", [
    ([429, 503, 200], 3, True),  # retried with backoff until it answers
    ([400], 1, False),  # a client error is not retried
    ([500], 4, False),  # server errors are retried, then reported
])
def test_retries_on_429_and_5xx_only(codes, n_calls, ok, monkeypatch):
    monkeypatch.setenv("FEATURESCOPE_LLM_API_KEY", "sk-test")
    calls: list = []
    chat = OpenAIChat("http://llm.invalid/v1", "m", retries=3, backoff_s=0,
                      transport=answering(codes, calls))
    if ok:
        assert chat.chat([[{"role": "user", "content": "hi"}]]) == [("closing brackets", 77)]
    else:
        with pytest.raises(EndpointError, match=str(codes[-1])):
            chat.chat([[{"role": "user", "content": "hi"}]])
    assert len(calls) == n_calls
    assert all(c.headers["authorization"] == "Bearer sk-test" for c in calls)
    assert all(c.url == "http://llm.invalid/v1/chat/completions" for c in calls)


def test_p_yes_from_top_logprobs():
    """P(yes) / (P(yes) + P(no)) over the spellings of the first token's top_logprobs, 0.5
    where neither word is among them."""
    import math

    tops = [[("Yes", 0.5), (" yes", 0.1), (" no", 0.2), ("maybe", 0.1)], [("maybe", 0.9)]]

    def handle(request: httpx.Request) -> httpx.Response:
        body = request.read().decode()
        top = tops[0] if "first" in body else tops[1]
        return httpx.Response(200, json={"choices": [{"message": {"content": top[0][0]},
                                                      "logprobs": {"content": [{
                                                          "token": top[0][0],
                                                          "top_logprobs": [
                                                              {"token": t, "logprob": math.log(p)}
                                                              for t, p in top]}]}}]})

    chat = OpenAIChat("http://llm.invalid/v1", "m", transport=httpx.MockTransport(handle))
    got = chat.p_yes([[{"role": "user", "content": "first"}],
                      [{"role": "user", "content": "second"}]])
    assert got == pytest.approx([0.6 / 0.8, 0.5])


def test_llm_serve_refuses_what_it_cannot_serve(tmp_path, capsys):
    assert main(["llm-serve", "--gguf", str(tmp_path / "missing.gguf")]) == 2
    assert "no .gguf file at" in capsys.readouterr().err
    assert main(["llm-serve", "--port", "70000"]) == 2
    assert "--port expects 1-65535" in capsys.readouterr().err
    for flag in ("--threads", "--parallel", "--ctx"):
        assert main(["llm-serve", flag, "0"]) == 2
        assert f"{flag} expects a positive integer, got 0" in capsys.readouterr().err
