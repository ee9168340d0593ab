"""PostgreSQL + pgvector backend of the store contract: the collection lives in a database server, so several
processes and machines can ingest into it and search it at once.

Per database, one registry table `lmstack_collections(name, dim, info)`; per collection three tables whose
names are derived from the collection name (`lmstack_<name>_<hash>_records`, `_parents`, `_sources`):

    records   id, source, text, start, end, page, heading_path text[], n_tokens, parent_id, metadata jsonb,
              embedding vector(dim) [HNSW, cosine], tsv = to_tsvector(heading + text) [GIN]
    parents   id, source, text, start, end
    sources   source, fingerprint, n_records

Writes take a per-collection advisory lock inside their transaction, so concurrent writers queue instead of
interleaving. Dense scores are 1 - cosine distance; lexical scores weight each query lexeme's `ts_rank` by
its BM25 inverse document frequency, so a rare word counts for more than a common one.
"""

from __future__ import annotations

import functools
import json
import math
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from hashlib import sha256
from typing import Any, TypeVar

import numpy as np
import psycopg
from pgvector.psycopg import register_vector
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.types.json import Jsonb

from lmstack.rag.store import (
    CollectionNotFound,
    Parent,
    Record,
    Scalar,
    Store,
    StoreError,
    Where,
    check_collection_name,
    check_vectors,
    check_where,
)

MAX_VECTOR_INDEX_DIM = 2000  # pgvector's HNSW limit for `vector`; up to 4000 are indexed as `halfvec`
MAX_HALFVEC_INDEX_DIM = 4000

_RECORD_COLUMNS = 'id, source, text, "start", "end", page, heading_path, n_tokens, parent_id, metadata'

F = TypeVar("F", bound=Callable[..., Any])


