"""`featurescope llm-serve`: an OpenAI-compatible chat-completions server for the `openai`
explainer and scorers, with no network and no GPU needed: llama.cpp's own HTTP server (through
the `xllamacpp` wheel, extra `llm`) over a .gguf file, by default the built-in
SmolLM2-135M-Instruct. It answers `logprobs` / `top_logprobs`, which the detection and fuzzing
scorers read."""

from __future__ import annotations

import argparse
import os
import signal
import threading
from pathlib import Path

from app.config import Settings

DEFAULT_PORT = 8081


def served_name(gguf: Path) -> str:
    """The model name the server answers to: the file's name without `.gguf`."""
    return gguf.name.removesuffix(".gguf")


def start(gguf: Path, *, host: str = "127.0.0.1", port: int = DEFAULT_PORT,
          threads: int | None = None, parallel: int = 4, ctx: int = 4096):
    """llama.cpp's server on host:port over `gguf`, `parallel` slots of `ctx` tokens each;
    returns the running server (it stops when the object is dropped)."""
    try:
        import xllamacpp
    except ImportError as exc:
        raise RuntimeError("llm-serve needs the llm extra: pip install 'featurescope[llm]'") \
            from exc
    if not gguf.is_file():
        raise ValueError(f"no .gguf file at {gguf}")
    p = xllamacpp.CommonParams()
    p.model.path = str(gguf)
    p.model_alias = {served_name(gguf)}
    p.hostnames, p.port = [host], port
    p.n_parallel, p.n_ctx = parallel, ctx * parallel
    p.cpuparams.n_threads = threads or max(1, os.cpu_count() or 1)
    p.verbosity = -1
    return xllamacpp.Server(p)


def cmd_llm_serve(args: argparse.Namespace, settings: Settings) -> int:
    from workers.loading import default_gguf

    gguf = Path(args.gguf) if args.gguf else default_gguf()
    if args.port < 1 or args.port > 65535:
        raise ValueError(f"--port expects 1-65535, got {args.port}")
    for flag, value in (("--threads", args.threads), ("--parallel", args.parallel),
                        ("--ctx", args.ctx)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} expects a positive integer, got {value}")
    server = start(gguf, host=args.host, port=args.port, threads=args.threads,
                   parallel=args.parallel, ctx=args.ctx)
    print(f"serving {served_name(gguf)} at {server.listening_address}/v1 "
          f"(--base-url {server.listening_address}/v1 --explainer-model {served_name(gguf)})",
          flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    del server
    return 0


def register(sub) -> None:
    s = sub.add_parser("llm-serve", help="serve a .gguf instruct model (default: the built-in "
                       "one) on an OpenAI-compatible endpoint for explain --base-url")
    s.add_argument("--gguf", default=None, help="a .gguf file (default: SmolLM2-135M-Instruct)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=DEFAULT_PORT)
    s.add_argument("--threads", type=int, default=None, help="CPU threads (default: all)")
    s.add_argument("--parallel", type=int, default=4,
                   help="requests answered at once (explain sends 4)")
    s.add_argument("--ctx", type=int, default=4096, help="context tokens per request")
    s.set_defaults(func=cmd_llm_serve)
