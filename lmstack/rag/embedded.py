"""The embedded store: SQLite for everything that must be exact, FAISS HNSW beside it for fast vector search.

    <root>/<collection>/store.sqlite    records, vectors, parents, fingerprints, generation
    <root>/<collection>/hnsw.faiss      HNSW graph over the vectors (label = records.pos), derived data
    <root>/<collection>/hnsw.json       {generation, max_pos} the graph file was saved at
    <root>/<collection>/bm25/           BM25 sparse index (bm25s) of heading + text, derived data

SQLite is the source of truth and every write is one transaction (WAL mode), so records, full-text index and
fingerprints never disagree. The HNSW graph is derived: positions only grow (AUTOINCREMENT), a replaced
record's label becomes a tombstone masked at search time, and the graph is caught up from SQLite whenever its
generation is behind: after a crash between a commit and a save, or another process's write. `flush` saves
it (rebuilding when a third of it is tombstones).

Searches that a filter narrows to a few thousand rows, and small collections, are exact (one matrix-vector
product over FAISS's own copy of the vectors); the rest walk the graph with a bitmap of live, matching rows.
Lexical search is BM25 (bm25s: a sparse term x document matrix) over each record's heading and text; its
terms are the stemmed words and whole code terms (`-B`, `os.path.join`) of `lexical.lexical_terms`. A query
costs a few column sums whatever share of the collection its words match (SQLite FTS5 scored every match:
150 ms at 100k chunks). Like the graph it is derived: rebuilt from SQLite when its generation is behind or
its terms changed (`flush`, at the end of every ingest, or the first search after one) and saved beside the
database.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from lmstack.rag import lexical
from lmstack.rag.store import (
    CollectionNotFound,
    Parent,
    Record,
    Store,
    StoreError,
    Where,
    check_collection_name,
    check_vectors,
    check_where,
)

HNSW_M = 32
HNSW_EF_CONSTRUCTION = 64
EF_SEARCH = 160  # HNSW beam width floor: recall@10 0.92 at 64, 0.96 at 128, 0.97 at 200 (100k chunks)
EXACT_BELOW = 4096  # rows: below this many candidates a brute-force product is both exact and faster

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS sources (source TEXT PRIMARY KEY, fingerprint TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS records (
    pos INTEGER PRIMARY KEY AUTOINCREMENT,  -- the HNSW label; never reused
    id TEXT NOT NULL UNIQUE,
    source TEXT NOT NULL,
    text TEXT NOT NULL,
    start INTEGER NOT NULL,
    "end" INTEGER NOT NULL,
    page INTEGER,
    heading_path TEXT NOT NULL,  -- JSON list
    n_tokens INTEGER NOT NULL,
    parent_id TEXT,
    metadata TEXT NOT NULL,  -- JSON object
    vector BLOB NOT NULL  -- float32 little-endian
);
CREATE INDEX IF NOT EXISTS records_source ON records (source);
CREATE TABLE IF NOT EXISTS parents (
    id TEXT PRIMARY KEY,
    source TEXT NOT NULL,
    text TEXT NOT NULL,
    start INTEGER NOT NULL,
    "end" INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS parents_source ON parents (source);
"""

_JSON_TYPE = {str: "text", int: "integer", float: "real"}
# what the lexical index holds per record: the heading context (metadata "heading") and the text
_LEXICAL_TEXT = "coalesce(json_extract(metadata, '$.heading') || char(10), '') || text"


def _where_sql(where: Where | None) -> tuple[str, list[Any]]:
    """A filter as a SQL condition over records.metadata (JSON): key == value with the same JSON type."""
    clauses: list[str] = []
    params: list[Any] = []
    for key, values in check_where(where).items():
        ors = []
        for v in values:
            path = f"$.{key}"
            if isinstance(v, bool):
                ors.append("json_type(metadata, ?) = ?")
                params += [path, "true" if v else "false"]
            else:
                ors.append("(json_type(metadata, ?) = ? AND json_extract(metadata, ?) = ?)")
                params += [path, _JSON_TYPE[type(v)], path, v]
        clauses.append("(" + " OR ".join(ors) + ")")
    return (" AND ".join(clauses) or "1"), params


