"""Files -> chunks -> vectors -> store, incrementally and crash-safe.

Each file has a fingerprint: sha256 of its bytes, the collection's chunking and embedding settings and the
metadata it is ingested with. A file whose fingerprint the store already has is skipped unread; a new or
changed one is loaded, chunked (small chunks for search, larger parent passages for small-to-big), embedded
and written with one `Store.replace_source` transaction; a file gone from an ingested folder (or no longer
loadable) has its chunks deleted. Files are embedded in batches across file boundaries, but each file is
committed on its own, so killing an ingest loses at most the files in flight and the next run finishes the
job with exactly the records one clean run would have written (chunk ids are content hashes).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from hashlib import sha256
from pathlib import Path
from typing import Any

from tqdm import tqdm

from lmstack.rag.chunking import chunk_document
from lmstack.rag.documents import Document, DocumentError, Skipped, list_files, load_file
from lmstack.rag.embedder import Embedder
from lmstack.rag.store import Parent, Record, Scalar, Store, StoreError, check_where

EMBED_BATCH = 256  # chunks gathered (across files) per embedding call


@dataclass(frozen=True)
class ChunkSettings:
    """Fixed per collection when it is created; changing them needs a new collection."""

    chunk_tokens: int = 192  # embedding-model tokens per searchable chunk (MiniLM reads at most 254)
    overlap_tokens: int = 32
    parent_tokens: int = 768  # small-to-big: the passage around a chunk the answer may read

    def check(self, max_chunk_tokens: int) -> ChunkSettings:
        if not 8 <= self.chunk_tokens <= max_chunk_tokens:
            raise ValueError(
                f"chunk_tokens must be in [8, {max_chunk_tokens}] (what the embedding model reads without "
                f"truncating), got {self.chunk_tokens}"
            )
        if not 0 <= self.overlap_tokens < self.chunk_tokens:
            raise ValueError(f"overlap_tokens must be in [0, chunk_tokens), got {self.overlap_tokens}")
        if self.parent_tokens < self.chunk_tokens:
            raise ValueError(
                f"parent_tokens ({self.parent_tokens}) must be at least chunk_tokens ({self.chunk_tokens})"
            )
        return self


@dataclass
class IngestReport:
    added: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    unchanged: int = 0
    skipped: list[Skipped] = field(default_factory=list)
    chunks: int = 0  # written this run
    seconds: float = 0.0

    @property
    def files_per_second(self) -> float:
        return (len(self.added) + len(self.updated)) / max(self.seconds, 1e-9)

    @property
    def chunks_per_second(self) -> float:
        return self.chunks / max(self.seconds, 1e-9)

    def summary(self) -> str:
        return (
            f"{len(self.added)} added, {len(self.updated)} updated, {len(self.deleted)} deleted, "
            f"{self.unchanged} unchanged, {len(self.skipped)} skipped; {self.chunks} chunks in "
            f"{self.seconds:.1f} s ({self.chunks_per_second:.1f} chunks/s)"
        )


def check_metadata(metadata: Mapping[str, Any] | None) -> dict[str, Scalar]:
    """User metadata attached to every chunk of an ingest: plain keys, scalar values."""
    for key, value in (metadata or {}).items():
        if isinstance(value, (list, tuple, set, frozenset)):
            raise StoreError(f"metadata {key!r} must be one string, number or boolean, not a list")
    out = {k: v[0] for k, v in check_where(metadata or {}).items()}  # the same key and value rules as filters
    reserved = set(out) & {"source", "suffix", "page", "heading"}
    if reserved:
        raise StoreError(f"metadata key {sorted(reserved)[0]!r} is set by lmstack; pick another name")
    return out


def fingerprint(path: Path, settings: Mapping[str, Any], metadata: Mapping[str, Scalar]) -> str:
    h = sha256(path.read_bytes())
    h.update(json.dumps([dict(settings), dict(metadata)], sort_keys=True).encode())
    return h.hexdigest()


HEADER_TOKENS = 48  # at most this many tokens of heading context go in front of a chunk's searched text


def heading_of(heading_path: tuple[str, ...], source: str) -> str:
    """What a chunk is about beyond its own words: its heading path, or the file name without headings."""
    return " > ".join(heading_path) if heading_path else Path(source).stem.replace("_", " ")


def search_text(record: Record, count: Callable[[str], int] | None = None) -> str:
    """The text that is embedded (and full-text indexed): the heading path, then the chunk. Chunks of API
    reference pages rarely repeat the name of what they describe; their headings do. A heading path too
    long for the embedding window keeps its first and last parts."""
    header = str(record.metadata.get("heading", ""))
    if count is not None and header and count(header) > HEADER_TOKENS:
        parts = header.split(" > ")
        header = f"{parts[0]} > {parts[-1]}" if len(parts) > 1 else header
        while header and count(header) > HEADER_TOKENS:
            header = header[: len(header) * 3 // 4]
    return f"{header}\n\n{record.text}" if header else record.text


def build_records(
    doc: Document, count: Callable[[str], int], settings: ChunkSettings, metadata: Mapping[str, Scalar]
) -> tuple[list[Record], list[Parent]]:
    """A document's searchable records, each pointing at the parent passage it overlaps most."""
    chunks = chunk_document(doc, count, settings.chunk_tokens, settings.overlap_tokens)
    parents = (
        chunk_document(doc, count, chunk_tokens=settings.parent_tokens, overlap_tokens=0)
        if settings.parent_tokens > settings.chunk_tokens
        else chunks
    )
    suffix = Path(doc.source).suffix.lower()
    records = []
    j = 0
    for c in chunks:
        while j + 1 < len(parents) and parents[j].end <= c.start:
            j += 1
        near = parents[max(j - 1, 0) : j + 3]
        best = max(
            (p for p in near if p.page == c.page and p.heading_path == c.heading_path),
            key=lambda p: min(p.end, c.end) - max(p.start, c.start),
            default=None,
        )
        heading = heading_of(c.heading_path, doc.source)
        meta: dict[str, Scalar] = {"source": doc.source, "suffix": suffix, "heading": heading, **metadata}
        if c.page is not None:
            meta["page"] = c.page
        records.append(
            Record(
                id=c.id,
                source=c.source,
                text=c.text,
                start=c.start,
                end=c.end,
                page=c.page,
                heading_path=c.heading_path,
                n_tokens=c.n_tokens,
                parent_id=None if best is None else "p" + best.id,
                metadata=meta,
            )
        )
    used = {r.parent_id for r in records}
    kept = [p for p in parents if "p" + p.id in used]
    return records, [Parent("p" + p.id, p.source, p.text, p.start, p.end) for p in kept]


