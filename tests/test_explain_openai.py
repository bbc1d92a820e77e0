"""The `openai` backend against a real OpenAI-compatible server process: `transformers serve`
over the default model's local files. It answers chat completions with token usage but gives
no log-probabilities, so the detection and fuzzing scorers are refused there, at once. The
retry policy is checked on an httpx transport that answers 429 / 5xx as told."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from explain_world import SAE_SOURCE, copy_db, explanations, harvest_db, query

from app.cli import main
from workers.explain.explainers import clean, shown
from workers.explain.local import LocalLM
from workers.explain.remote import EndpointError, OpenAIChat
from workers.loading import prepare_default_model

SHARED_CACHE = Path(__file__).resolve().parents[1] / "data" / "cache"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    """`transformers serve` on a free port with the default model's safetensors folder."""
    folder = str(prepare_default_model(SHARED_CACHE))
    port = free_port()
    serve = Path(sys.executable).with_name("transformers")
    proc = subprocess.Popen([str(serve), "serve", "--host", "127.0.0.1", "--port", str(port),
                             folder], env={**os.environ, "HF_HUB_OFFLINE": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    try:
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
            assert time.monotonic() < deadline, "transformers serve did not come up"
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        yield f"{url}/v1", folder
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def harvested(tmp_path_factory, tiny_llama_dir):
    return harvest_db(tiny_llama_dir, tmp_path_factory.mktemp("openai"))


def test_openai_explainer_against_transformers_serve(server, harvested, tmp_path, capsys):
    base_url, folder = server
    db = copy_db(harvested.db, tmp_path)
    assert main(["explain", "--model", harvested.model, "--source", SAE_SOURCE,
                 "--features", "0-11", "--explainer", "openai",
                 "--base-url", base_url, "--explainer-model", folder, "--db",
                 f"sqlite:///{db}", "-q"]) == 0, capsys.readouterr().err
    rows = explanations(db)
    fired = [f for f in range(12)
             if bool((harvested.states[SAE_SOURCE].top.score[:, f] > float("-inf")).any())]
    assert [r[1] for r in rows] == fired and len(fired) >= 3
    assert {r[3:] for r in rows} == {("openai", folder, "explain-v1")}
    # the server's usage: at least the prompt's tokens, per explanation
    assert all(u > 50 for u, in query(db, "SELECT tokens_used FROM explanations"))
    # the server's greedy answer is the in-process model's, unpadded, for the same prompt
    from sqlalchemy.orm import Session

    from app.db import queries
    from app.db.engine import make_engine
    from workers.explain.examples import feature_examples, source
    from workers.explain.prompts import excerpts, prompt

    eng = make_engine(f"sqlite:///{db}")
    with Session(eng) as session:
        ex = feature_examples(session, queries.VocabCache(),
                              source(session, harvested.model, SAE_SOURCE), fired[0])
    eng.dispose()
    lm = LocalLM(folder)
    (answer, _), = lm.chat([prompt("explain-v1").messages(examples=excerpts(shown(ex, 8)))])
    assert rows[0][2] == clean(answer)


def test_scorers_refuse_an_endpoint_without_logprobs(server, harvested, tmp_path, capsys):
    base_url, folder = server
    db = copy_db(harvested.db, tmp_path)
    assert main(["explain", "--model", harvested.model, "--source", SAE_SOURCE,
                 "--features", "0-3", "--scorer", "detection", "--base-url", base_url,
                 "--scorer-model", folder, "--db", f"sqlite:///{db}", "-q"]) == 2
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
