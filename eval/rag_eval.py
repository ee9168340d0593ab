"""RAG quality on the Python-docs gold set (eval/data/python_docs_gold.jsonl): retrieval and answers.

Retrieval (`--part retrieval`): every answerable question is searched dense-only, BM25-only, hybrid,
hybrid with sentence rescoring of its first 30 candidates (`RetrievalConfig.sentences`), and, given
`--rerank-model`, that with the model's query-likelihood reranking of the first 10 (`rerank=True`; ~20 s a
question for qwen2.5-coder-0.5b on 2 cores) (k=10, 40 candidates per retriever, min_score=-1 so the
relevance gate drops nothing) on the `pydocs` collection, and dense-only
on `pydocs-naive`, the same pages cut by a naive fixed-size splitter (windows of 192 embedding tokens every
160 tokens, blind to paragraphs, sentences and headings). A chunk is relevant
when it comes from the gold page and its character span overlaps the gold passage's span in that page's
loaded text (the text chunk spans index). Reported: recall@1/3/5/10 (at least one relevant chunk in the
top k), MRR@10, nDCG@10 (binary relevance; the ideal ranking puts every relevant chunk of the page first),
recall@5 by question style, and the issue's two targets for every hybrid system, as PASS/FAIL: recall@5 >=
0.9, and recall@5 at least 10 points above dense-only on the naive splitter. A bar chart goes to --plot (PNG).

Answers (`--part answers`): every question, answerable or not, goes through `Collection.ask` (hybrid, the
default relevance gate) with qwen2.5-coder-0.5b-instruct at int8. Reported: exact match, token F1 and
"answer contains the gold answer" (SQuAD normalization), how often the cited sources contain the gold
answer or overlap the gold passage, refusals on unanswerable questions, false refusals on answerable ones,
and seconds per question. Every answer is saved to --json.

    # the collection under test, once (~30 min of CPU), then the naive baseline once (15-30 min)
    .venv/bin/lmstack ingest /usr/share/doc/python3.11-doc/html -c pydocs --include '**/*.html' \\
        --exclude '_sources/**' --exclude '_static/**' --exclude '_downloads/**' --exclude 'genindex*' \\
        --exclude search.html --exclude py-modindex.html
    .venv/bin/python eval/rag_eval.py --build-naive
    .venv/bin/python eval/rag_eval.py --part retrieval --json eval/results/rag_retrieval.json \\
        --rerank-model qwen2.5-coder-0.5b-instruct                                       # ~45 min
    .venv/bin/python eval/rag_eval.py --part answers --json eval/results/rag_answers.json   # ~10-15 min
    .venv/bin/python eval/rag_eval.py --part both --limit 5 --json /tmp/rag_smoke.json      # a quick look

`--limit N` keeps the first N answerable (and, for answers, the first N unanswerable) questions.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import re
import string
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from lmstack.api import default_home
from lmstack.rag import DocumentError, load_file
from lmstack.rag.collection import Collection, llm_likelihood, store_class, store_location
from lmstack.rag.documents import list_files
from lmstack.rag.embedder import Embedder
from lmstack.rag.retrieval import Judge, RetrievalConfig
from lmstack.rag.store import Record

DEFAULT_DOCS = Path("/usr/share/doc/python3.11-doc/html")
DEFAULT_GOLD = Path(__file__).resolve().parent / "data" / "python_docs_gold.jsonl"
# the `lmstack ingest` filters the pydocs collection was built with; the naive baseline embeds the same pages
INCLUDE = ("**/*.html",)
EXCLUDE = ("_sources/**", "_static/**", "_downloads/**", "genindex*", "search.html", "py-modindex.html")
NAIVE_WINDOW, NAIVE_OVERLAP = 192, 32  # embedding-model tokens, as pydocs' ChunkSettings
NAIVE_BATCH = 256  # windows per embedding call, across pages
KS = (1, 3, 5, 10)
TARGET_RECALL5, TARGET_MARGIN = 0.9, 0.10
SENTENCES = 30  # "hybrid + sentences" rescores hybrid's first 30 candidates by their best sentence
RERANK = 10  # "... + rerank": the reranking model's query likelihood reorders the first 10 (fused by RRF)
ALL_RECORDS = 1_000_000  # dense_search's k when listing every record of one page


# ---------------------------------------------------------------------------------------------- metrics


PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD normalization: lowercase, drop punctuation and the articles a/an/the, squeeze whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def strip_citations(text: str) -> str:
    """An answer without its [1] / [2, 3] source markers."""
    return re.sub(r"\s*\[\d+(?:\s*,\s*\d+)*\]", "", text)


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def contains_answer(prediction: str, gold: str) -> float:
    """Lenient exact match: the normalized gold answer occurs in the normalized prediction, on word bounds."""
    g, p = normalize_answer(gold), normalize_answer(prediction)
    return float(bool(g) and f" {g} " in f" {p} ")


def token_f1(prediction: str, gold: str) -> float:
    """SQuAD token F1: harmonic mean of precision and recall over the multiset of normalized tokens."""
    p, g = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not p or not g:
        return float(p == g)
    common = sum((Counter(p) & Counter(g)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


def overlaps(a: tuple[int, int], b: tuple[int, int]) -> bool:
    """Whether half-open character spans [a0, a1) and [b0, b1) share a character."""
    return a[0] < b[1] and b[0] < a[1]


def recall_at_k(relevant: Sequence[bool], k: int) -> float:
    """Hit rate: 1 when at least one of the first k results is relevant."""
    return float(any(relevant[:k]))


def reciprocal_rank(relevant: Sequence[bool], k: int) -> float:
    """1 / rank of the first relevant result among the first k, 0 when there is none."""
    for rank, rel in enumerate(relevant[:k], start=1):
        if rel:
            return 1.0 / rank
    return 0.0


def ndcg_at_k(relevant: Sequence[bool], k: int, n_relevant: int) -> float:
    """Binary-relevance nDCG@k; the ideal ranking puts all `n_relevant` relevant items (at most k) first."""
    dcg = sum(1.0 / math.log2(rank + 1) for rank, rel in enumerate(relevant[:k], start=1) if rel)
    ideal = sum(1.0 / math.log2(rank + 1) for rank in range(1, min(n_relevant, k) + 1))
    return dcg / ideal if ideal > 0 else 0.0


def fixed_windows(n_tokens: int, window: int, overlap: int) -> list[tuple[int, int]]:
    """Token ranges [i, j) of `window` tokens, each starting `window - overlap` after the last; the last
    one ends at n_tokens."""
    stride = window - overlap
    out = []
    for i in range(0, n_tokens, stride):
        out.append((i, min(i + window, n_tokens)))
        if i + window >= n_tokens:
            break
    return out


def mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values)) if values else float("nan")


# ------------------------------------------------------------------------------------------------- gold


@dataclass(frozen=True)
class GoldItem:
    id: str
    question: str
    answerable: bool
    style: str | None
    answer: str | None
    source: str | None  # relative to the HTML root
    passage: str | None
    path: str | None  # the page's resolved path: what ingest records as `source`
    span: tuple[int, int] | None  # the passage in the page's loaded text

    def relevant(self, source: str, span: tuple[int, int]) -> bool:
        """A chunk of the gold page whose span overlaps the gold passage."""
        if self.source is None or self.span is None:
            return False
        return source.endswith("/" + self.source) and overlaps(span, self.span)


def load_gold(path: Path, docs: Path) -> list[GoldItem]:
    items, texts = [], {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        page = span = None
        if row["answerable"]:
            page = str((docs / row["source"]).resolve())
            if page not in texts:
                texts[page] = load_file(page).text
            start = texts[page].find(row["passage"])
            if start < 0:
                raise ValueError(f"{row['id']}: passage not found in {row['source']}; run eval/check_gold.py")
            span = (start, start + len(row["passage"]))
        items.append(
            GoldItem(
                row["id"], row["question"], bool(row["answerable"]), row.get("style"), row["answer"],
                row["source"], row["passage"], page, span,
            )
        )  # fmt: skip
    return items


def select(items: list[GoldItem], limit: int | None, answerable_only: bool) -> list[GoldItem]:
    yes = [i for i in items if i.answerable][:limit]
    no = [] if answerable_only else [i for i in items if not i.answerable][:limit]
    return yes + no


# ------------------------------------------------------------------------------------- naive baseline


def naive_records(
    source: str, text: str, tokenizer: Any, window: int = NAIVE_WINDOW, overlap: int = NAIVE_OVERLAP
) -> list[Record]:
    """Fixed windows of the page's embedding tokens, cut wherever the count says (mid-sentence, mid-word).
    `tokenizer` is a `tokenizers.Tokenizer`; its offsets give each window's character span."""
    offsets = tokenizer.encode(text, add_special_tokens=False).offsets
    records = []
    for i, j in fixed_windows(len(offsets), window, overlap):
        start, end = offsets[i][0], offsets[j - 1][1]
        rid = sha256(f"{source}\0{start}\0{end}".encode()).hexdigest()[:16]
        meta = {"source": source, "suffix": Path(source).suffix.lower()}
        records.append(Record(rid, source, text[start:end], start, end, n_tokens=j - i, metadata=meta))
    return records


