"""The store contract (lmstack/rag/store.py), run against every backend on the same random collection.

300 records in three sources, unit-norm float32 vectors of dimension 32 and texts drawn from a small word
list, with two words that occur in one record each. Dense results are checked against a numpy brute force,
filters against store.matches, lexical matches against the words each record was built from. The pgvector
backend runs on a real PostgreSQL (the `pg_uri` fixture). Tests that only read share one collection per
backend; tests that write get one of their own.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from functools import cache
from typing import Any

import numpy as np
import pytest

from lmstack.rag.store import (
    CollectionNotFound,
    Parent,
    Record,
    Store,
    StoreError,
    check_where,
    matches,
)

DIM = 32
SOURCES = ("a.md", "b.txt", "c.md")
PER_SOURCE = 100
INFO = {"embedding_model": "test-embedder", "chunk_tokens": 256, "overlap": 0.1}
WORDS = (
    "river mountain apple engine garden planet silver window forest copper violin harbor lantern meadow "
    "pepper rocket saddle tunnel walnut yellow"
).split()
RARE = {"a.md#017": "aardvark", "c.md#042": "quokka"}  # each word occurs in this one record only
LEVELS = (1, 1.0, "1", True)  # one key, four JSON types that a loose backend would confuse


@dataclass(frozen=True)
class Source:
    name: str
    fingerprint: str
    records: list[Record]
    vectors: np.ndarray  # (n, DIM) float32, unit-norm
    parents: list[Parent]


def unit(rng: np.random.Generator, n: int) -> np.ndarray:
    v = rng.standard_normal((n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def make_source(name: str, rng: np.random.Generator, n: int = PER_SOURCE, tag: str = "") -> Source:
    """n records of `name`; every 10 share a parent. `tag` gives a later version other ids."""
    records, parents, offset = [], [], 0
    for i in range(n):
        id_ = f"{name}#{tag}{i:03d}"
        words = list(rng.choice(WORDS, 8))
        if id_ in RARE:
            words[3] = RARE[id_]
        text = " ".join(words)
        metadata = {
            "source": name,
            "suffix": name[name.rindex(".") :],
            "lang": ("en", "de", "fr")[int(rng.integers(3))],
            "year": 2020 + int(rng.integers(4)),
            "level": LEVELS[int(rng.integers(4))],
            "draft": bool(rng.integers(2)),
            "weight": 1e16 if i == 5 else float(rng.random()),
        }
        parent_id = f"{name}@{tag}{i // 10}"
        heading = ("Intro", f"Part {i // 10}") if i % 3 else ()
        records.append(
            Record(id_, name, text, offset, offset + len(text), i // 20 + 1, heading, 8, parent_id, metadata)
        )
        if i % 10 == 0:
            parents.append(Parent(parent_id, name, f"passage {tag}{i // 10} of {name}", offset, offset + 500))
        offset += len(text) + 1
    return Source(name, f"sha-{name}-{tag}", records, unit(rng, n), parents)


@cache
def corpus() -> tuple[Source, ...]:
    rng = np.random.default_rng(0)
    return tuple(make_source(name, rng) for name in SOURCES)


def everything(sources: tuple[Source, ...]) -> tuple[list[Record], np.ndarray]:
    return [r for s in sources for r in s.records], np.concatenate([s.vectors for s in sources])


def brute_force(
    records: list[Record], vectors: np.ndarray, query: np.ndarray, k: int, where=None
) -> list[str]:
    """Ids of the k records nearest to `query` (cosine) that pass `where`, best first."""
    keep = np.array([matches(r.metadata, check_where(where)) for r in records], dtype=bool)
    scores = np.where(keep, vectors.astype(np.float64) @ query.astype(np.float64), -np.inf)
    order = np.argsort(-scores, kind="stable")[: min(k, int(keep.sum()))]
    return [records[i].id for i in order]


def has_word(record: Record, word: str) -> bool:
    return word in record.text.split()


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module", params=["embedded", "pgvector"])
def backend(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[type[Store], Any]:
    """(store class, location): a folder for the embedded store, the session's server for pgvector. Tests
    share it, each with collections of its own."""
    if request.param == "embedded":
        try:
            from lmstack.rag.embedded import EmbeddedStore
        except ImportError as e:
            pytest.skip(f"lmstack.rag.embedded does not import yet: {e}")
        return EmbeddedStore, tmp_path_factory.mktemp("collections")
    from lmstack.rag.pgvector import PgVectorStore

    return PgVectorStore, request.getfixturevalue("pg_uri")


@pytest.fixture
def name() -> str:
    return f"t-{uuid.uuid4().hex[:12]}"


def filled_store(backend: tuple[type[Store], Any], name: str) -> Store:
    cls, location = backend
    store = cls.open(location, name, create=True, dim=DIM, info=INFO)
    for s in corpus():
        store.replace_source(s.name, s.fingerprint, s.records, s.vectors, s.parents)
    return store


@pytest.fixture(scope="module")
def filled(backend: tuple[type[Store], Any]) -> Iterator[Store]:
    """The corpus in one collection, shared by the tests that only read."""
    with filled_store(backend, f"shared-{uuid.uuid4().hex[:12]}") as store:
        yield store
    backend[0].drop(backend[1], store.name)


@pytest.fixture
def store(backend: tuple[type[Store], Any], name: str) -> Iterator[Store]:
    """The corpus in a collection of this test's own, to write to."""
    with filled_store(backend, name) as store:
        yield store
    backend[0].drop(backend[1], name)