def _serialized(method: F) -> F:
    """One call at a time per store: a server's threads share it, and a transaction spans several statements
    on its one connection."""

    @functools.wraps(method)
    def serialized(self: PgVectorStore, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            return method(self, *args, **kwargs)

    return serialized  # type: ignore[return-value]


class PgVectorStore(Store):
    def __init__(self, conn: psycopg.Connection, uri: str, name: str, dim: int, info: dict[str, Any]):
        self._conn = conn
        self._lock = threading.RLock()
        self.uri = uri
        self.name = name
        self.dim = dim
        self.info = info
        records, parents, sources = _table_names(name)
        self._tables = {"records": records, "parents": parents, "sources": sources}
        self._distance = _distance_sql(dim)

    # ------------------------------------------------------------------------------------------ collections

    @classmethod
    def open(
        cls,
        location: Any,
        name: str,
        *,
        create: bool = False,
        dim: int | None = None,
        info: dict | None = None,
    ) -> PgVectorStore:
        check_collection_name(name)
        new_info = _normal_info(info)  # info=None creates with {} and opens whatever info it has
        if create:
            dim = _check_dim(dim)
        conn = _connect(location)
        try:
            with conn.transaction():
                _lock(conn, name)
                row = conn.execute(
                    "SELECT dim, info FROM lmstack_collections WHERE name = %s", [name]
                ).fetchone()
                if row is None and not create:
                    raise CollectionNotFound(
                        f"no collection {name!r} at {_redact(location)}; collections there: "
                        f"{', '.join(_names(conn)) or '(none)'}. Pass create=True to make it"
                    )
                if row is None:
                    _create_tables(conn, name, dim)  # type: ignore[arg-type]
                    conn.execute(
                        "INSERT INTO lmstack_collections (name, dim, info) VALUES (%s, %s, %s)",
                        [name, dim, Jsonb(new_info)],
                    )
                    row = (dim, new_info)
                elif create and (row[0] != dim or (info is not None and row[1] != new_info)):
                    raise StoreError(
                        f"collection {name!r} was created with dim {row[0]} and info {row[1]}, not dim {dim} "
                        f"and info {new_info}: mixing embedders or chunkings would spoil its search. "
                        "Use another collection name, or drop this one and ingest again"
                    )
        except BaseException:
            conn.close()
            raise
        return cls(conn, location, name, row[0], row[1])

    @classmethod
    def list_collections(cls, location: Any) -> list[str]:
        with _connect(location) as conn:
            return _names(conn)

    @classmethod
    def drop(cls, location: Any, name: str) -> None:
        check_collection_name(name)
        with _connect(location) as conn, conn.transaction():
            _lock(conn, name)
            if conn.execute("DELETE FROM lmstack_collections WHERE name = %s", [name]).rowcount == 0:
                raise CollectionNotFound(
                    f"no collection {name!r} at {_redact(location)} to drop; collections there: "
                    f"{', '.join(_names(conn)) or '(none)'}"
                )
            conn.execute(sql.SQL("DROP TABLE IF EXISTS {}, {}, {}").format(*_table_names(name)))

    # --------------------------------------------------------------------------------------------- writing

    @_serialized
    def fingerprints(self) -> dict[str, str]:
        return dict(self._execute("SELECT source, fingerprint FROM {sources}").fetchall())

    @_serialized
    def replace_source(
        self,
        source: str,
        fingerprint: str,
        records: Sequence[Record],
        vectors: np.ndarray,
        parents: Sequence[Parent] = (),
    ) -> None:
        records, parents = list(records), list(parents)
        vectors = _check_batch(source, fingerprint, records, vectors, parents, self.dim)
        metadata = [_metadata_json(r.metadata) for r in records]
        try:
            with self._conn.transaction():
                _lock(self._conn, self.name)
                self._check_ids_free(source, "records", [r.id for r in records])
                self._check_ids_free(source, "parents", [p.id for p in parents])
                self._execute("DELETE FROM {records} WHERE source = %s", [source])
                self._execute("DELETE FROM {parents} WHERE source = %s", [source])
                self._copy_records(records, vectors, metadata)
                self._copy_parents(parents)
                self._execute(
                    "INSERT INTO {sources} (source, fingerprint, n_records) VALUES (%s, %s, %s) "
                    "ON CONFLICT (source) DO UPDATE SET fingerprint = EXCLUDED.fingerprint, "
                    "n_records = EXCLUDED.n_records",
                    [source, fingerprint, len(records)],
                )
        except (psycopg.DataError, psycopg.IntegrityError, psycopg.errors.ProgramLimitExceeded) as e:
            raise StoreError(f"PostgreSQL refused source {source!r}, nothing was written: {e}") from e

    def _check_ids_free(self, source: str, table: str, ids: list[str]) -> None:
        """Ids are unique across a collection: one already held by another source is an error, not a move."""
        taken = self._execute(
            f"SELECT id, source FROM {{{table}}} WHERE id = ANY(%s) AND source <> %s LIMIT 1", [ids, source]
        ).fetchone()
        if taken:
            raise StoreError(
                f"{table[:-1]} id {taken[0]!r} of source {source!r} already belongs to source {taken[1]!r}; "
                "ids must be unique across the collection (derive them from the source)"
            )

    def _copy_records(self, records: list[Record], vectors: np.ndarray, metadata: list[str]) -> None:
        columns = _RECORD_COLUMNS + ", embedding"
        types = ["text", "text", "text", "int4", "int4", "int4", "text[]", "int4", "text", "jsonb", "vector"]
        statement = self._sql(f"COPY {{records}} ({columns}) FROM STDIN (FORMAT BINARY)")
        with self._conn.cursor() as cur, cur.copy(statement) as copy:
            copy.set_types(types)
            for r, vector, meta in zip(records, vectors, metadata, strict=True):
                row = (r.id, r.source, r.text, r.start, r.end, r.page, list(r.heading_path), r.n_tokens)
                copy.write_row((*row, r.parent_id, Jsonb(meta, dumps=str), vector))

    def _copy_parents(self, parents: list[Parent]) -> None:
        statement = self._sql('COPY {parents} (id, source, text, "start", "end") FROM STDIN (FORMAT BINARY)')
        with self._conn.cursor() as cur, cur.copy(statement) as copy:
            copy.set_types(["text", "text", "text", "int4", "int4"])
            for p in parents:
                copy.write_row([p.id, p.source, p.text, p.start, p.end])

    @_serialized
    def delete_source(self, source: str) -> int:
        with self._conn.transaction():
            _lock(self._conn, self.name)
            removed = self._execute("DELETE FROM {records} WHERE source = %s", [source]).rowcount
            self._execute("DELETE FROM {parents} WHERE source = %s", [source])
            self._execute("DELETE FROM {sources} WHERE source = %s", [source])
        return removed

    # ------------------------------------------------------------------------------------------- searching

    @_serialized
    def dense_search(self, vector: np.ndarray, k: int, where: Where | None = None) -> list[tuple[str, float]]:
        query = np.asarray(vector, dtype=np.float32)
        query = check_vectors(query[None] if query.ndim == 1 else query, 1, self.dim)[0]
        if not query.any():
            raise StoreError("the query vector is all zeros; cosine similarity is undefined for it")
        where_sql, params = _where_sql(where)
        if _check_k(k) == 0:
            return []
        params |= {"q": query, "k": k}
        select = "SELECT id, 1 - (embedding <=> %(q)s) AS score FROM {records} WHERE " + where_sql
        with self._conn.transaction():
            # ef_search >= k keeps small collections exact; the iterative scan keeps going past rows that a
            # filter rejects (relaxed_order: the rows come back nearly sorted, so they are sorted below)
            self._conn.execute(
                "SELECT set_config('hnsw.ef_search', %s, true), "
                "set_config('hnsw.iterative_scan', 'relaxed_order', true)",
                [str(min(1000, max(100, 2 * k)))],
            )
            rows = self._execute(select + f" ORDER BY {self._distance} LIMIT %(k)s", params).fetchall()
            if len(rows) < k:  # the index gave up (a rare filter, or k beyond the collection): scan exactly
                rows = self._execute(select + " ORDER BY score DESC, id LIMIT %(k)s", params).fetchall()
        return sorted(((id_, float(score)) for id_, score in rows), key=lambda r: (-r[1], r[0]))

    @_serialized
    def lexical_search(self, query: str, k: int, where: Where | None = None) -> list[tuple[str, float]]:
        if not isinstance(query, str):
            raise StoreError(f"a lexical query is a string, got {query!r}")
        where_sql, params = _where_sql(where)
        if _check_k(k) == 0:
            return []
        # the query's words as the same stemmed, stopword-free lexemes the records were indexed with
        [(lexemes,)] = self._conn.execute(
            "SELECT tsvector_to_array(to_tsvector('english', %s))", [query]
        ).fetchall()
        if not lexemes:
            return []
        terms = [_tsquery_term(lexeme) for lexeme in lexemes]
        params |= {"terms": terms, "any": " | ".join(terms), "k": k}
        rows = self._execute(
            """
            WITH n AS (SELECT coalesce(sum(n_records), 0) AS n FROM {sources}),
            terms AS MATERIALIZED (  -- once per query, not once per row
                SELECT t, ln(1 + (n.n - df + 0.5) / (df + 0.5))::float8 AS idf
                FROM n, unnest(%(terms)s::tsquery[]) AS t,
                     LATERAL (SELECT count(*) AS df FROM {records} WHERE tsv @@ t) AS d
            )
            SELECT id, (SELECT sum(idf * ts_rank(tsv, t, 1)) FROM terms) AS score
            FROM {records}
            WHERE tsv @@ %(any)s::tsquery AND """
            + where_sql
            + " ORDER BY score DESC, id LIMIT %(k)s",
            params,
        ).fetchall()
        return [(id_, float(score)) for id_, score in rows]

    # -------------------------------------------------------------------------------------------- reading

    @_serialized
    def get(self, ids: Sequence[str]) -> list[Record]:
        ids = list(ids)
        rows = self._execute(f"SELECT {_RECORD_COLUMNS} FROM {{records}} WHERE id = ANY(%s)", [ids])
        found = {
            id_: Record(id_, source, text, start, end, page, tuple(path), n_tokens, parent_id, metadata)
            for id_, source, text, start, end, page, path, n_tokens, parent_id, metadata in rows
        }
        return [self._pick(found, id_, "record") for id_ in ids]

    @_serialized
    def get_vectors(self, ids: Sequence[str]) -> np.ndarray:
        ids = list(ids)
        rows = self._execute("SELECT id, embedding FROM {records} WHERE id = ANY(%s)", [ids], binary=True)
        found = {id_: embedding.to_numpy() for id_, embedding in rows}
        vectors = [self._pick(found, id_, "record") for id_ in ids]
        return np.stack(vectors) if vectors else np.zeros((0, self.dim), dtype=np.float32)

    @_serialized
    def get_parents(self, ids: Sequence[str]) -> list[Parent]:
        ids = list(ids)
        rows = self._execute(
            'SELECT id, source, text, "start", "end" FROM {parents} WHERE id = ANY(%s)', [ids]
        )
        found = {row[0]: Parent(*row) for row in rows}
        return [self._pick(found, id_, "parent") for id_ in ids]

    @_serialized
    def count(self) -> int:
        [(n,)] = self._execute("SELECT count(*) FROM {records}").fetchall()
        return n

    @_serialized
    def ids(self) -> list[str]:
        return [id_ for (id_,) in self._execute("SELECT id FROM {records} ORDER BY id")]  # COLLATE "C"

    @_serialized
    def close(self) -> None:
        self._conn.close()

    # ------------------------------------------------------------------------------------------- plumbing

    def _sql(self, text: str) -> sql.Composed:
        """`text` with {records}, {parents}, {sources} filled in as quoted table names."""
        return sql.SQL(text).format(**self._tables)

    def _execute(self, text: str, params: Any = None, binary: bool = False) -> psycopg.Cursor:
        return self._conn.execute(self._sql(text), params, binary=binary)

    def _pick(self, found: Mapping[str, Any], id_: str, kind: str) -> Any:
        if id_ not in found:
            raise KeyError(f"no {kind} {id_!r} in collection {self.name!r}")
        return found[id_]


# ------------------------------------------------------------------------------------- connection, schema


def _connect(location: Any) -> psycopg.Connection:
    """A connection to `location` with pgvector and the registry table in place."""
    if not isinstance(location, str):
        raise StoreError(
            f"a pgvector location is a PostgreSQL URI such as postgresql://user:password@localhost:5432/db, "
            f"got {location!r}"
        )
    try:
        timeout = {} if "connect_timeout" in conninfo_to_dict(location) else {"connect_timeout": 10}
        conn = psycopg.connect(make_conninfo(location, **timeout), autocommit=True)
    except psycopg.Error as e:
        raise StoreError(
            f"cannot connect to PostgreSQL at {_redact(location)}: {_one_line(e)}\nStart the server (for "
            "example `docker run -p 5432:5432 -e POSTGRES_PASSWORD=... pgvector/pgvector:pg17`) "
            "or fix the URI"
        ) from e
    try:
        with conn.transaction():
            _lock(conn, "")  # two processes creating the extension at once would collide
            if not conn.execute("SELECT 1 FROM pg_extension WHERE extname = 'vector'").fetchone():
                conn.execute("CREATE EXTENSION vector")
            conn.execute(
                'CREATE TABLE IF NOT EXISTS lmstack_collections (name text COLLATE "C" PRIMARY KEY, '
                "dim integer NOT NULL, info jsonb NOT NULL, created timestamptz NOT NULL DEFAULT now())"
            )
        register_vector(conn)
    except psycopg.Error as e:
        conn.close()
        raise StoreError(
            f"PostgreSQL at {_redact(location)} cannot hold lmstack collections: {_one_line(e)}\nInstall "
            "the pgvector extension on the server and run `CREATE EXTENSION vector` as a superuser"
        ) from e
    return conn


def _redact(uri: str) -> str:
    """The URI without its password, for messages."""
    uri = re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", uri)
    return re.sub(r"(password\s*=\s*)('[^']*'|[^\s&]+)", r"\1***", uri)


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())


