"""Explanation search latency, from one run:

    .venv/bin/python bench/explain_search.py [--explanations 100000] [--queries 300]

Writes N explanations of N features of one source into a fresh SQLite file, made of phrases of
the kind explainers write ("closing parenthesis of a function call", ...) so that common words
match thousands of them, and stores their embeddings (the `embed` extra). Then runs the queries
through the search the server runs (`app.explanation_search.search`: full text and meaning,
fused by reciprocal rank) and prints p50/p99 per query, wall and CPU time, with the machine's
load average: hybrid, text-only (the embedding model left out), and the JSON page `/search/explanations.json` in-process (the search, the rows of its
results and the answer). The first search, which loads the embedding model and reads every
stored vector into memory, is timed apart. Last, how much of the exact top 20 by meaning the
two-pass search (leading dimensions first) finds, over N phrases cut from Python's
documentation. All figures come from this one run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

from sqlalchemy import insert
from sqlalchemy.orm import Session

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app import embedding  # noqa: E402
from app.config import Settings  # noqa: E402
from app.db.bulk import bulk_insert  # noqa: E402
from app.db.engine import make_engine, upgrade  # noqa: E402
from app.db.tables import Dataset, Explanation, Feature, Model, Source  # noqa: E402
from app.explanation_search import SearchIndex, search  # noqa: E402

SUBJECTS = ["closing parenthesis", "opening bracket", "function definitions", "python keywords",
            "female names", "male names", "city names", "numbers", "digits", "dates", "years",
            "plural nouns", "verbs in the past tense", "adjectives", "html tags", "url paths",
            "indentation", "newlines", "commas", "full stops", "quotation marks",
            "the word the", "articles", "pronouns", "capital letters", "code comments",
            "variable names", "string literals", "error messages", "import statements",
            "mathematical operators", "equals signs", "colons", "list items", "dictionary keys",
            "weather words", "emotions", "family members", "colours", "animals", "food",
            "legal language", "medical terms", "sports", "music", "money amounts", "negation",
            "questions", "exclamations", "spaces before punctuation"]
CONTEXTS = ["", "in code", "at the end of a line", "after a comma", "in a list",
            "inside a function call", "at the start of a sentence", "in documentation",
            "in English prose", "in dialogue", "before a newline", "in a table",
            "in Python source", "in JSON", "in titles"]
FRAMES = ["{s} {c}", "the token after {s} {c}", "{s}, mostly {c}", "mentions of {s} {c}",
          "{s} and related words {c}"]


def texts(n: int, rng: random.Random) -> list[str]:
    return [" ".join(rng.choice(FRAMES).format(s=rng.choice(SUBJECTS),
                                               c=rng.choice(CONTEXTS)).split())
            for _ in range(n)]


def queries(n: int, rng: random.Random) -> list[str]:
    pool = (SUBJECTS + [f"{s} {c}" for s in SUBJECTS[:10] for c in CONTEXTS[1:6]]
            + ["python function definitions", "women called Mary", "end of line",
               "brackets that close a call", "zebra crossings", "tax law"])
    return [rng.choice(pool) for _ in range(n)]


def build(url: str, n: int, rng: random.Random) -> tuple[int, dict[str, float]]:
    engine = make_engine(url)
    upgrade(engine)
    when = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    took = {}
    with Session(engine) as session, session.begin():
        mid = session.execute(insert(Model).values(
            slug="m", hub_id="synthetic", arch="gpt2", n_layers=1, d_model=8, d_mlp=n,
            vocab_size=10, tokenizer_hash="t")).inserted_primary_key[0]
        did = session.execute(insert(Dataset).values(
            slug="d", name="d", source="synthetic", slice="all", n_sequences=1, seq_len=4,
            bos_policy="none", tokenizer_hash="t")).inserted_primary_key[0]
        sid = session.execute(insert(Source).values(
            model_id=mid, dataset_id=did, slug="0-mlp", kind="neurons", hook_name="h",
            layer=0, n_features=n, harvest_config={}, status="ready")).inserted_primary_key[0]
        bulk_insert(session, Feature.__table__, (
            "source_id", "idx", "max_act", "min_act", "mean_act", "std_act", "frac_active",
            "n_active", "n_tokens", "histogram", "top_logits", "bottom_logits", "top_tokens"),
            ((sid, i, rng.random() * 9, 0.0, 0.0, 0.0, 0.01, 1, 100, "[]", "[]", "[]", "[]")
             for i in range(n)))
        t = time.perf_counter()
        bulk_insert(session, Explanation.__table__, (
            "source_id", "feature_idx", "text", "explainer", "explainer_model",
            "prompt_version", "created_at"),
            ((sid, i, text, "tokens", "", "v1", when) for i, text in enumerate(texts(n, rng))))
    took["write explanations (FTS and version triggers)"] = time.perf_counter() - t
    if embedding.available() is None:
        t = time.perf_counter()
        embedding.store_missing_vectors(engine)
        took["embed and store vectors"] = time.perf_counter() - t
    engine.dispose()
    return sid, took


def percentiles(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, int(round(0.99 * (len(ordered) - 1))))]
    return statistics.median(ordered), p99


def timed(fns: dict, qs: list[str]) -> dict[str, tuple[list[float], list[float]]]:
    """(wall ms, CPU ms) of every query on every path, the paths taken in turn per query (so
    that no path gets the machine's quiet or busy spells to itself), after one pass unmeasured.
    CPU time is the process's, all threads: what the query cost, whatever else ran."""
    for fn in fns.values():
        for q in qs:
            fn(q)
    out = {name: ([], []) for name in fns}
    names = list(fns)
    for k, q in enumerate(qs):
        for name in names[k % len(names):] + names[:k % len(names)]:
            wall, cpu = time.perf_counter(), time.process_time()
            fns[name](q)
            out[name][0].append((time.perf_counter() - wall) * 1000)
            out[name][1].append((time.process_time() - cpu) * 1000)
    return out


def coarse_recall(n: int, n_queries: int, rng: random.Random) -> float:
    """The mean share of the exact top 20 by meaning that the two-pass search finds, over n
    phrases of Python's documentation and queries of the kind users type."""
    import re
    from pydoc_data.topics import topics

    import numpy as np

    from app.explanation_search import VectorIndex

    words = re.findall(r"[A-Za-z]+", " ".join(topics.values()))
    phrases = [" ".join(words[i:i + rng.randint(3, 9)])
               for i in (rng.randrange(len(words) - 10) for _ in range(n))]
    vectors = embedding.embed(phrases)
    ids, sources = np.arange(1, n + 1), np.zeros(n)
    two_pass = VectorIndex.of(ids, sources, vectors, exact_up_to=0)
    exact = VectorIndex.of(ids, sources, vectors, exact_up_to=n)
    found = []
    for q in embedding.embed(queries(n_queries, rng)):
        a = set(two_pass.nearest(q, source_ids=None, k=20)[0].tolist())
        b = set(exact.nearest(q, source_ids=None, k=20)[0].tolist())
        found.append(len(a & b) / 20)
    return float(np.mean(found))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--explanations", type=int, default=100_000)
    p.add_argument("--queries", type=int, default=300)
    args = p.parse_args()
    rng = random.Random(0)
    missing = embedding.available()
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{Path(tmp) / 'bench.db'}"
        _, took = build(url, args.explanations, rng)
        for what, s in took.items():
            print(f"{what}: {s:.1f} s for {args.explanations:,} explanations")
        engine = make_engine(url)
        qs = queries(args.queries, rng)
        hybrid, text_only = SearchIndex(), SearchIndex(use_embedder=False)
        from fastapi.testclient import TestClient

        from app.main import create_app

        app = create_app(Settings(database_url=url), engine=engine)
        with Session(engine) as session, TestClient(app) as client:
            t = time.perf_counter()
            first = search(session, hybrid, query="closing parenthesis", source_ids=None)
            print(f"first search (embedding model and {len(hybrid.vectors):,} vectors loaded): "
                  f"{(time.perf_counter() - t) * 1000:.0f} ms, mode {first.mode}")
            rows = timed({
                "hybrid": lambda q: search(session, hybrid, query=q, source_ids=None),
                "text-only": lambda q: search(session, text_only, query=q, source_ids=None),
                "JSON page": lambda q: json.loads(client.get(
                    "/search/explanations.json", params={"q": q}).content)}, qs)
        engine.dispose()
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"\n{args.queries} queries over {args.explanations:,} explanations on SQLite, "
          f"{os.cpu_count()} CPUs, load average {load}" + (f" ({missing})" if missing else ""))
    print(f"{'search':<12}{'wall p50':>10}{'wall p99':>10}{'CPU p50':>10}{'CPU p99':>10}  (ms)")
    for name, (wall, cpu) in rows.items():
        print(f"{name:<12}" + "".join(f"{v:>10.1f}" for v in (*percentiles(wall),
                                                                *percentiles(cpu))))
    h, t = percentiles(rows["hybrid"][0]), percentiles(rows["text-only"][0])
    print(f"hybrid / text-only wall: p50 {h[0] / t[0]:.2f}x, p99 {h[1] / t[1]:.2f}x")
    print(f"target p99 < 50 ms (hybrid, wall): {'met' if h[1] < 50 else 'NOT met'}")
    if missing is None:
        share = coarse_recall(args.explanations, args.queries, rng)
        print(f"two-pass meaning search found {share:.1%} of the exact top 20 "
              f"({args.explanations:,} phrases of Python's documentation, {args.queries} "
              "queries)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