def snapshot(store: Store) -> tuple:
    ids = store.ids()
    return store.count(), ids, store.fingerprints(), store.get(ids), store.get_vectors(ids).tobytes()


# ------------------------------------------------------------------------------------------- collections


def test_create_open_list_drop(backend: tuple[type[Store], Any], name: str) -> None:
    cls, location = backend
    with cls.open(location, name, create=True, dim=DIM, info=INFO) as store:
        assert (store.name, store.dim, store.info) == (name, DIM, INFO)
        assert (store.count(), store.ids(), store.fingerprints()) == (0, [], {})
    other = f"{name}-other"
    cls.open(location, other, create=True, dim=DIM).close()
    names = cls.list_collections(location)
    assert {name, other} <= set(names) and names == sorted(names)

    with pytest.raises(CollectionNotFound) as missing:
        cls.open(location, f"{name}-missing")
    assert name in str(missing.value) and other in str(missing.value)

    cls.open(location, name, create=True, dim=DIM, info=INFO).close()  # the same again: opens it
    cls.open(location, name, create=True, dim=DIM).close()  # info=None: opens it whatever its info
    with pytest.raises(StoreError) as wrong_dim:
        cls.open(location, name, create=True, dim=64, info=INFO)
    assert "32" in str(wrong_dim.value) and "64" in str(wrong_dim.value)
    with pytest.raises(StoreError) as wrong_info:
        cls.open(location, name, create=True, dim=DIM, info={**INFO, "embedding_model": "another-embedder"})
    assert "test-embedder" in str(wrong_info.value) and "another-embedder" in str(wrong_info.value)
    with pytest.raises(StoreError):
        cls.open(location, f"{name}-nodim", create=True)

    for bad in ("", "bad name", "../escape", "-dash-first", "x" * 64, "semi;colon"):
        with pytest.raises(StoreError):
            cls.open(location, bad, create=True, dim=DIM)

    cls.drop(location, name)
    assert name not in cls.list_collections(location) and other in cls.list_collections(location)
    with pytest.raises(CollectionNotFound):
        cls.open(location, name)
    with pytest.raises(CollectionNotFound):
        cls.drop(location, name)
    cls.drop(location, other)


# ------------------------------------------------------------------------------------------------ writing


def test_replace_source_then_read_back(filled: Store) -> None:
    records, vectors = everything(corpus())
    assert filled.count() == len(records)
    assert filled.ids() == sorted(r.id for r in records)
    assert filled.fingerprints() == {s.name: s.fingerprint for s in corpus()}

    order = np.random.default_rng(1).permutation(len(records))
    got = filled.get([records[i].id for i in order])
    assert got == [records[i] for i in order]
    for g, i in zip(got, order, strict=True):  # == says 1 == 1.0 == True; the types must survive too
        assert {k: type(v) for k, v in g.metadata.items()} == {
            k: type(v) for k, v in records[i].metadata.items()
        }
        assert isinstance(g.heading_path, tuple)
    np.testing.assert_array_equal(filled.get_vectors([records[i].id for i in order]), vectors[order])
    assert filled.get_vectors([]).shape == (0, DIM)

    parents = [p for s in corpus() for p in s.parents][::-1]
    assert filled.get_parents([p.id for p in parents]) == parents


