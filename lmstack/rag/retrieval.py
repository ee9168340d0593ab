"""Question -> ranked chunks: dense + BM25 candidates fused with reciprocal rank fusion, then optional
sentence rescoring, LLM rewriting (before), LLM reranking and MMR diversity (after), and small-to-big
parents.

    question --(rewrite?)--> queries --dense k'--+
                                    --BM25  k'--+--> RRF --> (sentences?) --> (rerank?) --> (MMR?) --> top k
                                                                                               --> parents?

Sentence rescoring (`sentences=N`): the first N fused candidates are scored by their best sentence's
similarity to the question, each sentence embedded with its chunk's last two headings in front, and that
ranking replaces the chunk-level dense one in a second fusion with BM25. A chunk's single vector averages
all its sentences, so a question about one of them (most are) matches it weakly; on the Python-docs gold set
this lifts hybrid recall@5 from 0.798 to 0.875 (docs/benchmarks.md). It costs embedding the candidates'
sentences (a few hundred per question, once: the embedding cache keeps them).

Reranking (`rerank=True`): a language model scores the first `rerank_candidates` hits, by default as the
query likelihood (the mean log-probability of the question's tokens when asked for a question the passage
answers; collection.llm_likelihood), and its order is fused with theirs by RRF. A small model's order alone
loses exact-term matches BM25 had right; fused, qwen2.5-coder-0.5b over the first 10 lifts recall@5 on the
Python-docs gold set from 0.875 to 0.904 (docs/benchmarks.md). It costs one forward pass per candidate:
~2 s each for that model on two CPU cores.

Relevance gate: when even the best candidate's cosine similarity to the question is below `min_score`, the
collection does not cover the question: nothing is retrieved and the answer step refuses instead of
guessing. Past the gate every fused hit stays (a relevant chunk can share few words' meaning with the
question and still be found by BM25). Every hit reports its cosine similarity, lexical-only ones included.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field, replace
from typing import TypeVar

import numpy as np

from lmstack.rag.chunking import sentences
from lmstack.rag.embedder import Embedder
from lmstack.rag.store import Parent, Record, Store, StoreError, Where

MODES = ("hybrid", "dense", "lexical")
T = TypeVar("T", bound=Hashable)

# (messages) -> generated text; the answer model, used to rewrite queries
Complete = Callable[[list[dict[str, str]]], str]
# (question, record) -> how relevant the record is to the question, higher is more relevant: the query
# likelihood's mean log-probability, or the yes/no judge's probability
Judge = Callable[[str, Record], float]
RERANK_METHODS = ("likelihood", "judge")


@dataclass(frozen=True)
class RetrievalConfig:
    k: int = 5  # hits returned
    mode: str = "hybrid"
    candidates: int = 40  # per retriever, before fusion
    rrf_k: int = 5  # reciprocal rank fusion constant: 60 (Cormack et al.) buried single-retriever rank-1 hits
    min_score: float = 0.40  # the best hit's cosine similarity below this: nothing relevant, retrieve nothing
    where: Where | None = None  # metadata filter
    mmr: float | None = None  # lambda in [0, 1]: 1 = pure relevance; None = no MMR
    rerank: bool = False  # rerank the top `rerank_candidates` with the LLM
    rerank_candidates: int = 10
    rerank_method: str = "likelihood"  # "likelihood" of the question given the passage, or yes/no "judge"
    rewrite: bool = False  # also search with an LLM-written search query
    small_to_big: bool = False  # answer from each hit's parent passage
    sentences: int = 0  # rescore the first N fused candidates by their best sentence (0: off)

    def check(self) -> RetrievalConfig:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if not 1 <= self.k <= 100:
            raise ValueError(f"k must be in [1, 100], got {self.k}")
        if self.candidates < self.k:
            raise ValueError(f"candidates ({self.candidates}) must be at least k ({self.k})")
        if self.rerank_method not in RERANK_METHODS:
            raise ValueError(
                f"rerank_method must be one of {', '.join(RERANK_METHODS)}, got {self.rerank_method!r}"
            )
        if not 1 <= self.rerank_candidates <= 100:
            raise ValueError(f"rerank_candidates must be in [1, 100], got {self.rerank_candidates}")
        if self.mmr is not None and not 0.0 <= self.mmr <= 1.0:
            raise ValueError(f"mmr is a lambda in [0, 1], got {self.mmr}")
        if self.sentences and not self.k <= self.sentences <= 2 * self.candidates:
            raise ValueError(
                f"sentences rescores the first N fused candidates: N must be 0 (off) or between k ({self.k}) "
                f"and twice candidates ({2 * self.candidates}), got {self.sentences}"
            )
        if not -1.0 <= self.min_score <= 1.0:
            raise ValueError(f"min_score is a cosine similarity in [-1, 1], got {self.min_score}")
        return self


@dataclass
class Hit:
    record: Record
    score: float  # the fused (or judged) score the ranking used
    dense: float  # cosine similarity to the question
    lexical: float | None = None  # BM25 score when the lexical retriever found it
    relevance: float | None = None  # the reranker's score (see Judge), when reranking
    sentence: float | None = None  # the best sentence's cosine similarity, when rescoring by sentences
    parent: Parent | None = None  # small-to-big: the passage the answer reads
    ranks: dict[str, int] = field(default_factory=dict)  # rank per retriever, 1-based

    @property
    def context(self) -> str:
        """What the answer model reads for this hit."""
        return self.parent.text if self.parent is not None else self.record.text


def rrf(rankings: Sequence[Sequence[T]], k: int = 60) -> dict[T, float]:
    """Reciprocal rank fusion: sum over rankings of 1 / (k + rank)."""
    fused: dict[T, float] = {}
    for ranking in rankings:
        for rank, item in enumerate(ranking, start=1):
            fused[item] = fused.get(item, 0.0) + 1.0 / (k + rank)
    return fused


def mmr(vectors: np.ndarray, relevance: np.ndarray, k: int, lam: float) -> list[int]:
    """Maximal marginal relevance: greedily pick lam * relevance - (1 - lam) * max similarity to picked."""
    picked: list[int] = []
    rest = list(range(len(vectors)))
    sims = vectors @ vectors.T
    while rest and len(picked) < k:
        penalty = sims[np.ix_(rest, picked)].max(axis=1) if picked else np.zeros(len(rest))
        scores = lam * relevance[rest] - (1 - lam) * penalty
        picked.append(rest.pop(int(np.argmax(scores))))
    return picked


REWRITE_SYSTEM = (
    "Rewrite the user's question as a short search query for a documentation search engine: keep names, "
    "identifiers and key terms, drop filler words. Reply with the query only."
)


def best_sentence(embedder: Embedder, qvec: np.ndarray, records: Sequence[Record]) -> np.ndarray:
    """Each record's highest cosine similarity between the question and one of its sentences, the sentence
    embedded after the record's last two headings (which name what it is about: "os > os.replace")."""
    texts, owner = [], []
    for i, record in enumerate(records):
        head = " > ".join(record.heading_path[-2:])
        for sentence in sentences(record.text) or [record.text]:
            texts.append(f"{head}: {sentence}" if head else sentence)
            owner.append(i)
    best = np.full(len(records), -1.0, dtype=np.float32)
    if texts:
        np.maximum.at(best, np.asarray(owner), embedder.embed(texts) @ qvec)
    return best