class EmbeddedStore(Store):
    _index: Any  # faiss.IndexIDMap2 over an IndexHNSWFlat (faiss has no type stubs)
    _vectors: Any  # [ntotal, dim] float32 view of the graph's own copy of the vectors (None when empty)

    def __init__(self, folder: Path, db: sqlite3.Connection) -> None:
        self.folder = folder
        self.name = folder.name
        self._db = db
        meta = dict(db.execute("SELECT key, value FROM meta"))
        self.dim = int(meta["dim"])
        self.info = json.loads(meta["info"])
        self._lock = threading.RLock()  # one connection, shared by a server's threads
        self._bm25: tuple[Any, np.ndarray] | None = None
        self._bm25_gen, self._bm25_dirty = -1, False
        self._graph_path = folder / "hnsw.faiss"
        self._graph_meta = folder / "hnsw.json"
        self._load_graph()

    # ---------------------------------------------------------------------------------------- open / list

    @classmethod
    def open(
        cls,
        location: Any,
        name: str,
        *,
        create: bool = False,
        dim: int | None = None,
        info: dict | None = None,
    ) -> EmbeddedStore:
        root = Path(location)
        folder = root / check_collection_name(name)
        db_path = folder / "store.sqlite"
        if not db_path.exists():
            if not create:
                have = cls.list_collections(root)
                raise CollectionNotFound(
                    f"no collection {name!r} in {root}; existing: {', '.join(have) or 'none'} "
                    "(create one with `lmstack ingest PATH --collection NAME`)"
                )
            if not isinstance(dim, int) or dim <= 0:
                raise StoreError(f"creating collection {name!r} needs the vector dimension, got {dim!r}")
            folder.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(str(db_path), check_same_thread=False, timeout=60, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: a commit survives a crash of the process
        db.executescript(_SCHEMA)
        with db:
            db.execute("BEGIN IMMEDIATE")
            meta = dict(db.execute("SELECT key, value FROM meta"))
            if not meta:
                db.executemany(
                    "INSERT INTO meta VALUES (?, ?)",
                    [
                        ("dim", str(dim)),
                        ("info", json.dumps(info or {}, sort_keys=True)),
                        ("generation", "0"),
                    ],
                )
        meta = dict(db.execute("SELECT key, value FROM meta"))
        if create:
            have_info = json.loads(meta["info"])
            if int(meta["dim"]) != dim or (info is not None and have_info != json.loads(json.dumps(info))):
                db.close()
                raise StoreError(
                    f"collection {name!r} was created with dim={meta['dim']} and {have_info}, not dim={dim} "
                    f"and {info}; use another collection name or drop this one"
                )
        return cls(folder, db)

    @classmethod
    def list_collections(cls, location: Any) -> list[str]:
        root = Path(location)
        if not root.is_dir():
            return []
        return sorted(p.name for p in root.iterdir() if (p / "store.sqlite").exists())

    @classmethod
    def drop(cls, location: Any, name: str) -> None:
        folder = Path(location) / check_collection_name(name)
        if not (folder / "store.sqlite").exists():
            raise CollectionNotFound(f"no collection {name!r} in {location}; nothing to drop")
        shutil.rmtree(folder)

    # ------------------------------------------------------------------------------------ the HNSW graph

    def _generation(self) -> int:
        return int(self._db.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()[0])

    def _new_graph(self) -> Any:
        graph = faiss.IndexHNSWFlat(self.dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
        graph.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        return faiss.IndexIDMap2(graph)

    def _load_graph(self) -> None:
        """The saved graph if it is readable, else an empty one; then catch up with SQLite."""
        self._index, self._max_pos, self._graph_gen = self._new_graph(), 0, -1
        try:
            saved = json.loads(self._graph_meta.read_text())
            index = faiss.read_index(str(self._graph_path))
            if index.d == self.dim:
                self._index, self._max_pos, self._graph_gen = (
                    index,
                    int(saved["max_pos"]),
                    int(saved["generation"]),
                )
        except (OSError, ValueError, KeyError, RuntimeError):
            pass  # missing or torn files: rebuild from SQLite below
        self._refresh_views()
        self._dirty = False
        self._sync(force=True)

    def _refresh_views(self) -> None:
        n = self._index.ntotal
        self._labels = faiss.vector_to_array(self._index.id_map).astype(np.int64)  # label -> pos, ascending
        hnsw: Any = faiss.downcast_index(self._index.index)
        flat: Any = faiss.downcast_index(hnsw.storage)
        self._vectors = faiss.rev_swig_ptr(flat.get_xb(), n * self.dim).reshape(n, self.dim) if n else None

    def _sync(self, force: bool = False) -> None:
        """Bring the graph to SQLite's generation: add rows past max_pos, recompute which labels live."""
        gen = self._generation()
        if gen == self._graph_gen and not force:
            return
        rows = self._db.execute(
            "SELECT pos, vector FROM records WHERE pos > ? ORDER BY pos", (self._max_pos,)
        ).fetchall()
        if rows:
            self._add([r[0] for r in rows], np.frombuffer(b"".join(r[1] for r in rows), np.float32))
        live = np.fromiter((p for (p,) in self._db.execute("SELECT pos FROM records")), dtype=np.int64)
        self._live = np.isin(self._labels, live)
        if gen != self._graph_gen:
            self._dirty = True
        self._graph_gen = gen

    def _add(self, positions: list[int], flat_vectors: np.ndarray) -> None:
        vectors = flat_vectors.reshape(len(positions), self.dim)
        self._index.add_with_ids(vectors, np.asarray(positions, dtype=np.int64))
        self._max_pos = max(self._max_pos, positions[-1])
        self._refresh_views()

    def flush(self) -> None:
        """Bring the lexical index up to date and save it; save the graph (atomically, via rename), first
        rebuilding it when a third is tombstones."""
        with self._lock:
            self._sync()
            if self._generation() != self._bm25_gen and self.count():
                self._lexical_index()
            self._save_lexical()
            if not self._dirty:
                return
            n = self._index.ntotal
            if n and (~self._live).sum() * 3 > n:
                keep = np.flatnonzero(self._live)
                vectors, positions = self._vectors[keep].copy(), self._labels[keep].copy()
                self._index = self._new_graph()
                if len(keep):
                    self._index.add_with_ids(vectors, positions)
                self._refresh_views()
                self._live = np.ones(self._index.ntotal, dtype=bool)
            tmp = self._graph_path.with_suffix(".tmp")
            faiss.write_index(self._index, str(tmp))
            os.replace(tmp, self._graph_path)
            meta = json.dumps({"generation": self._graph_gen, "max_pos": self._max_pos})
            self._graph_meta.with_suffix(".tmp").write_text(meta)
            os.replace(self._graph_meta.with_suffix(".tmp"), self._graph_meta)
            self._dirty = False

    # ------------------------------------------------------------------------------------------- writes

    def fingerprints(self) -> dict[str, str]:
        with self._lock:
            return dict(self._db.execute("SELECT source, fingerprint FROM sources"))

    def replace_source(
        self,
        source: str,
        fingerprint: str,
        records: Sequence[Record],
        vectors: np.ndarray,
        parents: Sequence[Parent] = (),
    ) -> None:
        vectors = check_vectors(vectors, len(records), self.dim)
        ids = [r.id for r in records]
        if len(set(ids)) != len(ids):
            raise StoreError(f"{source}: duplicate record ids; chunk ids must be unique")
        if len({p.id for p in parents}) != len(parents):
            raise StoreError(f"{source}: duplicate parent ids")
        items: list[Record | Parent] = [*records, *parents]
        for r in items:
            if r.source != source:
                raise StoreError(
                    f"record {r.id} belongs to {r.source!r}, not {source!r}; one source per call"
                )
        rows = [
            (
                r.id, r.source, r.text, r.start, r.end, r.page, json.dumps(list(r.heading_path)), r.n_tokens,
                r.parent_id, json.dumps(dict(r.metadata), sort_keys=True), v.tobytes(),
            )
            for r, v in zip(records, vectors, strict=True)
        ]  # fmt: skip
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                gen_before = self._generation()
                old = self._delete(source)
                self._db.executemany(
                    'INSERT INTO records (id, source, text, start, "end", page, heading_path, n_tokens, '
                    "parent_id, metadata, vector) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    rows,
                )
                self._db.executemany(
                    'INSERT INTO parents (id, source, text, start, "end") VALUES (?, ?, ?, ?, ?)',
                    [(p.id, p.source, p.text, p.start, p.end) for p in parents],
                )
                self._db.execute("INSERT OR REPLACE INTO sources VALUES (?, ?)", (source, fingerprint))
                self._bump()
                self._db.execute("COMMIT")
            except sqlite3.IntegrityError as e:
                self._db.execute("ROLLBACK")
                raise StoreError(f"{source}: {e} (a record id already belongs to another source)") from e
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._after_write(gen_before, old)

    def delete_source(self, source: str) -> int:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                gen_before = self._generation()
                old = self._delete(source)
                self._db.execute("DELETE FROM sources WHERE source = ?", (source,))
                self._bump()
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._after_write(gen_before, old)
            return len(old)

    def _delete(self, source: str) -> list[int]:
        """Delete a source's rows (inside the caller's transaction); returns their positions."""
        old = [p for (p,) in self._db.execute("SELECT pos FROM records WHERE source = ?", (source,))]
        self._db.execute("DELETE FROM parents WHERE source = ?", (source,))
        self._db.execute("DELETE FROM records WHERE source = ?", (source,))
        return old

    def _bump(self) -> None:
        self._db.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'generation'")

    def _after_write(self, gen_before: int, old_positions: list[int]) -> None:
        """Apply our own write to the graph without rescanning SQLite, unless someone else wrote too:
        the source's old rows become tombstones and its new rows (positions past max_pos) are added."""
        if gen_before != self._graph_gen:
            self._sync()
            return
        rows = self._db.execute(
            "SELECT pos, vector FROM records WHERE pos > ? ORDER BY pos", (self._max_pos,)
        ).fetchall()
        n_before = self._index.ntotal
        if rows:
            self._add([r[0] for r in rows], np.frombuffer(b"".join(r[1] for r in rows), np.float32))
        live = np.ones(self._index.ntotal, dtype=bool)
        live[:n_before] = self._live
        if old_positions:
            live[np.isin(self._labels, np.asarray(old_positions, dtype=np.int64))] = False
        self._live = live
        self._graph_gen = gen_before + 1
        self._dirty = True

    # ------------------------------------------------------------------------------------------- search

    def dense_search(self, vector: np.ndarray, k: int, where: Where | None = None) -> list[tuple[str, float]]:
        query = np.asarray(vector, dtype=np.float32).reshape(-1)
        if query.shape != (self.dim,):
            raise StoreError(
                f"query vector has shape {query.shape}, the collection's dimension is {self.dim}"
            )
        if k < 0:
            raise StoreError(f"k must be >= 0, got {k}")
        if k == 0:
            return []
        with self._lock:
            self._sync()
            allowed = self._live
            if where:
                cond, params = _where_sql(where)
                pos = np.fromiter(
                    (p for (p,) in self._db.execute(f"SELECT pos FROM records WHERE {cond}", params)),
                    np.int64,
                )
                allowed = allowed & np.isin(self._labels, pos)
            n_allowed = int(allowed.sum())
            if n_allowed == 0:
                return []
            if n_allowed <= EXACT_BELOW or n_allowed <= k:
                labels = np.flatnonzero(allowed)
                scores = self._vectors[labels] @ query
                top = np.argsort(-scores, kind="stable")[:k]
                found = list(zip(self._labels[labels[top]].tolist(), scores[top].tolist(), strict=True))
            else:
                ef = min(max(EF_SEARCH, 2 * k, int(2 * k * len(allowed) / n_allowed)), 2048)
                params_ = faiss.SearchParametersHNSW(efSearch=ef)  # type: ignore[attr-defined]
                if n_allowed < len(allowed):
                    bits = np.packbits(allowed, bitorder="little")
                    params_.sel = faiss.IDSelectorBitmap(len(allowed), faiss.swig_ptr(bits))
                distances, labels = self._index.index.search(query[None], min(k, n_allowed), params=params_)
                found = [
                    (int(self._labels[lab]), float(d))
                    for lab, d in zip(labels[0], distances[0], strict=True)
                    if lab >= 0
                ]
            return self._ids_for(found)

    def _lexical_index(self) -> tuple[Any, np.ndarray] | None:
        """(bm25s retriever, record position of each of its documents), current with SQLite; None if empty."""
        gen = self._generation()
        if self._bm25_gen == gen:
            return self._bm25
        import bm25s

        folder, meta = self.folder / "bm25", self.folder / "bm25.json"
        try:
            saved = json.loads(meta.read_text())
            if saved["generation"] == gen and saved.get("terms") == lexical.VERSION:
                index = bm25s.BM25.load(str(folder))
                self._bm25, self._bm25_gen = (index, np.load(folder / "positions.npy")), gen
                return self._bm25
        except (OSError, ValueError, KeyError):
            pass  # missing, torn, stale or made with other terms: rebuild
        rows = self._db.execute(f"SELECT pos, {_LEXICAL_TEXT} FROM records ORDER BY pos").fetchall()
        self._bm25 = None
        if rows:
            index = bm25s.BM25()
            index.index(lexical.lexical_terms([t for _, t in rows]), show_progress=False)
            self._bm25 = (index, np.fromiter((p for p, _ in rows), np.int64, len(rows)))
        self._bm25_gen, self._bm25_dirty = gen, True
        return self._bm25

    def _save_lexical(self) -> None:
        if not self._bm25_dirty:
            return
        folder, meta = self.folder / "bm25", self.folder / "bm25.json"
        shutil.rmtree(folder, ignore_errors=True)
        meta.unlink(missing_ok=True)  # the files below are only trusted once meta names their generation
        if self._bm25 is not None:
            index, positions = self._bm25
            index.save(str(folder))
            np.save(folder / "positions.npy", positions)
            meta.write_text(json.dumps({"generation": self._bm25_gen, "terms": lexical.VERSION}))
        self._bm25_dirty = False

    def lexical_search(self, query: str, k: int, where: Where | None = None) -> list[tuple[str, float]]:
        if k < 0:
            raise StoreError(f"k must be >= 0, got {k}")
        if k == 0:
            return []
        with self._lock:
            built = self._lexical_index()
            if built is None:
                return []
            index, positions = built
            words = [w for w in lexical.lexical_terms([query])[0] if w in index.vocab_dict]
            if not words:
                return []
            mask = None
            if where:
                cond, params = _where_sql(where)
                allowed = np.fromiter(
                    (p for (p,) in self._db.execute(f"SELECT pos FROM records WHERE {cond}", params)),
                    np.int64,
                )
                mask = np.isin(positions, allowed).astype(np.float32)
                if not mask.any():
                    return []
            docs, scores = index.retrieve(
                [words], k=min(k, len(positions)), show_progress=False, n_threads=1, weight_mask=mask
            )
            found = [(int(positions[d]), float(s)) for d, s in zip(docs[0], scores[0], strict=True) if s > 0]
            return self._ids_for(found)

    def _ids_for(self, found: list[tuple[int, float]]) -> list[tuple[str, float]]:
        if not found:
            return []
        q = ",".join("?" * len(found))
        ids = dict(self._db.execute(f"SELECT pos, id FROM records WHERE pos IN ({q})", [p for p, _ in found]))
        return [(ids[p], s) for p, s in found if p in ids]

    # -------------------------------------------------------------------------------------------- reads

    def _rows(self, table: str, columns: str, ids: Sequence[str]) -> list[tuple]:
        by_id: dict[str, tuple] = {}
        ids = list(ids)
        with self._lock:
            for i in range(0, len(ids), 900):
                batch = ids[i : i + 900]
                q = ",".join("?" * len(batch))
                for row in self._db.execute(f"SELECT {columns} FROM {table} WHERE id IN ({q})", batch):
                    by_id[row[0]] = row
        missing = [i for i in ids if i not in by_id]
        if missing:
            raise KeyError(f"no {table[:-1]} with id {missing[0]!r} in collection {self.name!r}")
        return [by_id[i] for i in ids]

    def get(self, ids: Sequence[str]) -> list[Record]:
        rows = self._rows(
            "records",
            'id, source, text, start, "end", page, heading_path, n_tokens, parent_id, metadata',
            ids,
        )
        return [
            Record(
                id=r[0],
                source=r[1],
                text=r[2],
                start=r[3],
                end=r[4],
                page=r[5],
                heading_path=tuple(json.loads(r[6])),
                n_tokens=r[7],
                parent_id=r[8],
                metadata=json.loads(r[9]),
            )  # fmt: skip
            for r in rows
        ]

    def get_vectors(self, ids: Sequence[str]) -> np.ndarray:
        rows = self._rows("records", "id, vector", ids)
        if not rows:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.frombuffer(b"".join(r[1] for r in rows), np.float32).reshape(len(rows), self.dim).copy()

    def get_parents(self, ids: Sequence[str]) -> list[Parent]:
        return [Parent(*r) for r in self._rows("parents", 'id, source, text, start, "end"', ids)]

    def count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT count(*) FROM records").fetchone()[0])

    def ids(self) -> list[str]:
        with self._lock:
            return [i for (i,) in self._db.execute("SELECT id FROM records ORDER BY id")]

    def close(self) -> None:
        with self._lock:
            if self._db is None:
                return
            self.flush()
            self._db.close()
            self._db = None  # type: ignore[assignment]