def test_replacing_a_source_removes_its_old_records_only(store: Store) -> None:
    a, b, c = corpus()
    new_b = make_source("b.txt", np.random.default_rng(2), n=50, tag="v2-")
    store.replace_source(new_b.name, new_b.fingerprint, new_b.records, new_b.vectors, new_b.parents)

    assert store.count() == 250
    assert store.ids() == sorted(r.id for r in a.records + new_b.records + c.records)
    assert store.fingerprints() == {"a.md": a.fingerprint, "b.txt": new_b.fingerprint, "c.md": c.fingerprint}
    assert store.get([r.id for r in new_b.records]) == new_b.records
    assert store.get([r.id for r in a.records + c.records]) == a.records + c.records
    with pytest.raises(KeyError):
        store.get([b.records[0].id])
    with pytest.raises(KeyError):
        store.get_parents([b.parents[0].id])
    hits = store.dense_search(b.vectors[0], 300)  # an old vector of b finds only live records
    assert {id_ for id_, _ in hits} == set(store.ids())

    changed = [replace(r, text=r.text + " walnut") if i == 3 else r for i, r in enumerate(a.records)]
    store.replace_source("a.md", "sha-a-2", changed, a.vectors, a.parents)  # same ids, new content
    assert store.get([changed[3].id]) == [changed[3]] and store.count() == 250

    store.replace_source("c.md", "sha-empty", [], np.zeros((0, DIM), np.float32))  # a file with no chunks
    assert store.count() == 150 and store.fingerprints()["c.md"] == "sha-empty"


def test_delete_source(store: Store) -> None:
    a, b, c = corpus()
    assert store.delete_source("c.md") == PER_SOURCE
    assert store.count() == 2 * PER_SOURCE
    assert store.ids() == sorted(r.id for r in a.records + b.records)
    assert store.fingerprints() == {"a.md": a.fingerprint, "b.txt": b.fingerprint}
    with pytest.raises(KeyError):
        store.get_parents([c.parents[0].id])
    assert store.delete_source("c.md") == 0 and store.delete_source("never-seen.md") == 0
    assert store.get([r.id for r in b.records]) == b.records


def test_bad_input_changes_nothing(store: Store) -> None:
    a = corpus()[0]
    fresh = make_source("new.md", np.random.default_rng(3), n=20)
    before = snapshot(store)
    for s in (a, fresh):  # an existing source keeps its old records, a new one stays absent
        nan = s.vectors.copy()
        nan[4, 7] = np.nan
        inf = s.vectors.copy()
        inf[0, 0] = np.inf
        stranger = [replace(s.records[2], source="elsewhere.md"), *s.records[1:]]
        bad_calls = {
            "wrong dimension": (s.records, np.pad(s.vectors, ((0, 0), (0, 1)))),
            "fewer vectors than records": (s.records, s.vectors[:-1]),
            "more vectors than records": (s.records[:-1], s.vectors),
            "flat vectors": (s.records, s.vectors.ravel()),
            "NaN": (s.records, nan),
            "infinity": (s.records, inf),
            "a record of another source": (stranger, s.vectors),
            "duplicate ids": ([*s.records[:-1], s.records[0]], s.vectors),
        }
        for why, (records, vectors) in bad_calls.items():
            with pytest.raises(StoreError):
                store.replace_source(s.name, "sha-bad", records, vectors, s.parents)
                pytest.fail(f"no StoreError for {why}")
        with pytest.raises(StoreError):  # a parent of another source
            store.replace_source(
                s.name, "sha-bad", s.records, s.vectors, [replace(s.parents[0], source="x.md")]
            )
    with pytest.raises(StoreError):
        store.dense_search(np.ones(DIM + 1, np.float32), 5)
    assert snapshot(store) == before


