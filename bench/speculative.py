"""Speculative decoding speed: the target alone vs a draft model vs prompt lookup, same prompts, same threads.

Greedy decoding with EOS ignored, so every method emits the same number of tokens and, by construction, the
same tokens (the `same` column checks it on the real models). Decode tok/s counts the tokens after the
first one over the time after the first one; a draft model's prefill runs before the first token, so it is
part of `ttft`, not of the decode speed. Prints a table and writes bench/results/speculative.json.

    .venv/bin/python bench/speculative.py --threads 2 --new-tokens 64 --dtype float32

Prompts: `codegen` writes new code (nothing to quote: the draft model's case), `rename` and `rag` answer by
quoting their context (prompt lookup's case).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

PROMPTS = {
    "codegen": (
        "Write a Python function `is_palindrome(s: str) -> bool` that ignores case, spaces and punctuation. "
        "Add a docstring with two doctests. Reply with the code only."
    ),
    "rename": (
        "Here is a function:\n\n```python\n"
        "def moving_average(values, window):\n"
        "    if window <= 0:\n"
        "        raise ValueError('window must be positive')\n"
        "    result = []\n"
        "    x = 0\n"
        "    total = 0.0\n"
        "    for i, v in enumerate(values):\n"
        "        total += v\n"
        "        x += 1\n"
        "        if i >= window:\n"
        "            total -= values[i - window]\n"
        "            x -= 1\n"
        "        result.append(total / x)\n"
        "    return result\n"
        "```\n\n"
        "Rename the variable `x` to `count` and return the whole function in one code block, "
        "changing nothing else."
    ),
    "rag": (
        "Answer the question using only the context, and quote the sentences you rely on word for word.\n\n"
        "Context:\n"
        "[1] The KV cache stores the keys and values of every processed token, so each new token only "
        "needs attention over cached entries instead of recomputing the whole prefix.\n"
        "[2] Paged attention splits the cache into fixed-size blocks, which lets a server share prompt "
        "prefixes between requests and avoid fragmentation.\n"
        "[3] Speculative decoding lets a cheap proposer guess several tokens that the large model then "
        "verifies in a single forward pass.\n\n"
        "Question: Why does paged attention help a server that handles many requests?"
    ),
}


def run(model, ids: list[int], n_new: int, proposer=None) -> dict:
    """One greedy generation; proposer None is the target alone (the plain generate path)."""
    from lmstack.generate import SamplingParams, generate_tokens
    from lmstack.generate.speculative import SpecStats, speculative_generate_tokens

    params = SamplingParams(max_new_tokens=n_new, temperature=0.0, ignore_eos=True)
    stats = SpecStats()
    if proposer is None:
        events = generate_tokens(model, ids, params, stop_ids=frozenset())
    else:
        events = speculative_generate_tokens(model, ids, params, proposer, stop_ids=frozenset(), stats=stats)
    t0 = time.perf_counter()
    tokens, t_first = [], 0.0
    for event in events:
        tokens.append(event.token_id)
        t_first = t_first or time.perf_counter()
    t_end = time.perf_counter()
    out = {
        "tokens": tokens,
        "ttft_s": t_first - t0,
        "decode_tok_s": (len(tokens) - 1) / (t_end - t_first),
    }
    if proposer is not None:
        out |= {
            "acceptance": stats.acceptance_rate,
            "tokens_per_forward": stats.tokens_per_forward,
            "proposed": stats.proposed,
            "accepted": stats.accepted,
        }
    return out


def bench_target(target, name: str, methods: dict, prompts: dict[str, list[int]], args) -> list[dict]:
    """Every method on every prompt; repeats interleave the methods, so a busy neighbour slows them alike."""
    rows = []
    for prompt_name, ids in prompts.items():
        runs: dict[str, list[dict]] = {m: [] for m in methods}
        for _ in range(args.repeats):
            for method, make_proposer in methods.items():
                runs[method].append(run(target, ids, args.new_tokens, make_proposer()))
        base = statistics.median(r["decode_tok_s"] for r in runs["target only"])
        for method, rs in runs.items():
            tok_s = statistics.median(r["decode_tok_s"] for r in rs)
            row = {
                "target": name,
                "method": method,
                "prompt": prompt_name,
                "prompt_tokens": len(ids),
                "decode_tok_s": tok_s,
                "speedup": tok_s / base,
                "ttft_s": statistics.median(r["ttft_s"] for r in rs),
                "same_tokens": all(r["tokens"] == runs["target only"][0]["tokens"] for r in rs),
            }
            row |= {k: rs[-1][k] for k in ("acceptance", "tokens_per_forward") if k in rs[-1]}
            rows.append(row)
            print_row(row)
    return rows


def print_row(r: dict) -> None:
    acc = f"{r['acceptance']:.2f}" if "acceptance" in r else "-"
    tpf = f"{r['tokens_per_forward']:.2f}" if "tokens_per_forward" in r else "1.00"
    print(
        f"| {r['target']} | {r['method']} | {r['prompt']} | {r['decode_tok_s']:.2f} | {r['speedup']:.2f}x | "
        f"{acc} | {tpf} | {r['ttft_s']:.2f} | {'yes' if r['same_tokens'] else 'NO'} |",
        flush=True,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="qwen2.5-coder-1.5b-instruct")
    ap.add_argument("--draft", default="qwen2.5-coder-0.5b-instruct", help="draft model; '' to skip")
    ap.add_argument("--lookup-targets", default="qwen2.5-coder-1.5b-instruct,qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--dtype", default="float32", choices=["float32", "int8", "q4"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompts", default="codegen,rename", help=f"comma list of {', '.join(PROMPTS)}")
    ap.add_argument("--k-draft", type=int, default=4)
    ap.add_argument("--k-lookup", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "speculative.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from lmstack.api import LLM
    from lmstack.generate.speculative import DraftModelProposer, PromptLookupProposer

    names = [args.target] + [n for n in args.lookup_targets.split(",") if n and n != args.target]
    llms = {n: LLM.load(n, device="cpu", dtype=args.dtype) for n in names}
    draft = llms.get(args.draft) or (
        LLM.load(args.draft, device="cpu", dtype=args.dtype) if args.draft else None
    )
    print(f"dtype {args.dtype}  threads {args.threads}  new tokens {args.new_tokens}  repeats {args.repeats}")
    print("\n| target | method | prompt | decode tok/s | speedup | acceptance | tokens/fwd | ttft s | same |")
    print("|---|---|---|---:|---:|---:|---:|---:|---|")
    rows = []
    for name, llm in llms.items():
        prompts = {p: llm.prompt_ids(PROMPTS[p]) for p in args.prompts.split(",")}
        run(llm.model, next(iter(prompts.values())), 4)  # warm-up: allocator, first-call costs
        methods = {"target only": lambda: None}
        if draft is not None and name == args.target:
            methods[f"draft {args.draft} k={args.k_draft}"] = lambda: DraftModelProposer(
                draft.model, args.k_draft
            )
        if name in args.lookup_targets.split(","):
            methods[f"prompt lookup k={args.k_lookup}"] = lambda: PromptLookupProposer(args.k_lookup)
        rows += bench_target(llm.model, name, methods, prompts, args)
    meta = {
        "dtype": args.dtype,
        "threads": args.threads,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "results": rows}, indent=2))


if __name__ == "__main__":
    main()