def _lock(conn: psycopg.Connection, name: str) -> None:
    """Hold the collection's writer lock until the transaction ends (other processes' writers wait)."""
    conn.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", [f"lmstack:{name}"])


def _names(conn: psycopg.Connection) -> list[str]:
    return [name for (name,) in conn.execute("SELECT name FROM lmstack_collections ORDER BY name")]


def _table_names(name: str) -> tuple[sql.Identifier, sql.Identifier, sql.Identifier]:
    """Readable, and unique even where a long name is cut to fit PostgreSQL's 63-byte identifiers."""
    base = f"lmstack_{name[:32]}_{sha256(name.encode()).hexdigest()[:8]}"
    records, parents, sources = (
        sql.Identifier(f"{base}_{table}") for table in ("records", "parents", "sources")
    )
    return records, parents, sources


def _distance_sql(dim: int) -> str:
    """The cosine distance expression the HNSW index orders by (halfvec above pgvector's `vector` limit)."""
    if dim <= MAX_VECTOR_INDEX_DIM:
        return "embedding <=> %(q)s"
    return f"embedding::halfvec({dim}) <=> %(q)s::halfvec({dim})"


def _create_tables(conn: psycopg.Connection, name: str, dim: int) -> None:
    records, parents, sources = _table_names(name)
    indexed = _distance_sql(dim).split(" <=> ")[0]
    opclass = "vector_cosine_ops" if dim <= MAX_VECTOR_INDEX_DIM else "halfvec_cosine_ops"
    ddl = f"""
        CREATE TABLE {{records}} (
            id text COLLATE "C" PRIMARY KEY,
            source text NOT NULL,
            text text NOT NULL,
            "start" integer NOT NULL,
            "end" integer NOT NULL,
            page integer,
            heading_path text[] NOT NULL,
            n_tokens integer NOT NULL,
            parent_id text,
            metadata jsonb NOT NULL,
            embedding vector({dim}) NOT NULL,
            tsv tsvector GENERATED ALWAYS AS (
                to_tsvector('english', coalesce(metadata->>'heading', '') || ' ' || text)
            ) STORED
        );
        CREATE INDEX ON {{records}} (source);
        CREATE INDEX ON {{records}} USING gin (tsv);
        CREATE INDEX ON {{records}} USING gin (metadata jsonb_path_ops);
        CREATE INDEX ON {{records}} USING hnsw (({indexed}) {opclass});
        CREATE TABLE {{parents}} (
            id text COLLATE "C" PRIMARY KEY,
            source text NOT NULL,
            text text NOT NULL,
            "start" integer NOT NULL,
            "end" integer NOT NULL
        );
        CREATE INDEX ON {{parents}} (source);
        CREATE TABLE {{sources}} (
            source text PRIMARY KEY,
            fingerprint text NOT NULL,
            n_records integer NOT NULL
        );
    """
    conn.execute(sql.SQL(ddl).format(records=records, parents=parents, sources=sources))


