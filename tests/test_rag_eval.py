"""The metric functions of eval/rag_eval.py against values worked out by hand."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace

SCRIPT = Path(__file__).resolve().parents[1] / "eval" / "rag_eval.py"
_spec = importlib.util.spec_from_file_location("rag_eval", SCRIPT)
assert _spec is not None and _spec.loader is not None
rag_eval = importlib.util.module_from_spec(_spec)
sys.modules["rag_eval"] = rag_eval  # dataclasses look their module up by name
_spec.loader.exec_module(rag_eval)


def test_normalize_answer_drops_case_punctuation_articles_and_extra_space():
    assert rag_eval.normalize_answer("The  Quick, brown fox!") == "quick brown fox"
    assert rag_eval.normalize_answer("lru_cache(maxsize=None)") == "lrucachemaxsizenone"
    assert rag_eval.normalize_answer("an apple a day") == "apple day"
    assert rag_eval.normalize_answer("theory") == "theory"  # articles only as whole words


def test_exact_match_and_contains():
    assert rag_eval.exact_match("An atomic operation.", "atomic operation") == 1.0
    assert rag_eval.exact_match("It is an atomic operation.", "atomic operation") == 0.0
    assert rag_eval.contains_answer("It is an atomic operation [1].", "atomic operation") == 1.0
    assert rag_eval.contains_answer("It raises RecursionError.", "recursionerror") == 1.0
    assert rag_eval.contains_answer("foobar", "foo") == 0.0  # on word boundaries only
    assert rag_eval.contains_answer("anything", "the") == 0.0  # a gold answer that normalizes to nothing


def test_strip_citations():
    assert rag_eval.strip_citations("TypeError [1].") == "TypeError."
    assert rag_eval.strip_citations("Yes [1][2], see os.replace [2, 3]") == "Yes, see os.replace"
    assert rag_eval.strip_citations("a[b] list[0]") == "a[b] list"  # an index looks like a marker: gone too
    assert rag_eval.exact_match(rag_eval.strip_citations("TypeError [1]."), "TypeError") == 1.0


def test_token_f1():
    # prediction -> cat sat on mat (4 tokens), gold -> cat on mat (3); 3 shared: P = 3/4, R = 1
    assert rag_eval.token_f1("the cat sat on the mat", "cat on mat") == pytest.approx(6 / 7)
    # tokens are a multiset: x x y vs x y y share {x, y}: P = 2/3, R = 2/3, F1 = 2/3
    assert rag_eval.token_f1("x x y", "x y y") == pytest.approx(2 / 3)
    assert rag_eval.token_f1("completely different", "atomic") == 0.0
    assert rag_eval.token_f1("", "atomic") == 0.0
    assert rag_eval.token_f1("the", "a") == 1.0  # both empty after normalization


def test_overlaps_is_half_open():
    assert not rag_eval.overlaps((0, 5), (5, 10))
    assert not rag_eval.overlaps((5, 10), (0, 5))
    assert rag_eval.overlaps((0, 6), (5, 10))
    assert rag_eval.overlaps((3, 4), (0, 10))  # contained
    assert rag_eval.overlaps((0, 10), (3, 4))  # containing


def test_recall_and_reciprocal_rank():
    ranking = [False, False, True, True]
    assert rag_eval.recall_at_k(ranking, 1) == 0.0
    assert rag_eval.recall_at_k(ranking, 2) == 0.0
    assert rag_eval.recall_at_k(ranking, 3) == 1.0
    assert rag_eval.recall_at_k([], 5) == 0.0
    assert rag_eval.reciprocal_rank(ranking, 10) == pytest.approx(1 / 3)
    assert rag_eval.reciprocal_rank(ranking, 2) == 0.0
    assert rag_eval.reciprocal_rank([False] * 10 + [True], 10) == 0.0  # rank 11 is past the cutoff
    assert rag_eval.reciprocal_rank([True], 10) == 1.0


def test_ndcg_binary():
    # relevant at ranks 2 and 4, two relevant in all: DCG = 1/log2(3) + 1/log2(5) = 0.63093 + 0.43068,
    # IDCG = 1/log2(2) + 1/log2(3) = 1 + 0.63093, nDCG = 1.061606 / 1.630930 = 0.650921
    assert rag_eval.ndcg_at_k([False, True, False, True], 10, 2) == pytest.approx(0.650921, abs=1e-6)
    assert rag_eval.ndcg_at_k([True, True, False], 10, 2) == 1.0
    # one relevant item found at rank 1, but three exist: IDCG = 1 + 1/log2(3) + 1/log2(4) = 2.13093
    assert rag_eval.ndcg_at_k([True], 10, 3) == pytest.approx(1 / (1 + 1 / math.log2(3) + 0.5))
    assert rag_eval.ndcg_at_k([False, True], 1, 1) == 0.0  # rank 2 is past the cutoff
    assert rag_eval.ndcg_at_k([False], 10, 0) == 0.0  # nothing relevant exists


def test_fixed_windows():
    assert rag_eval.fixed_windows(10, 4, 1) == [(0, 4), (3, 7), (6, 10)]
    assert rag_eval.fixed_windows(400, 192, 32) == [(0, 192), (160, 352), (320, 400)]
    assert rag_eval.fixed_windows(192, 192, 32) == [(0, 192)]
    assert rag_eval.fixed_windows(5, 192, 32) == [(0, 5)]
    assert rag_eval.fixed_windows(0, 192, 32) == []


def test_naive_records_cut_on_token_offsets():
    text = "alpha beta. gamma delta\n\nepsilon zeta eta theta iota"
    vocab = {w: i for i, w in enumerate(["[UNK]", *text.replace(".", " .").split()])}
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()  # 10 tokens: the "." is one
    records = rag_eval.naive_records("/docs/a.html", text, tok, window=4, overlap=1)
    # token windows [0, 4) [3, 7) [6, 10): cut mid-sentence and across the paragraph break
    assert [r.text for r in records] == [
        "alpha beta. gamma",
        "gamma delta\n\nepsilon zeta",
        "zeta eta theta iota",
    ]
    assert [r.n_tokens for r in records] == [4, 4, 4]
    for r in records:
        assert text[r.start : r.end] == r.text
        assert r.metadata["source"] == "/docs/a.html"
    assert len({r.id for r in records}) == len(records)


def test_gold_item_relevance_needs_the_page_and_an_overlap():
    item = rag_eval.GoldItem(
        "q1", "?", True, "lexical", "x", "library/os.html", "p", "/html/library/os.html", (100, 200)
    )
    assert item.relevant("/usr/share/doc/python3.11/html/library/os.html", (150, 300))
    assert not item.relevant("/usr/share/doc/python3.11/html/library/os.html", (200, 300))
    assert not item.relevant("/usr/share/doc/python3.11/html/c-api/library/os.htmlx", (150, 300))
    assert not item.relevant("/usr/share/doc/python3.11/html/library/posix/os.html", (150, 300))
    unanswerable = rag_eval.GoldItem("q2", "?", False, None, None, None, None, None, None)
    assert not unanswerable.relevant("/html/library/os.html", (0, 10))