def rewrite_query(question: str, complete: Complete) -> str:
    text = complete([{"role": "system", "content": REWRITE_SYSTEM}, {"role": "user", "content": question}])
    return text.strip().splitlines()[0].strip().strip('"') if text.strip() else ""


def retrieve(
    store: Store,
    embedder: Embedder,
    question: str,
    config: RetrievalConfig | None = None,
    *,
    complete: Complete | None = None,
    judge: Judge | None = None,
) -> list[Hit]:
    config = (config or RetrievalConfig()).check()
    if not isinstance(question, str) or not question.strip():
        raise StoreError("the question is empty; ask something")
    queries = [question]
    if config.rewrite:
        if complete is None:
            raise ValueError("rewrite=True needs a model to write the query (pass complete=...)")
        rewritten = rewrite_query(question, complete)
        if rewritten and rewritten.lower() != question.lower():
            queries.append(rewritten)
    qvecs = embedder.embed(queries)
    qvec = qvecs[0]

    rankings: list[list[str]] = []
    dense_of: dict[str, float] = {}
    lexical_of: dict[str, float] = {}
    ranks: dict[str, dict[str, int]] = {}
    lexical_ranking: list[str] = []  # the question's own BM25 ranking
    for i, (q, v) in enumerate(zip(queries, qvecs, strict=True)):
        tag = "" if i == 0 else "_rewritten"
        if config.mode in ("hybrid", "dense"):
            found = store.dense_search(v, config.candidates, config.where)
            rankings.append([rid for rid, _ in found])
            for r, (rid, s) in enumerate(found, 1):
                if i == 0:
                    dense_of[rid] = s
                ranks.setdefault(rid, {})["dense" + tag] = r
        if config.mode in ("hybrid", "lexical"):
            found = store.lexical_search(q, config.candidates, config.where)
            rankings.append([rid for rid, _ in found])
            if i == 0:
                lexical_ranking = rankings[-1]
            for r, (rid, s) in enumerate(found, 1):
                lexical_of.setdefault(rid, s)
                ranks.setdefault(rid, {})["lexical" + tag] = r
    fused = rrf(rankings, config.rrf_k)
    if not fused:
        return []

    ids = sorted(fused, key=lambda rid: -fused[rid])
    vectors = store.get_vectors(ids)
    dense = vectors @ qvec  # the question's similarity, also for lexical-only candidates
    if float(dense.max()) < config.min_score:  # nothing in the collection is about this question
        return []
    best: dict[str, float] = {}
    if config.sentences and config.mode != "lexical":
        pool = ids[: config.sentences]
        scores = best_sentence(embedder, qvec, store.get(pool))
        best = dict(zip(pool, scores.tolist(), strict=True))
        in_pool = set(pool)
        by_sentence = [pool[i] for i in np.argsort(-scores, kind="stable")]
        lexical = [rid for rid in lexical_ranking if rid in in_pool]
        rescored = rrf([lexical, by_sentence] if lexical else [by_sentence], config.rrf_k)
        order = sorted(range(len(pool)), key=lambda i: -rescored[pool[i]])  # the pool only: k <= N
        ids, vectors, dense = [ids[i] for i in order], vectors[order], dense[order]
        fused.update(rescored)
    if not config.rerank and config.mmr is None:  # the order is final: read only the records returned
        keep = (
            config.k * 4 if config.small_to_big else config.k
        )  # small-to-big may skip hits sharing a parent
        ids, vectors, dense = ids[:keep], vectors[:keep], dense[:keep]
    records = store.get(ids)
    hits = [
        Hit(rec, fused[rid], float(d), lexical_of.get(rid), ranks=ranks.get(rid, {}), sentence=best.get(rid))
        for rid, rec, d in zip(ids, records, dense, strict=True)
    ]
    if config.rerank and hits:
        if judge is None:
            raise ValueError("rerank=True needs a relevance judge (pass judge=...)")
        head = hits[: config.rerank_candidates]
        for h in head:
            h.relevance = judge(question, h.record)
        # the reranker's order fused with the one it was given (a small model's scores alone lose
        # exact-term matches that BM25 had right); the rest keep their order after the reranked head
        by_relevance = sorted(range(len(head)), key=lambda i: (-(head[i].relevance or 0.0), i))
        reranked = rrf([range(len(head)), by_relevance], config.rrf_k)
        order = sorted(range(len(head)), key=lambda i: (-reranked[i], i))
        hits = [replace(head[i], score=reranked[i]) for i in order] + hits[len(head) :]
        vectors = np.concatenate([vectors[order], vectors[len(head) :]])
    if config.mmr is not None and len(hits) > 1:
        rel = np.array([h.score for h in hits])
        rel = rel / max(float(rel.max()), 1e-9)
        hits = [hits[i] for i in mmr(vectors, rel, len(hits), config.mmr)]
    if not config.small_to_big:
        return hits[: config.k]
    # small-to-big: each hit reads its parent passage; hits sharing a parent collapse into the best one
    chosen: list[Hit] = []
    seen: set[str] = set()
    for h in hits:
        key = h.record.parent_id or h.record.id
        if key not in seen:
            seen.add(key)
            chosen.append(h)
        if len(chosen) == config.k:
            break
    parent_ids = [h.record.parent_id for h in chosen if h.record.parent_id]
    parents = dict(zip(parent_ids, store.get_parents(parent_ids), strict=True)) if parent_ids else {}
    for h in chosen:
        h.parent = parents.get(h.record.parent_id or "")
    return chosen
