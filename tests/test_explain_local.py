"""The `local` backend end to end with the real default model (SmolLM2-135M-Instruct): a few
features of a tiny harvest explained and scored by the CLI, and the stored scores against an
unbatched, unpadded recomputation of every P(yes) and expected activation."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from explain_world import SAE_SOURCE, copy_db, explanations, harvest_db, query
from sqlalchemy import create_engine
from sqlalchemy.orm import Session

from app.cli import main
from app.db import queries
from workers.explain.examples import feature_examples, source
from workers.explain.local import NO, YES, LocalLM
from workers.explain.metrics import auroc, correlation
from workers.explain.prompts import prompt
from workers.explain.scorers import Detection, Simulation

SHARED_CACHE = Path(__file__).resolve().parents[1] / "data" / "cache"


def chosen(h) -> list[int]:
    """The first three SAE features with at least two top and two non-activating examples."""
    st = h.states[SAE_SOURCE]
    ok = (torch.isfinite(st.top.score).sum(0) >= 2) & (torch.isfinite(st.zero.score).sum(0) >= 2)
    return ok.nonzero().squeeze(1).tolist()[:3]


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_llama_dir):
    """The CLI's local explainer and all three scorers over 4 features of a tiny harvest."""
    folder = tmp_path_factory.mktemp("local")
    h = harvest_db(tiny_llama_dir, folder)
    db = copy_db(h.db, folder / "run")
    features = chosen(h)
    assert len(features) == 3
    mp = pytest.MonkeyPatch()
    mp.setenv("FEATURESCOPE_DATA_DIR", str(folder / "data"))
    mp.setenv("FEATURESCOPE_CACHE", str(SHARED_CACHE))
    try:
        assert main(["explain", "--model", h.model, "--source", SAE_SOURCE,
                     "--features", ",".join(map(str, features)),
                     "--explainer", "local", "--scorer", "detection,fuzzing,simulation",
                     "--score-examples", "2", "--db", f"sqlite:///{db}", "-q"]) == 0
    finally:
        mp.undo()
    return h, db, features


@pytest.fixture(scope="module")
def lm():
    return LocalLM(cache_dir=SHARED_CACHE)


def scores(db: Path) -> list[tuple]:
    return query(db, "SELECT e.feature_idx, e.text, s.scorer, s.scorer_model, s.value, "
                 "s.control, s.details FROM explanation_scores s JOIN explanations e "
                 "ON e.id = s.explanation_id ORDER BY e.feature_idx, s.scorer")


def test_local_explanations_are_stored_with_their_model_and_prompt(run):
    h, db, features = run
    rows = explanations(db)
    assert [r[1] for r in rows] == features
    assert {r[3:] for r in rows} == {("local", "smollm2-135m-instruct", "explain-v1")}
    assert all(r[2] and len(r[2]) <= 200 and "\n" not in r[2] for r in rows)
    used = query(db, "SELECT tokens_used FROM explanations")
    assert all(u > 50 for u, in used)  # the prompt alone is longer than that


def test_each_scorer_scored_each_feature_beside_a_control(run):
    _, db, features = run
    rows = scores(db)
    assert [(r[0], r[2]) for r in rows] == [
        (f, s) for f in features for s in ("detection", "fuzzing", "simulation")]
    for _, _, scorer, model, value, control, details in rows:
        assert model == "smollm2-135m-instruct"
        assert control is not None
        lo = -1 if scorer == "simulation" else 0
        assert lo <= value <= 1 and lo <= control <= 1
        details = json.loads(details)
        assert details["prompt_version"] == f"{scorer}-v1"
        if scorer != "fuzzing":  # the SAE's features have non-activating examples
            assert details["negatives"] == "zero"
            assert details.get("n_negative", 2) == 2


def p_yes_alone(lm: LocalLM, messages) -> float:
    """P(yes) / (P(yes) + P(no)) from one unpadded forward pass of one prompt."""
    ids = lm.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = torch.tensor([lm.tok(ids, add_special_tokens=False)["input_ids"]])
    with torch.inference_mode():
        lp = lm.model(input_ids=ids).logits[0, -1].float().log_softmax(-1)
    first = [lm.tok(w, add_special_tokens=False)["input_ids"][0] for w in YES + NO]
    yes, no = lp[first[:len(YES)]].logsumexp(0), lp[first[len(YES):]].logsumexp(0)
    return float(yes.exp() / (yes.exp() + no.exp()))


def test_detection_score_equals_an_unbatched_recomputation(run, lm):
    h, db, features = run
    f = features[-1]
    eng = create_engine(f"sqlite:///{db}")
    with Session(eng) as session:
        src = source(session, h.model, SAE_SOURCE)
        ex = feature_examples(session, queries.VocabCache(), src, f)
    eng.dispose()
    (_, expl, _, _, value, _, details), = [r for r in scores(db)
                                           if r[0] == f and r[2] == "detection"]
    details = json.loads(details)
    texts, labels, _ = Detection(lm, n_examples=2).items(ex, random.Random(f))
    p = prompt("detection-v1")
    alone = [p_yes_alone(lm, p.messages(explanation=expl, text=t)) for t in texts]
    assert value == pytest.approx(auroc(alone, labels), abs=1e-6)
    assert details["balanced_accuracy"] == pytest.approx(
        (np.mean([a > 0.5 for a, y in zip(alone, labels, strict=True) if y])
         + np.mean([a <= 0.5 for a, y in zip(alone, labels, strict=True) if not y])) / 2)


def test_simulation_expectations_equal_an_unbatched_pass(run, lm):
    h, db, features = run
    eng = create_engine(f"sqlite:///{db}")
    with Session(eng) as session:
        ex = feature_examples(session, queries.VocabCache(), source(session, h.model, SAE_SOURCE),
                              features[0])
    eng.dispose()
    sim = Simulation(lm, n_examples=2)
    windows = ex.top[:3]
    batched = sim.expected("commas in code", windows)
    for w, got in zip(windows, batched, strict=True):
        ids, positions = sim._sequence("commas in code", w)
        with torch.inference_mode():
            lp = lm.model(input_ids=torch.tensor([ids])).logits[0].float().log_softmax(-1)
        probs = lp[positions][:, sim.digits].softmax(-1).numpy()
        np.testing.assert_allclose(got, probs @ np.arange(10), atol=1e-4)
        assert len(got) == len(w.tokens)
    value = correlation(np.concatenate(batched), np.concatenate([w.acts for w in windows]))
    assert value is None or -1 <= value <= 1
