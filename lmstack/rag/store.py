"""The store contract: what every vector store backend keeps and answers, and the errors it raises.

A collection holds chunk records (text, citation, metadata), one unit-norm embedding per record, the parent
passages that small-to-big retrieval answers from, and one fingerprint per source file. The only write is
`replace_source`, one transaction per file: a crash or Ctrl-C between two files leaves every file either
fully old or fully new, never half-written, so re-running an ingest completes it. Backends:

    EmbeddedStore  (lmstack.rag.embedded)  SQLite (records) + FAISS HNSW and bm25s BM25 beside it; no server
    PgVectorStore  (lmstack.rag.pgvector)  PostgreSQL + pgvector HNSW + tsvector full-text search

Both pass tests/test_rag_store_contract.py.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

Scalar = str | int | float | bool
Where = Mapping[str, Scalar | Sequence[Scalar]]  # key == value, or key in [values]; several keys: all hold

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")
_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


class StoreError(ValueError):
    """Bad input to a store; the message names the problem and the fix."""


class CollectionNotFound(StoreError):
    pass


@dataclass(frozen=True)
class Record:
    """One retrievable chunk: its text is exactly `source`'s document text[start:end]."""

    id: str
    source: str
    text: str
    start: int
    end: int
    page: int | None = None
    heading_path: tuple[str, ...] = ()
    n_tokens: int = 0
    parent_id: str | None = None  # the Parent passage small-to-big answers from
    metadata: Mapping[str, Scalar] = field(default_factory=dict)  # filterable; always has source, suffix


@dataclass(frozen=True)
class Parent:
    """A larger passage around one or more records (a section, cut to a size a prompt can hold)."""

    id: str
    source: str
    text: str
    start: int
    end: int


def check_collection_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise StoreError(
            f"collection name {name!r} is not allowed: use 1-63 letters, digits, '-' or '_', starting with a "
            "letter or digit"
        )
    return name


def check_where(where: Where | None) -> dict[str, list[Scalar]]:
    """Normalize a filter to {key: [allowed values]}; keys must be plain identifiers."""
    if where is None:
        return {}
    if not isinstance(where, Mapping):
        raise StoreError(f"a filter is a mapping of metadata key -> value or list of values, got {where!r}")
    out: dict[str, list[Scalar]] = {}
    for key, value in where.items():
        if not isinstance(key, str) or not _KEY.match(key):
            raise StoreError(f"filter key {key!r} is not a metadata key: use letters, digits and '_'")
        values: list[Scalar] = list(value) if isinstance(value, (list, tuple, set, frozenset)) else [value]  # type: ignore[list-item]
        if not values:
            raise StoreError(f"filter {key!r} has an empty list of values; nothing could match")
        for v in values:
            if not isinstance(v, (str, int, float, bool)):
                raise StoreError(f"filter {key!r}: value {v!r} is not a string, number or boolean")
        out[key] = values
    return out


def matches(metadata: Mapping[str, Any], where: dict[str, list[Scalar]]) -> bool:
    """Reference semantics of a normalized filter, for backends that filter in Python and for tests."""
    for key, values in where.items():
        if key not in metadata:
            return False
        v = metadata[key]
        if not any(v == w and type(v) is type(w) for w in values):
            return False
    return True


def check_vectors(vectors: np.ndarray, n: int, dim: int) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or vectors.shape != (n, dim):
        raise StoreError(f"expected {n} vectors of dimension {dim}, got an array of shape {vectors.shape}")
    if not np.isfinite(vectors).all():
        raise StoreError("vectors contain NaN or infinity; check the embedding model")
    if n and float(np.abs(vectors).max(axis=1).min()) == 0.0:
        raise StoreError(
            "a vector is all zeros, which has no direction to compare; check the embedding model"
        )
    return np.ascontiguousarray(vectors)


class Store(ABC):
    """A named collection on one backend. Scores: dense = cosine similarity (vectors are unit-norm), lexical
    = the backend's BM25-style relevance; both larger-is-better, results best first."""

    name: str
    dim: int
    info: dict[str, Any]  # fixed at creation: embedding model, chunking parameters ...

    @classmethod
    @abstractmethod
    def open(
        cls,
        location: Any,
        name: str,
        *,
        create: bool = False,
        dim: int | None = None,
        info: dict | None = None,
    ) -> Store:
        """Open collection `name` at `location` (a folder for the embedded store, a PostgreSQL URI for
        pgvector). Missing: CollectionNotFound naming the collections there, unless `create` (then `dim`
        is required and `info` is kept). Existing with `create`: `dim` and `info` must equal what it was
        created with (another embedding model or chunking is a StoreError, not a silent mix)."""

    @classmethod
    @abstractmethod
    def list_collections(cls, location: Any) -> list[str]:
        """Names of the collections at `location`, sorted."""

    @classmethod
    @abstractmethod
    def drop(cls, location: Any, name: str) -> None:
        """Delete a collection and all its data; CollectionNotFound if there is none."""

    @abstractmethod
    def fingerprints(self) -> dict[str, str]:
        """source -> fingerprint of the file it was last ingested from."""

    @abstractmethod
    def replace_source(
        self,
        source: str,
        fingerprint: str,
        records: Sequence[Record],
        vectors: np.ndarray,
        parents: Sequence[Parent] = (),
    ) -> None:
        """Atomically make `source`'s records, vectors and parents exactly these (old ones go). Record ids
        are unique in the collection: an id another source holds is a StoreError, and nothing changes."""

    @abstractmethod
    def delete_source(self, source: str) -> int:
        """Remove a source and everything of it; returns the number of records removed (0 if unknown)."""

    @abstractmethod
    def dense_search(self, vector: np.ndarray, k: int, where: Where | None = None) -> list[tuple[str, float]]:
        """The k records nearest to `vector` that pass `where`: [(id, cosine similarity)], best first.
        k = 0 gives []; k < 0 is a StoreError."""

    @abstractmethod
    def lexical_search(self, query: str, k: int, where: Where | None = None) -> list[tuple[str, float]]:
        """The k best full-text matches for any of the query's words that pass `where`, best first."""

    @abstractmethod
    def get(self, ids: Sequence[str]) -> list[Record]:
        """Records in the order asked; an unknown id raises KeyError."""

    @abstractmethod
    def get_vectors(self, ids: Sequence[str]) -> np.ndarray:
        """[len(ids), dim] float32 in the order asked; an unknown id raises KeyError."""

    @abstractmethod
    def get_parents(self, ids: Sequence[str]) -> list[Parent]:
        """Parents in the order asked; an unknown id raises KeyError."""

    @abstractmethod
    def count(self) -> int:
        """Number of records."""

    @abstractmethod
    def ids(self) -> list[str]:
        """All record ids, sorted."""

    @abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