# ------------------------------------------------------------------------------------------------ checking


def _check_dim(dim: Any) -> int:
    if isinstance(dim, bool) or not isinstance(dim, int) or not 1 <= dim <= MAX_HALFVEC_INDEX_DIM:
        raise StoreError(
            f"creating a collection needs dim, the embedding dimension: an integer from 1 to "
            f"{MAX_HALFVEC_INDEX_DIM} (pgvector's HNSW limit), got {dim!r}"
        )
    return dim


def _normal_info(info: Any) -> dict[str, Any]:
    """`info` as it reads back from jsonb (tuples become lists), so it compares equal to the stored one."""
    if info is None:
        return {}
    if not isinstance(info, Mapping):
        raise StoreError(f"collection info is a JSON-able dict, got {info!r}")
    try:
        return json.loads(json.dumps(dict(info), allow_nan=False))
    except (TypeError, ValueError) as e:
        raise StoreError(f"collection info must be JSON (strings, numbers, lists, dicts): {e}") from e


def _check_k(k: Any) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise StoreError(f"k is the number of results, a non-negative integer; got {k!r}")
    return k


def _check_batch(
    source: str, fingerprint: str, records: list[Record], vectors: Any, parents: list[Parent], dim: int
) -> np.ndarray:
    """All of a replace_source call that can be checked before writing, so a bad call writes nothing."""
    if not isinstance(source, str) or not isinstance(fingerprint, str):
        raise StoreError(f"source and fingerprint are strings, got {source!r} and {fingerprint!r}")
    vectors = check_vectors(vectors, len(records), dim)
    zero = np.flatnonzero(~vectors.any(axis=1))
    if zero.size:
        raise StoreError(f"the vector of record {records[zero[0]].id!r} is all zeros; check the embedder")
    for kind, items in (("record", records), ("parent", parents)):
        seen: set[str] = set()
        for item in items:
            if item.source != source:
                raise StoreError(
                    f"{kind} {item.id!r} belongs to source {item.source!r}, not {source!r}; "
                    "replace_source writes one source at a time"
                )
            if item.id in seen:
                raise StoreError(f"{kind} id {item.id!r} is twice in source {source!r}; ids must be unique")
            seen.add(item.id)
    return vectors


