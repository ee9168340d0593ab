"""Single-stream prefill and decode speed: lmstack vs llama.cpp (llama-cpp-python) vs HF transformers.

All engines run in one process, one after another, on the same GGUF file, the same prompt token ids and
the same thread count. Greedy decoding, no repetition penalty, EOS ignored so every engine decodes the
same number of tokens. Prints a table with ratios and writes bench/results/decode.json.

    .venv/bin/python bench/decode.py --threads 2 --new-tokens 64
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

PROMPT = (
    "You are reviewing a pull request. The function below parses a CSV file of user records and returns "
    "the ones whose e-mail domain matches a list of allowed domains. Explain what it does, point out two "
    "bugs, and suggest a fixed version.\n\n"
    "def load_users(path, allowed):\n    out = []\n    for line in open(path):\n"
    "        name, email = line.split(',')\n        if email.split('@')[1] in allowed:\n"
    "            out.append(name)\n    return out\n"
)


def bench_lmstack(model_name: str, dtype: str, ids: list[int], n_new: int, repeats: int) -> dict:
    from lmstack.api import LLM
    from lmstack.generate import SamplingParams, generate_tokens

    llm = LLM.load(model_name, device="cpu", dtype=dtype)
    params = SamplingParams(max_new_tokens=n_new, temperature=0.0, ignore_eos=True)
    prefill, decode = [], []
    for _ in range(repeats + 1):  # first run warms up (kernel build, allocator)
        t0 = time.perf_counter()
        t_first = None
        n = 0
        for _ev in generate_tokens(llm.model, ids, params, stop_ids=frozenset()):
            n += 1
            if t_first is None:
                t_first = time.perf_counter()
        t_end = time.perf_counter()
        prefill.append(len(ids) / (t_first - t0))
        decode.append((n - 1) / (t_end - t_first))
    return {"prefill_tok_s": statistics.median(prefill[1:]), "decode_tok_s": statistics.median(decode[1:])}


def bench_llama_cpp(gguf: Path, ids: list[int], n_new: int, repeats: int, threads: int) -> dict | None:
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    llm = Llama(
        model_path=str(gguf),
        n_ctx=len(ids) + n_new + 8,
        n_threads=threads,
        n_threads_batch=threads,
        n_batch=512,
        verbose=False,
    )
    prefill, decode = [], []
    for _ in range(repeats + 1):
        llm.reset()
        t0 = time.perf_counter()
        t_first = None
        n = 0
        for _tok in llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
            n += 1
            if t_first is None:
                t_first = time.perf_counter()
            if n == n_new:
                break
        t_end = time.perf_counter()
        prefill.append(len(ids) / (t_first - t0))
        decode.append((n - 1) / (t_end - t_first))
    return {"prefill_tok_s": statistics.median(prefill[1:]), "decode_tok_s": statistics.median(decode[1:])}


def bench_transformers(gguf: Path, ids: list[int], n_new: int, repeats: int) -> dict | None:
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        return None
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    model.eval()
    x = torch.tensor([ids])
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None, repetition_penalty=1.0)
    prefill, decode = [], []
    with torch.inference_mode():
        for _ in range(repeats + 1):
            t0 = time.perf_counter()
            model.generate(x, max_new_tokens=1, min_new_tokens=1, **kw)
            t1 = time.perf_counter()
            model.generate(x, max_new_tokens=n_new, min_new_tokens=n_new, **kw)
            t2 = time.perf_counter()
            prefill.append(len(ids) / (t1 - t0))
            decode.append((n_new - 1) / ((t2 - t1) - (t1 - t0)))
    return {"prefill_tok_s": statistics.median(prefill[1:]), "decode_tok_s": statistics.median(decode[1:])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtypes", default="float32,int8,q4")
    ap.add_argument("--skip", default="", help="comma list of peers to skip: llama.cpp,transformers")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "decode.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from lmstack.api import LLM, default_home
    from lmstack.hub import resolve

    gguf = resolve(args.model, default_home()).path
    ids = LLM.load(args.model, device="cpu").prompt_ids(PROMPT)
    print(f"model {args.model}  prompt {len(ids)} tokens  new {args.new_tokens}  threads {args.threads}")
    results: dict[str, dict | None] = {}
    for dt in args.dtypes.split(","):
        results[f"lmstack {dt}"] = bench_lmstack(args.model, dt, ids, args.new_tokens, args.repeats)
        print(f"  lmstack {dt}: {results[f'lmstack {dt}']}", flush=True)
    skip = set(args.skip.split(","))
    if "llama.cpp" not in skip:
        results["llama.cpp"] = bench_llama_cpp(gguf, ids, args.new_tokens, args.repeats, args.threads)
        print(f"  llama.cpp: {results['llama.cpp'] or 'missing (pip install the llama-cpp-python wheel)'}")
    if "transformers" not in skip:
        results["transformers fp32"] = bench_transformers(gguf, ids, args.new_tokens, args.repeats)
        print(f"  transformers fp32: {results['transformers fp32']}")

    ref_names = [n for n in ("llama.cpp", "transformers fp32") if results.get(n)]
    print(
        "\n| engine | prefill tok/s | decode tok/s | "
        + " | ".join(f"decode vs {r}" for r in ref_names)
        + " |"
    )
    print("|---|---:|---:|" + "---:|" * len(ref_names))
    for name, r in results.items():
        if not r:
            print(f"| {name} | missing | missing |" + " |" * len(ref_names))
            continue
        ratios = " | ".join(f"{r['decode_tok_s'] / results[ref]['decode_tok_s']:.2f}x" for ref in ref_names)
        print(f"| {name} | {r['prefill_tok_s']:.1f} | {r['decode_tok_s']:.2f} | {ratios} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "model": args.model,
        "threads": args.threads,
        "prompt_tokens": len(ids),
        "new_tokens": args.new_tokens,
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
    }
    args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=2))


if __name__ == "__main__":
    main()