def build_naive(data_dir: Path, name: str, docs: Path, embedder: Embedder) -> None:
    """Embed the pydocs pages again, cut by `naive_records`; pages already built are skipped (resumable)."""
    info = {
        "embedding_model": embedder.name, "splitter": "naive fixed windows",
        "chunk_tokens": NAIVE_WINDOW, "overlap_tokens": NAIVE_OVERLAP,
    }  # fmt: skip
    location = store_location("embedded", data_dir, None)
    store = store_class("embedded").open(location, name, create=True, dim=embedder.dim, info=info)
    tokenizer = copy.deepcopy(embedder.model.tokenizer.backend_tokenizer)  # a `tokenizers.Tokenizer`
    tokenizer.no_truncation()
    tokenizer.no_padding()
    known = store.fingerprints()
    files, _ = list_files(docs, INCLUDE, EXCLUDE)
    todo = []
    for f in files:
        fp = sha256(f.read_bytes() + json.dumps(info, sort_keys=True).encode()).hexdigest()
        if known.get(str(f)) != fp:
            todo.append((f, fp))
    print(f"{name}: {len(files)} pages, {len(files) - len(todo)} already built, {len(todo)} to embed")
    pending: list[tuple[str, str, list[Record]]] = []

    def commit() -> None:
        vectors = embedder.embed([r.text for _, _, recs in pending for r in recs])
        i = 0
        for source, fp, recs in pending:
            store.replace_source(source, fp, recs, vectors[i : i + len(recs)])
            i += len(recs)
        bar.update(len(pending))
        pending.clear()

    with tqdm(total=len(todo), unit="page", desc=f"build {name}") as bar:
        for f, fp in todo:
            try:
                text = load_file(f).text
            except DocumentError as e:  # pydocs' ingest skips these too
                print(f"skipped {f}: {e}", file=sys.stderr)
                bar.update(1)
                continue
            pending.append((str(f), fp, naive_records(str(f), text, tokenizer)))
            if sum(len(p[2]) for p in pending) >= NAIVE_BATCH:
                commit()
        if pending:
            commit()
    print(f"{name}: {store.count()} records")
    store.close()


