"""Speculative decoding inside the engine: decode tok/s with and without prompt lookup, for 1 and 4
concurrent requests whose answers quote their prompt, on a real packaged model.

Greedy with EOS ignored, so both engines emit the same number of tokens and, by construction, the same
tokens (`same` checks it). Decode tok/s counts the tokens emitted once every request of the run has its
first token, over the time from then to the last token: prefill is not in it. `acceptance` is accepted /
verified draft tokens, `tok/step` the tokens a request gets per engine step it samples in (1.0 without
speculation). Prints a table and writes --out (JSON).

    .venv/bin/python bench/engine_spec.py --dtype int8 --threads 2 --new-tokens 128

Prompts: `rename` and `rag` from bench/speculative.py, taken in turns by the concurrent requests.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from speculative import PROMPTS  # bench/speculative.py: the same quoting prompts as the simple path's bench

QUOTING = ("rename", "rag")


def run(llm, prompts: list[list[int]], n_new: int, speculative: str | None, k: int) -> dict:
    """All prompts at once through a fresh engine; -> decode tok/s, tokens, speculation counters."""
    from lmstack.engine import LLMEngine
    from lmstack.generate import SamplingParams

    engine = LLMEngine(
        llm.model, llm.tokenizer, kv_cache_memory_bytes=256 * 2**20, speculative=speculative,
        num_speculative_tokens=k,
    )  # fmt: skip
    params = SamplingParams(max_new_tokens=n_new, temperature=0.0, ignore_eos=True)
    tokens: dict[str, list[int]] = {f"r{i}": [] for i in range(len(prompts))}
    for rid, ids in zip(tokens, prompts, strict=True):
        engine.add_request(rid, ids, params)
    t_decode, decoded = 0.0, 0
    while engine.has_unfinished():
        outputs = engine.step()
        for out in outputs:
            tokens[out.request_id] += out.new_token_ids
        if t_decode:
            decoded += sum(len(out.new_token_ids) for out in outputs)
        elif all(tokens.values()):  # every request decodes from here on
            t_decode = time.perf_counter()
    elapsed = time.perf_counter() - t_decode
    stats = engine.stats()
    return {
        "tokens": tokens,
        "decode_tok_s": decoded / elapsed if elapsed > 0 else 0.0,
        "acceptance": stats.spec_acceptance_rate,
        "tok_per_step": engine.spec_stats.tokens_per_forward,
        "proposed": stats.spec_draft_tokens_total,
        "accepted": stats.spec_accepted_tokens_total,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--dtype", default="int8", choices=["float32", "bfloat16", "int8", "q4"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--concurrency", default="1,4", help="comma list of concurrent requests")
    ap.add_argument("--k", type=int, default=4, help="num_speculative_tokens")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "engine_spec.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from lmstack.api import LLM

    llm = LLM.load(args.model, device="cpu", dtype=args.dtype)
    quoting = [llm.prompt_ids(PROMPTS[p]) for p in QUOTING]
    run(llm, quoting[:1], 4, None, args.k)  # warm-up: allocator, first-call costs
    print(
        f"{args.model}  dtype {args.dtype}  threads {args.threads}  new tokens {args.new_tokens}  k {args.k}"
    )
    print("\n| concurrency | method | decode tok/s | speedup | acceptance | tok/step | same |")
    print("|---:|---|---:|---:|---:|---:|---|")
    rows = []
    for c in map(int, args.concurrency.split(",")):
        prompts = [quoting[i % len(quoting)] for i in range(c)]
        base = run(llm, prompts, args.new_tokens, None, args.k)
        spec = run(llm, prompts, args.new_tokens, "prompt_lookup", args.k)
        for method, r in (("engine", base), (f"prompt lookup k={args.k}", spec)):
            row = {
                "concurrency": c,
                "method": method,
                "decode_tok_s": r["decode_tok_s"],
                "speedup": r["decode_tok_s"] / base["decode_tok_s"],
                "acceptance": r["acceptance"],
                "tok_per_step": r["tok_per_step"],
                "same_tokens": r["tokens"] == base["tokens"],
            }
            rows.append(row)
            acc = "-" if r is base else f"{r['acceptance']:.2f}"
            print(
                f"| {c} | {method} | {row['decode_tok_s']:.2f} | {row['speedup']:.2f}x | {acc} | "
                f"{row['tok_per_step']:.2f} | {'yes' if row['same_tokens'] else 'NO'} |",
                flush=True,
            )
    meta = {
        "model": args.model,
        "dtype": args.dtype,
        "threads": args.threads,
        "new_tokens": args.new_tokens,
        "k": args.k,
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "results": rows}, indent=2))


if __name__ == "__main__":
    main()