def test_unknown_ids_raise_key_error(filled: Store) -> None:
    with pytest.raises(KeyError, match="no-such-id"):
        filled.get(["a.md#000", "no-such-id"])
    with pytest.raises(KeyError, match="no-such-parent"):
        filled.get_parents(["no-such-parent"])


# ---------------------------------------------------------------------------------------------- searching


def test_dense_search_matches_brute_force(filled: Store) -> None:
    records, vectors = everything(corpus())
    by_id = {r.id: i for i, r in enumerate(records)}
    queries = unit(np.random.default_rng(4), 20)
    recalls = []
    for query in queries:
        hits = filled.dense_search(query, 10)
        exact = brute_force(records, vectors, query, 10)
        assert len(hits) == 10 and hits[0][0] == exact[0]
        recalls.append(len({id_ for id_, _ in hits} & set(exact)) / 10)
        ids, scores = zip(*hits, strict=True)
        np.testing.assert_allclose(scores, vectors[[by_id[i] for i in ids]] @ query, atol=1e-5)
        assert list(scores) == sorted(scores, reverse=True)
    assert np.mean(recalls) >= 0.95

    hits = filled.dense_search(vectors[123], 3)  # a stored vector finds itself
    assert hits[0][0] == records[123].id and hits[0][1] == pytest.approx(1.0, abs=1e-5)

    everyone = filled.dense_search(queries[0], 1000)  # k beyond the collection: all of it, best first
    assert [id_ for id_, _ in everyone] == brute_force(records, vectors, queries[0], 1000)
    assert filled.dense_search(queries[0], 0) == []


FILTERS = [
    {"lang": "de"},
    {"year": [2020, 2022]},
    {"lang": "en", "year": 2021},
    {"source": "a.md", "draft": False},
    {"suffix": ".md", "lang": ["fr", "de"], "year": [2023]},
    {"level": 1},
    {"level": 1.0},
    {"level": "1"},
    {"level": True},
    {"level": [1, True]},
    {"year": "2021"},  # stored as int: matches nothing
    {"draft": 0},  # stored as bool: matches nothing
    {"no_such_key": "x"},
]


@pytest.mark.parametrize("where", FILTERS, ids=lambda w: ",".join(f"{k}={v!r}" for k, v in w.items()))
def test_filters(filled: Store, where: dict) -> None:
    records, vectors = everything(corpus())
    passing = [r for r in records if matches(r.metadata, check_where(where))]
    query = unit(np.random.default_rng(5), 1)[0]

    hits = filled.dense_search(query, 10, where=where)
    exact = brute_force(records, vectors, query, 10, where)
    assert len(hits) == min(10, len(passing))  # a filter does not starve the result
    assert len({id_ for id_, _ in hits} & set(exact)) >= 0.9 * len(exact)
    all_hits = filled.dense_search(query, 1000, where=where)
    assert [id_ for id_, _ in all_hits] == brute_force(records, vectors, query, 1000, where)

    lexical = filled.lexical_search("river", 1000, where=where)
    assert {id_ for id_, _ in lexical} == {r.id for r in passing if has_word(r, "river")}


@pytest.mark.parametrize(
    "where",
    [{"bad key": 1}, {"1st": 1}, {"lang; DROP TABLE x": "en"}, {"lang": []}, {"lang": None}, ["lang"]],
)
def test_bad_filters_raise(filled: Store, where: Any) -> None:
    with pytest.raises(StoreError):
        filled.dense_search(corpus()[0].vectors[0], 5, where=where)
    with pytest.raises(StoreError):
        filled.lexical_search("river", 5, where=where)


def test_lexical_search(filled: Store) -> None:
    records, _ = everything(corpus())
    (aardvark, quokka) = RARE
    assert filled.lexical_search("aardvark", 5)[0][0] == aardvark
    assert filled.lexical_search("Aardvark?", 5)[0][0] == aardvark
    assert (
        filled.lexical_search('what is an "aardvark" (AND * OR -NEAR:', 5)[0][0] == aardvark
    )  # syntax is text
    assert filled.lexical_search("aardvark river", 5)[0][0] == aardvark  # a rare word outweighs a common one
    assert {id_ for id_, _ in filled.lexical_search("quokka aardvark", 5)} == {aardvark, quokka}  # any word

    hits = filled.lexical_search("copper", 1000)
    assert {id_ for id_, _ in hits} == {r.id for r in records if has_word(r, "copper")}
    scores = [score for _, score in hits]
    assert scores == sorted(scores, reverse=True)
    assert len(filled.lexical_search("copper lantern", 7)) == 7

    assert filled.lexical_search("xylophone", 5) == []
    assert filled.lexical_search("the of and", 5) == []
    assert filled.lexical_search("", 5) == []


