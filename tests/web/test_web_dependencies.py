"""The server installs with `[project].dependencies` alone: served with every other installed
distribution hidden, it answers every kind of page, and every third-party module it imported is
a declared dependency or one of theirs. Nothing of `workers` (torch, transformers, ...) is
imported."""

from __future__ import annotations

import importlib.metadata as md
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from support import free_port

ROOT = Path(__file__).resolve().parents[2]

# Runs in a fresh interpreter, as `featurescope serve` runs uvicorn. The modules loaded before its
# first line (site, .pth hooks) are set aside. Every installed distribution but the project's own
# and those of the declared closure is hidden as if it were not installed: an optional import of
# one falls back, a needed one fails. The pages are fetched over HTTP with the standard library
# only. It prints the HTTP statuses, what it hid, the top-level modules loaded since its first
# line, and the distributions of those that come from site-packages.
SERVER = r"""
import sys
before = set(sys.modules)
import importlib.metadata, json, re, site, threading, time, urllib.error, urllib.request
from pathlib import Path

db_url, port, requests, closure = sys.argv[1], int(sys.argv[2]), *map(json.loads, sys.argv[3:])
dists = importlib.metadata.packages_distributions()
def declared(top):
    return any(re.sub(r"[-_.]+", "-", d).lower() in closure for d in dists.get(top, []))
hidden = []
class Undeclared:
    def find_spec(self, name, path=None, target=None):
        if path is None and name in dists and not declared(name):
            hidden.append(name)
            raise ModuleNotFoundError(f"No module named {name!r}: not a declared dependency",
                                      name=name)
sys.meta_path.insert(0, Undeclared())

import uvicorn

from app.config import Settings
from app.db.engine import make_engine, upgrade
from app.main import create_app

engine = make_engine(db_url)
upgrade(engine)
app = create_app(Settings(database_url=db_url), engine=engine)
server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                       server_header=False))
thread = threading.Thread(target=server.run)
thread.start()
deadline = time.monotonic() + 30
while not server.started and thread.is_alive() and time.monotonic() < deadline:
    time.sleep(0.02)
statuses = []
for method, path, body in requests:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method,
                                 data=body and body.encode(),
                                 headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req) as r:
            r.read()
            statuses.append(r.status)
    except urllib.error.HTTPError as e:
        statuses.append(e.code)
server.should_exit = True
thread.join()
sites = [Path(p).resolve() for p in [*site.getsitepackages(), site.getusersitepackages()]]
def installed(mod):
    where = getattr(mod, "__file__", None) or next(iter(getattr(mod, "__path__", [])), None)
    return where is not None and any(Path(where).resolve().is_relative_to(s) for s in sites)
tops = sorted({m.split(".")[0] for m in set(sys.modules) - before} - {"__main__"})
print(json.dumps({"statuses": statuses, "hidden": sorted(set(hidden)), "modules": tops,
                  "third_party": {t: dists.get(t, []) for t in tops
                                  if installed(sys.modules[t])}}))
"""


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared_closure() -> set[str]:
    """The distributions `[project].dependencies` install: them and, recursively, what they
    require (with the extras asked for and the markers of this interpreter)."""
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    todo = [Requirement(d) for d in deps]
    done: set[tuple[str, frozenset[str]]] = set()
    while todo:
        req = todo.pop()
        key = (_norm(req.name), frozenset(req.extras))
        if key in done or (req.marker is not None and not req.marker.evaluate({"extra": ""})):
            continue
        done.add(key)
        try:
            requires = md.distribution(req.name).requires or []
        except md.PackageNotFoundError:
            continue  # not installed here, so nothing can have imported it
        for text in requires:
            sub = Requirement(text)
            if sub.marker is None or any(sub.marker.evaluate({"extra": e})
                                         for e in ("", *req.extras)):
                sub.marker = None
                todo.append(sub)
    return {name for name, _ in done}


def test_declared_closure_follows_requirements_and_extras():
    closure = declared_closure()
    assert {"fastapi", "starlette", "pydantic", "pydantic-core", "sqlalchemy", "alembic",
            "mako", "jinja2", "markupsafe", "uvicorn", "h11", "numpy", "psycopg"} <= closure
    assert "psycopg-binary" in closure  # through the extra of psycopg[binary]
    assert not {"torch", "transformers", "pyarrow", "ray", "pytest", "httpx"} & closure


def test_the_server_imports_only_declared_dependencies(web_db):
    m, gpt2 = web_db.llama, web_db.gpt2
    gets = [("/", 200), ("/.json", 200), (f"/{m}", 200), (f"/{m}.json", 200),
            (f"/{m}/1-mlp?sort=max_act", 200), (f"/{m}/1-res-sae-48.json", 200),
            (f"/{m}/1-mlp/3", 200), (f"/{m}/1-res-sae-48/7.json", 200),
            (f"/{gpt2}/0-mlp/5", 200), (f"/api/feature/{m}/1-mlp/3", 200),
            (f"/tokens?model={m}&token=the", 200), (f"/search?model={m}", 200),
            (f"/{m}/1-mlp/3/try?text=hello", 200), ("/docs", 200), ("/openapi.json", 200),
            ("/static/style.css", 200), (f"/{m}/no-such-source", 404),
            (f"/api/v1/random/{m}/1-mlp", 200), ("/search/explanations?q=the", 200),
            (f"/search/explanations.json?q=the&model={m}", 200)]
    posts = [("/api/v1/activations", json.dumps({"model": m, "source": "1-mlp", "index": 3,
                                                 "text": "hello"}), 503),
             ("/api/explanation/search-all", json.dumps({"query": "the"}), 200)]
    requests = [("GET", p, None) for p, _ in gets] + [("POST", p, b) for p, b, _ in posts]
    closure = declared_closure()
    own = _norm(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["name"])
    out = subprocess.run([sys.executable, "-c", SERVER, web_db.url, str(free_port()),
                          json.dumps(requests), json.dumps(sorted(closure | {own}))], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    hidden = result["hidden"]
    assert result["statuses"] == [s for _, s in gets] + [s for *_, s in posts], (
        f"with {hidden} hidden (installed, not declared), the server did not answer as it should")
    third_party = result["third_party"]
    assert {"fastapi", "uvicorn", "sqlalchemy", "jinja2", "numpy"} <= set(third_party)
    assert "app" in result["modules"]
    assert not {"workers", "torch", "transformers"} & set(result["modules"])
    undeclared = {mod: dists for mod, dists in third_party.items()
                  if not {_norm(d) for d in dists} & closure}
    assert undeclared == {}, (
        f"the server imported {sorted(undeclared)} (from {undeclared}), which pyproject.toml's "
        "[project].dependencies do not bring")