# ------------------------------------------------------------------------------------ metadata and filters


def _json_scalar(value: Any, key: str) -> str:
    """JSON text for one metadata value. jsonb keeps numbers as decimals (1e16 would read back as an int), so
    a float is always written with a '.', an int never: the type survives and filters tell 1 from 1.0."""
    if isinstance(value, float):
        if not math.isfinite(value):
            raise StoreError(f"metadata {key!r} is {value}; only finite numbers can be stored")
        return f"{value:.1f}" if value.is_integer() else repr(value)
    if isinstance(value, (str, int)):  # bool is an int
        return json.dumps(value)
    raise StoreError(f"metadata {key!r}: {value!r} is not a string, number or boolean")


def _metadata_json(metadata: Mapping[str, Scalar]) -> str:
    if not all(isinstance(key, str) for key in metadata):
        raise StoreError(f"metadata keys are strings, got {list(metadata)!r}")
    return "{" + ", ".join(f"{json.dumps(k)}: {_json_scalar(v, k)}" for k, v in metadata.items()) + "}"


def _where_sql(where: Where | None) -> tuple[str, dict[str, Any]]:
    """A filter as SQL over `metadata`: jsonb containment per allowed value (GIN-indexed), plus a check of the
    number's written form because jsonb compares numbers by value and the contract compares types too."""
    clauses: list[str] = []
    params: dict[str, Any] = {}
    for key, values in check_where(where).items():
        options = []
        for value in values:
            if isinstance(value, float) and not math.isfinite(value):
                continue  # nothing stored is NaN or infinite
            n = len(params)
            params[f"w{n}"] = f"{{{json.dumps(key)}: {_json_scalar(value, key)}}}"
            option = f"metadata @> %(w{n})s::jsonb"
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                params[f"w{n + 1}"] = key
                compare = ">" if isinstance(value, float) else "="
                option += f" AND strpos(metadata->>%(w{n + 1})s, '.') {compare} 0"
            options.append(f"({option})")
        clauses.append("(" + (" OR ".join(options) or "FALSE") + ")")
    return " AND ".join(clauses) or "TRUE", params


def _tsquery_term(lexeme: str) -> str:
    """A lexeme as a quoted tsquery operand, taken verbatim (no second round of parsing or stemming)."""
    return "'" + lexeme.replace("\\", "\\\\").replace("'", "''") + "'"
