"""Does quantization keep quality? Perplexity of float32, int8 and q4 on a real public-domain book.

The text is "Alice's Adventures in Wonderland" (Project Gutenberg #11, public domain), as shipped inside
the wordcloud 1.9.6 source distribution on PyPI (examples/alice.txt); the archive is fetched once from
PyPI, checked against its sha256 and cached under $LMSTACK_HOME/data.

    .venv/bin/python bench/quant_quality.py --model qwen2.5-coder-0.5b-instruct --tokens 4096
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import tarfile
import urllib.request
from pathlib import Path

import torch

SDIST_URL = (
    "https://files.pythonhosted.org/packages/6f/04/a3d3c4b94a35586ddb97c6a3c508913159161cd558b34f315b382b924bf7/"
    "wordcloud-1.9.6.tar.gz"
)
SDIST_SHA256 = "df17c468ff903bd0aba4f87c6540745d13a4931220dd4937cb363ad85a4771b9"
MEMBER = "wordcloud-1.9.6/examples/alice.txt"


def alice_text(data_dir: Path) -> str:
    cached = data_dir / "alice.txt"
    if cached.exists():
        return cached.read_text(encoding="utf-8-sig")
    with urllib.request.urlopen(SDIST_URL, timeout=60) as r:
        blob = r.read()
    digest = hashlib.sha256(blob).hexdigest()
    if digest != SDIST_SHA256:
        raise ValueError(f"wordcloud sdist sha256 mismatch: got {digest}, expected {SDIST_SHA256}")
    with tarfile.open(fileobj=io.BytesIO(blob)) as tf:
        member = tf.extractfile(MEMBER)
        assert member is not None
        text = member.read().decode("utf-8-sig")
    data_dir.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(cached)
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument(
        "--tokens", type=int, default=4096, help="score the book's first N tokens (after the header)"
    )
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--stride", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtypes", default="float32,int8,q4")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "quant_quality.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from lmstack.api import LLM, default_home
    from lmstack.eval.perplexity import perplexity

    text = alice_text(default_home() / "data")
    start = text.find("CHAPTER I")  # skip the Gutenberg header
    rows = {}
    ids: list[int] = []
    for dt in args.dtypes.split(","):
        llm = LLM.load(args.model, device="cpu", dtype=dt)
        if not ids:
            ids = llm.tokenizer.encode(text[start:], add_special_tokens=False)[: args.tokens]
        r = perplexity(llm.model, ids, window=args.window, stride=args.stride)
        rows[dt] = {"perplexity": r.perplexity, "nll": r.nll, "tokens": r.tokens}
        print(f"{dt:8} ppl {r.perplexity:.4f}  ({r.tokens} tokens)", flush=True)
        del llm
    base = rows.get("float32")
    print("\n| dtype | perplexity | vs float32 |\n|---|---:|---:|")
    for dt, r in rows.items():
        rel = f"{100 * (r['perplexity'] / base['perplexity'] - 1):+.2f}%" if base else "n/a"
        print(f"| {dt} | {r['perplexity']:.4f} | {rel} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"model": args.model, "tokens": len(ids), "results": rows}, indent=2))


if __name__ == "__main__":
    main()