def test_reopen_keeps_everything(backend: tuple[type[Store], Any], name: str) -> None:
    cls, location = backend
    queries = unit(np.random.default_rng(6), 3)

    def state(store: Store) -> tuple:
        dense = [store.dense_search(q, 10, where=w) for q in queries for w in (None, {"lang": "fr"})]
        lexical = [store.lexical_search(q, 10) for q in ("aardvark", "river walnut")]
        return (store.dim, store.info, *snapshot(store), store.get_parents(["a.md@3"]), dense, lexical)

    with cls.open(location, name, create=True, dim=DIM, info=INFO) as store:
        for s in corpus():
            store.replace_source(s.name, s.fingerprint, s.records, s.vectors, s.parents)
        store.delete_source("b.txt")
        before = state(store)
    with cls.open(location, name) as store:
        assert state(store) == before
    with cls.open(location, name, create=True, dim=DIM, info=INFO) as store:
        assert state(store) == before


# ---------------------------------------------------------------------------------------- pgvector only


def test_pgvector_concurrent_writers_queue(pg_uri: str, name: str) -> None:
    """Two connections (as two processes would have) replace sources at once, one source in common: every
    source ends up wholly one version, never a mix, and nothing is lost."""
    from lmstack.rag.pgvector import PgVectorStore

    PgVectorStore.open(pg_uri, name, create=True, dim=DIM).close()
    versions = {w: make_source("shared.md", np.random.default_rng(w), n=60, tag=f"w{w}-") for w in (1, 2)}
    own = {w: make_source(f"own{w}.md", np.random.default_rng(10 + w), n=60) for w in (1, 2)}
    errors: list[BaseException] = []

    def writer(w: int) -> None:
        try:
            with PgVectorStore.open(pg_uri, name) as store:
                for _ in range(4):
                    for s in (versions[w], own[w]):
                        store.replace_source(s.name, s.fingerprint, s.records, s.vectors, s.parents)
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(w,)) for w in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    with PgVectorStore.open(pg_uri, name) as store:
        fingerprint = store.fingerprints()["shared.md"]
        winner = next(v for v in versions.values() if v.fingerprint == fingerprint)
        expected = winner.records + own[1].records + own[2].records
        assert store.ids() == sorted(r.id for r in expected)
    PgVectorStore.drop(pg_uri, name)


def test_pgvector_wide_vectors_use_halfvec_index(pg_uri: str, name: str) -> None:
    """Above 2000 dimensions pgvector indexes halfvec; scores stay full-precision cosine similarities."""
    from lmstack.rag.pgvector import PgVectorStore

    rng = np.random.default_rng(7)
    vectors = rng.standard_normal((40, 2048)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    records = [Record(f"w{i}", "wide.md", f"text {i}", 0, 6) for i in range(40)]
    with PgVectorStore.open(pg_uri, name, create=True, dim=2048) as store:
        store.replace_source("wide.md", "sha", records, vectors)
        hits = store.dense_search(vectors[11], 5)
        assert hits[0][0] == "w11"
        np.testing.assert_allclose(
            [s for _, s in hits], vectors[[int(i[1:]) for i, _ in hits]] @ vectors[11], atol=1e-5
        )
    PgVectorStore.drop(pg_uri, name)


def test_pgvector_unreachable_server_says_what_to_do() -> None:
    from lmstack.rag.pgvector import PgVectorStore

    with pytest.raises(StoreError) as e:
        PgVectorStore.open("postgresql://me:secret@127.0.0.1:1/db", "docs")
    message = str(e.value)
    assert "127.0.0.1:1/db" in message and "secret" not in message and "Start the server" in message