# -------------------------------------------------------------------------------------------- retrieval


def relevant_count(collection: Collection, item: GoldItem) -> int:
    """How many chunks of the collection overlap the gold passage: the ideal ranking's length for nDCG."""
    assert item.path is not None and item.span is not None
    probe = np.full(collection.store.dim, 1.0 / math.sqrt(collection.store.dim), dtype=np.float32)
    found = collection.store.dense_search(probe, ALL_RECORDS, where={"source": item.path})
    records = collection.store.get([rid for rid, _ in found])
    return sum(item.relevant(r.source, (r.start, r.end)) for r in records)


def rank_metrics(relevant: Sequence[bool], n_relevant: int) -> dict[str, float]:
    out = {f"recall@{k}": recall_at_k(relevant, k) for k in KS}
    out["mrr@10"] = reciprocal_rank(relevant, 10)
    out["ndcg@10"] = ndcg_at_k(relevant, 10, n_relevant)
    return out


def evaluate_system(
    collection: Collection,
    mode: str,
    items: list[GoldItem],
    label: str,
    sentences: int = 0,
    judge: Judge | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    config = RetrievalConfig(
        k=10, mode=mode, candidates=40, min_score=-1.0, sentences=sentences, rerank=judge is not None,
        rerank_candidates=RERANK,
    )  # fmt: skip
    rows, seconds = [], []
    for item in tqdm(items, desc=label, unit="q"):
        t0 = time.perf_counter()
        hits = collection.retrieve(item.question, config, judge=judge)
        seconds.append(time.perf_counter() - t0)
        relevant = [item.relevant(h.record.source, (h.record.start, h.record.end)) for h in hits]
        n_rel = relevant_count(collection, item)
        metrics = rank_metrics(relevant, n_rel)
        metrics["page@5"] = float(any(h.record.source.endswith("/" + (item.source or "")) for h in hits[:5]))
        first = next((rank for rank, rel in enumerate(relevant, 1) if rel), None)
        rows.append({
            "id": item.id, "style": item.style, "first_relevant_rank": first, "n_relevant": n_rel, **metrics,
            "question": item.question,
            "top": [
                {
                    "source": h.record.source,
                    "span": [h.record.start, h.record.end],
                    "heading": " > ".join(h.record.heading_path),
                    "relevant": rel,
                }
                for h, rel in zip(hits, relevant, strict=True)
            ],
        })  # fmt: skip
    names = [*(f"recall@{k}" for k in KS), "mrr@10", "ndcg@10", "page@5"]
    summary: dict[str, Any] = {m: mean([r[m] for r in rows]) for m in names}
    for style in sorted({str(i.style) for i in items}):
        summary[f"recall@5 {style}"] = mean([r["recall@5"] for r in rows if str(r["style"]) == style])
    summary["ms/query"] = 1000 * mean(seconds)
    summary["no_relevant_chunk"] = [r["id"] for r in rows if r["n_relevant"] == 0]
    return summary, rows


def run_retrieval(args: argparse.Namespace, items: list[GoldItem], embedder: Embedder) -> dict[str, Any]:
    items = select(items, args.limit, answerable_only=True)
    systems = [
        ("dense", args.collection, "dense"),
        ("lexical (BM25)", args.collection, "lexical"),
        ("hybrid", args.collection, "hybrid"),
        ("hybrid + sentences", args.collection, "hybrid"),
        ("hybrid + sentences + rerank", args.collection, "hybrid"),
        ("naive dense", args.naive_collection, "dense"),
    ]
    judge = None
    if args.rerank_model:
        from lmstack.api import LLM

        judge = llm_likelihood(LLM.load(args.rerank_model, dtype=args.dtype, cache_dir=args.data_dir))
    summaries: dict[str, Any] = {}
    per_question: dict[str, Any] = {}
    for label, name, mode in systems:
        reranked = label.endswith("+ rerank")
        if reranked and judge is None:
            print(f"{label}: skipped (no --rerank-model)", file=sys.stderr)
            continue
        try:
            collection = Collection.open(name, data_dir=args.data_dir, embedder=embedder)
        except ValueError as e:  # CollectionNotFound, or another embedding model
            print(f"{label}: skipped ({e})", file=sys.stderr)
            continue
        sentences = SENTENCES if "+ sentences" in label else 0
        summaries[label], per_question[label] = evaluate_system(
            collection, mode, items, label, sentences, judge if reranked else None
        )
        collection.close()
    checks = targets(summaries)
    print_retrieval(summaries, checks, len(items))
    return {"questions": len(items), "summary": summaries, "targets": checks, "per_question": per_question}


def targets(summaries: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's two targets, for plain hybrid and for hybrid with its optional stages."""
    naive = summaries.get("naive dense", {}).get("recall@5")
    checks = []
    for system in ("hybrid", "hybrid + sentences", "hybrid + sentences + rerank"):
        hybrid = summaries.get(system, {}).get("recall@5")
        checks += [
            {"target": f"{system} recall@5 >= {TARGET_RECALL5}", "value": hybrid,
             "pass": None if hybrid is None else hybrid >= TARGET_RECALL5},
            {"target": f"{system} recall@5 - naive dense recall@5 >= {TARGET_MARGIN:.2f}",
             "value": None if hybrid is None or naive is None else hybrid - naive,
             "pass": None if hybrid is None or naive is None else hybrid - naive >= TARGET_MARGIN - 1e-9},
        ]  # fmt: skip
    return checks


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[f"{c:.3f}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]

    def line(row: Sequence[str]) -> str:
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )

    return "\n".join([line(headers), "  ".join("-" * w for w in widths), *(line(r) for r in cells)])


def print_retrieval(summaries: dict[str, Any], checks: list[dict[str, Any]], n: int) -> None:
    metrics = [*(f"recall@{k}" for k in KS), "mrr@10", "ndcg@10", "page@5", "ms/query"]
    print(f"\nRetrieval on {n} answerable questions (k=10, candidates=40, min_score=-1)\n")
    print(table(["system", *metrics], [[s, *(v[m] for m in metrics)] for s, v in summaries.items()]))
    styles = sorted({m for v in summaries.values() for m in v if m.startswith("recall@5 ")})
    print("\nrecall@5 by question style\n")
    print(table(["system", *(s.split(" ", 1)[1] for s in styles)],
                [[s, *(v.get(m, float("nan")) for m in styles)] for s, v in summaries.items()]))  # fmt: skip
    for label, v in summaries.items():
        if v["no_relevant_chunk"]:
            print(f"\n{label}: no chunk overlaps the gold passage for {', '.join(v['no_relevant_chunk'])}")
    print()
    for c in checks:
        verdict = "n/a (missing system)" if c["pass"] is None else ("PASS" if c["pass"] else "FAIL")
        value = "" if c["value"] is None else f" (got {c['value']:.3f})"
        print(f"{verdict:4}  {c['target']}{value}")


def plot_retrieval(summaries: dict[str, Any], n: int, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(
            "no chart: matplotlib is not installed (pip install -r requirements/bench.txt)", file=sys.stderr
        )
        return
    metrics = [*(f"recall@{k}" for k in KS), "mrr@10", "ndcg@10"]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.8 / max(len(summaries), 1)
    for i, (label, v) in enumerate(summaries.items()):
        xs = np.arange(len(metrics)) + (i - (len(summaries) - 1) / 2) * width
        bars = ax.bar(xs, [v[m] for m in metrics], width, label=label)
        ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=1)
    ax.axhline(TARGET_RECALL5, color="grey", linestyle="--", linewidth=0.8)
    ax.set_xticks(np.arange(len(metrics)), metrics)
    ax.set_ylim(0, 1.2)
    ax.set_yticks(np.arange(0, 1.01, 0.2))
    ax.set_ylabel(f"mean over {n} answerable gold questions")
    ax.set_title(f"Retrieval on the Python-docs gold set (dashed: the {TARGET_RECALL5} recall@5 target)")
    ax.legend(loc="upper center", ncols=len(summaries), fontsize=8, frameon=False)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"chart: {path}")


# ---------------------------------------------------------------------------------------------- answers


def score_answer(item: GoldItem, result: Any, seconds: float) -> dict[str, Any]:
    """One answer, its scores against the gold item, and what it cited (everything needed to inspect it)."""
    cited = result.cited
    text = strip_citations(result.answer)  # "[n]" markers are not words of the answer
    row: dict[str, Any] = {
        "id": item.id, "question": item.question, "answerable": item.answerable, "style": item.style,
        "gold": item.answer, "answer": result.answer, "refused": result.refused,
        "citations": result.citations, "seconds": seconds,
        # the model's own text, and the citations lmstack added to sentences it left uncited
        "raw": getattr(result, "raw", None), "attributed": getattr(result, "attributed", None),
        "cited": [{"n": s.n, "source": s.source, "span": list(s.span)} for s in cited],
        "sources": [{"n": s.n, "source": s.source, "span": list(s.span), "score": s.score, "dense": s.dense}
                    for s in result.sources],
    }  # fmt: skip
    if item.answerable and item.answer is not None:
        gold = item.answer
        row["em"] = exact_match(text, gold)
        row["f1"] = token_f1(text, gold)
        row["contains"] = contains_answer(text, gold)
        row["cited_has_answer"] = float(any(gold.lower() in s.context.lower() for s in cited))
        row["cited_overlaps_passage"] = float(any(item.relevant(s.source, s.span) for s in cited))
    return row


def run_answers(args: argparse.Namespace, items: list[GoldItem], embedder: Embedder) -> dict[str, Any]:
    from lmstack.api import LLM

    items = select(items, args.limit, answerable_only=False)
    llm = LLM.load(args.model, dtype=args.dtype, cache_dir=args.data_dir)
    collection = Collection.open(args.collection, data_dir=args.data_dir, embedder=embedder)
    config = RetrievalConfig(k=args.k, mode="hybrid")
    rows = []
    for item in tqdm(items, desc="answers", unit="q"):
        t0 = time.perf_counter()
        result = collection.ask(item.question, llm, config, max_tokens=args.max_tokens)
        rows.append(score_answer(item, result, time.perf_counter() - t0))
    collection.close()
    yes = [r for r in rows if r["answerable"]]
    no = [r for r in rows if not r["answerable"]]
    summary = {
        "exact match": mean([r["em"] for r in yes]),
        "answer contains gold": mean([r["contains"] for r in yes]),
        "token F1": mean([r["f1"] for r in yes]),
        "cited sources contain gold": mean([r["cited_has_answer"] for r in yes]),
        "cited sources overlap passage": mean([r["cited_overlaps_passage"] for r in yes]),
        "false refusals (answerable)": mean([float(r["refused"]) for r in yes]),
        "refusals (unanswerable)": mean([float(r["refused"]) for r in no]),
        "seconds / question": mean([r["seconds"] for r in rows]),
    }
    print(f"\nAnswers: {args.model} ({args.dtype}), hybrid k={args.k}, default relevance gate "
          f"(min_score={config.min_score}); {len(yes)} answerable, {len(no)} unanswerable\n")  # fmt: skip
    print(table(["metric", "value"], list(summary.items())))
    return {"model": args.model, "dtype": args.dtype, "k": args.k, "summary": summary, "answers": rows}


# ------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=("retrieval", "answers", "both"), default="retrieval")
    ap.add_argument("--build-naive", action="store_true", help="build the naive-splitter collection and exit")
    ap.add_argument("--docs", type=Path, default=DEFAULT_DOCS, help="the HTML root the gold sources are in")
    ap.add_argument("--gold", type=Path, default=DEFAULT_GOLD)
    ap.add_argument("--data-dir", type=Path, default=None, help="default $LMSTACK_HOME or ~/.lmstack")
    ap.add_argument("--collection", default="pydocs")
    ap.add_argument("--naive-collection", default="pydocs-naive")
    ap.add_argument("--limit", type=int, default=None, help="first N answerable (and N unanswerable) only")
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--dtype", default="int8")
    ap.add_argument(
        "--rerank-model", default=None,
        help="also run hybrid + sentences + rerank with this model's query likelihood (e.g. the answer "
        "model, qwen2.5-coder-0.5b-instruct: ~20 s a question on 2 cores)",
    )  # fmt: skip
    ap.add_argument("--k", type=int, default=5, help="sources per answer")
    ap.add_argument("--max-tokens", type=int, default=256, help="answer length limit")
    ap.add_argument("--json", type=Path, default=None, help="write every number and answer here")
    ap.add_argument("--plot", type=Path, default=None, help="retrieval chart (default: --json's path .png)")
    args = ap.parse_args(argv)
    args.data_dir = args.data_dir or default_home()
    if args.build_naive:
        cached = Embedder(cache=args.data_dir / "cache" / "embeddings.sqlite")
        build_naive(args.data_dir, args.naive_collection, args.docs, cached)
        return 0
    embedder = Embedder()  # no cache: every system pays for embedding its question, so ms/query compare
    embedder.embed(["load the model before the clock starts"])
    items = load_gold(args.gold, args.docs)
    out: dict[str, Any] = {"gold": str(args.gold), "limit": args.limit}
    if args.part in ("retrieval", "both"):
        out["retrieval"] = run_retrieval(args, items, embedder)
        plot = args.plot or (args.json.with_suffix(".png") if args.json else None)
        if plot is not None:
            plot_retrieval(out["retrieval"]["summary"], out["retrieval"]["questions"], plot)
    if args.part in ("answers", "both"):
        out["answers"] = run_answers(args, items, embedder)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1, default=float) + "\n")
        print(f"results: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
