"""Explanations: how far each explainer x scorer pair's scores beat their controls, and how
fast the local backend explains and scores on this machine, from one run:

    .venv/bin/python bench/explain.py [--db URL --model M --source S] [--features 100]
        [--explainers tokens,local] [--scorers detection,fuzzing,simulation]
        [--score-examples 5] [--search-explanations 100000]
        [--base-url http://127.0.0.1:8081/v1 --remote-model SmolLM2-135M-Instruct.Q4_1]
        [--device auto]

Without --db it first harvests the default model's neurons of --layer over --max-tokens
tokens of pydoc into a temporary SQLite file. Each explainer explains the first --features
features that fire, each scorer (the local backend; detection and fuzzing at --base-url when
given) scores every explanation and its control (another feature's explanation by the same
explainer, on the same examples); the table gives, per pair, the mean score, the mean control
and the verdict of `app.explanations.judge` (the one the pages show: informative only where
the mean difference beats two standard errors).
Explained/min and scored/min count features, timed around the explainer's and each scorer's
calls alone. Last, bench/explain_search.py runs over --search-explanations explanations
(0 leaves it out) and its figures are printed as they come.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sqlalchemy import text  # noqa: E402

from app.cli import main as cli  # noqa: E402
from app.config import DEFAULT_MODEL, Settings  # noqa: E402
from app.db.engine import make_engine  # noqa: E402
from app.explanations import judge  # noqa: E402
from workers.explain.backends import make_explainer, make_scorers  # noqa: E402
from workers.explain.run import ExplainRun  # noqa: E402
from workers.loading import resolve_device  # noqa: E402


class Timed:
    """Wraps an explainer or scorer: the seconds and features of its calls."""

    def __init__(self, inner, method: str):
        self.inner, self.method, self.seconds, self.features = inner, method, 0.0, 0
        self.name, self.model = inner.name, inner.model
        self.prompt_version = getattr(inner, "prompt_version", "")

    def _call(self, batch):
        t = time.perf_counter()
        out = getattr(self.inner, self.method)(batch)
        self.seconds += time.perf_counter() - t
        self.features += len(batch)
        return out

    def explain(self, batch):
        return self._call(batch)

    def score(self, items):
        return self._call(items)


def harvest(url: str, layer: int, max_tokens: int) -> str:
    code = cli(["harvest", "--layers", str(layer), "--dataset", "pydoc", "--max-tokens",
                str(max_tokens), "--seq-len", "64", "--db", url, "-q"])
    if code:
        raise SystemExit(f"harvest failed ({code})")
    return f"{layer}-mlp"


def firing(url: str, model: str, source: str, n: int) -> str:
    """The first n features of the source that fire, as a --features list."""
    eng = make_engine(url)
    with eng.connect() as conn:
        rows = conn.execute(text(
            "SELECT f.idx FROM features f JOIN sources s ON s.id = f.source_id JOIN models m "
            "ON m.id = s.model_id WHERE m.slug = :m AND s.slug = :s AND f.n_active > 0 "
            "ORDER BY f.idx LIMIT :n"), {"m": model, "s": source, "n": n}).scalars().all()
    eng.dispose()
    return ",".join(map(str, rows))


def pairs(url: str, explainer: str, scorer: str) -> list[tuple[float, float]]:
    eng = make_engine(url)
    with eng.connect() as conn:
        rows = conn.execute(text(
            "SELECT s.value, s.control FROM explanation_scores s JOIN explanations e "
            "ON e.id = s.explanation_id WHERE e.explainer = :e AND s.scorer = :s "
            "AND s.control IS NOT NULL"), {"e": explainer, "s": scorer}).all()
    eng.dispose()
    return [(v, c) for v, c in rows]


def verdict(url: str, explainer: str, s: Timed) -> None:
    """One line of the table: the pair's mean score, mean control and judgement."""
    vc = pairs(url, explainer, s.name)
    j = judge(s.name, s.model, n=len(vc), sum_value=sum(v for v, _ in vc),
              sum_control=sum(c for _, c in vc), sum_diff=sum(v - c for v, c in vc),
              sum_diff2=sum((v - c) ** 2 for v, c in vc))
    mean = sum(v for v, _ in vc) / max(len(vc), 1)
    ctrl = sum(c for _, c in vc) / max(len(vc), 1)
    print(f"{explainer:<10}{s.name:<12}{mean:>8.3f}{ctrl:>9.3f}{len(vc):>7}  {j.verdict}",
          flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--db", default=None, help="a harvested database (copied, not written)")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--source", default=None)
    p.add_argument("--layer", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=8192)
    p.add_argument("--features", type=int, default=100)
    p.add_argument("--explainers", default="tokens,local")
    p.add_argument("--scorers", default="detection,fuzzing,simulation")
    p.add_argument("--score-examples", type=int, default=5)
    p.add_argument("--search-explanations", type=int, default=100_000)
    p.add_argument("--base-url", default=None,
                   help="an OpenAI-compatible endpoint (e.g. featurescope llm-serve): the openai "
                   "explainer, and detection and fuzzing, run there; simulation stays local")
    p.add_argument("--remote-model", default=None, help="the model name the endpoint serves")
    p.add_argument("--device", default="auto", help="where the local backend runs")
    args = p.parse_args()
    device = resolve_device(args.device)
    settings = Settings()
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "bench.db"
        url = f"sqlite:///{db}"
        if args.db:
            shutil.copyfile(make_engine(args.db).url.database, db)
            source = args.source
        else:
            t = time.perf_counter()
            source = harvest(url, args.layer, args.max_tokens)
            print(f"harvested {args.model}/{source} over {args.max_tokens} tokens in "
                  f"{time.perf_counter() - t:.0f} s")
        features = firing(url, args.model, source, args.features)
        n = len(features.split(","))
        scorer_names = [s for s in args.scorers.split(",") if s]
        print(f"{'explainer':<10}{'scorer':<12}{'mean':>8}{'control':>9}{'pairs':>7}  verdict")
        remote = [s for s in scorer_names if args.base_url and s != "simulation"]
        local = [s for s in scorer_names if s not in remote]
        for name in args.explainers.split(","):
            on_endpoint = dict(model=args.remote_model, base_url=args.base_url)
            explainer = Timed(make_explainer(name, cache_dir=settings.cache_dir, device=device,
                                             **(on_endpoint if name == "openai" else {})),
                              "explain")
            scorers = [Timed(s, "score") for s in make_scorers(
                remote, cache_dir=settings.cache_dir, n_examples=args.score_examples,
                **on_endpoint) + make_scorers(local, cache_dir=settings.cache_dir,
                                              n_examples=args.score_examples, device=device)]
            ExplainRun(db_url=url, model=args.model, source=source, explainer=explainer,
                       scorers=scorers, features=features, progress_bar=False,
                       embed=False).run()
            for s in scorers:
                verdict(url, explainer.name, s)
            for t in [explainer, *scorers]:
                if t.model and t.features:
                    what = "explained" if t is explainer else f"scored ({t.name})"
                    print(f"{explainer.name:<10}{what:<22}{t.features / t.seconds * 60:8.1f} "
                          f"features/min  ({t.features} in {t.seconds:.0f} s, {t.model})",
                          flush=True)
        load = " ".join(f"{x:.1f}" for x in os.getloadavg())
        print(f"\n{n} features of {args.model}/{source}, {args.score_examples} activating "
              f"(+ as many other) examples per scorer, local backend on {device}, "
              f"{os.cpu_count()} CPUs, load {load}")
    if args.search_explanations:
        print(flush=True)
        subprocess.run([sys.executable, str(ROOT / "bench" / "explain_search.py"),
                        "--explanations", str(args.search_explanations)], check=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