def check_allowed(paths: Iterable[str | Path], allowed_roots: Sequence[str | Path] | None) -> list[Path]:
    """Resolve paths; with `allowed_roots` (a server), every path must lie inside one of them."""
    out = []
    roots = [Path(r).resolve() for r in allowed_roots] if allowed_roots is not None else None
    for p in paths:
        resolved = Path(p).expanduser().resolve()
        if roots is not None and not any(resolved == r or r in resolved.parents for r in roots):
            allowed = ", ".join(map(str, roots)) or "none configured"
            raise DocumentError(f"{p}: outside the folders this server may read ({allowed})")
        if not resolved.exists():
            raise DocumentError(f"{p}: no such file or folder; check the path")
        out.append(resolved)
    return out


def ingest(
    store: Store,
    embedder: Embedder,
    paths: Sequence[str | Path],
    *,
    include: tuple[str, ...] = ("**/*",),
    exclude: tuple[str, ...] = (),
    metadata: Mapping[str, Any] | None = None,
    allowed_roots: Sequence[str | Path] | None = None,
    progress: bool = True,
    on_file: Callable[[str], None] | None = None,  # called after each file is committed (tests)
) -> IngestReport:
    t0 = time.perf_counter()
    if not paths:
        raise DocumentError("no paths to ingest; pass files or folders")
    meta = check_metadata(metadata)
    settings = ChunkSettings(
        **{k: store.info[k] for k in ("chunk_tokens", "overlap_tokens", "parent_tokens") if k in store.info}
    )
    fp_settings = {"embedding_model": store.info.get("embedding_model"), **settings.__dict__}
    report = IngestReport()
    known = store.fingerprints()

    # What is on disk now, and what to do with each file.
    todo: list[tuple[Path, str]] = []
    seen: set[str] = set()
    gone: list[str] = []
    roots = check_allowed(paths, allowed_roots)
    for root in roots:
        files, skipped = list_files(root, include, exclude)
        report.skipped += skipped
        for f in files:
            fp = fingerprint(f, fp_settings, meta)
            seen.add(str(f))
            if known.get(str(f)) == fp:
                report.unchanged += 1
            else:
                todo.append((f, fp))
        if root.is_dir():  # files gone from an ingested folder take their chunks with them
            prefix = str(root).rstrip("/") + "/"
            gone += [s for s in known if s.startswith(prefix) and s not in seen]

    # A file named on its own (not found in a folder) that cannot load is an error, before any write.
    named = {r for r in roots if r.is_file()}
    loaded = {f: load_file(f) for f, _ in todo if f in named}
    for source in dict.fromkeys(gone):
        store.delete_source(source)
        report.deleted.append(source)

    count = embedder.count_tokens
    bar = tqdm(total=len(todo), unit="file", disable=not progress, desc=f"ingest {store.name}")
    pending: list[tuple[Path, str, list[Record], list[Parent]]] = []

    def commit() -> None:
        records = [r for _, _, recs, _ in pending for r in recs]
        vectors = embedder.embed([search_text(r, embedder.count_tokens) for r in records])
        i = 0
        for f, fp, recs, parents in pending:
            store.replace_source(str(f), fp, recs, vectors[i : i + len(recs)], parents)
            i += len(recs)
            (report.updated if str(f) in known else report.added).append(str(f))
            report.chunks += len(recs)
            if on_file is not None:
                on_file(str(f))
        bar.update(len(pending))
        elapsed = time.perf_counter() - t0
        bar.set_postfix(chunks=report.chunks, chunks_s=f"{report.chunks / elapsed:.1f}")
        pending.clear()

    try:
        for f, fp in todo:
            try:
                doc = loaded.pop(f) if f in loaded else load_file(f)
            except DocumentError as e:
                report.skipped.append(Skipped(str(f), str(e)))
                if str(f) in known:  # it was ingested before and no longer loads: its chunks are stale
                    store.delete_source(str(f))
                    report.deleted.append(str(f))
                bar.update(1)
                continue
            records, parents = build_records(doc, count, settings, meta)
            pending.append((f, fp, records, parents))
            if sum(len(p[2]) for p in pending) >= EMBED_BATCH:
                commit()
        if pending:
            commit()
    finally:
        bar.close()
        flush = getattr(store, "flush", None)
        if flush is not None:
            flush()
    report.seconds = time.perf_counter() - t0
    return report
