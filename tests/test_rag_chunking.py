"""lmstack.rag.chunking: invariants (exact spans, full coverage, token limit, one section per chunk) with a
whitespace counter and a real byte-level BPE from `tokenizers`, plus where chunks break."""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from lmstack.rag.chunking import Chunk, chunk_document, token_counter
from lmstack.rag.documents import Document, load_file


def words(text: str) -> int:
    return len(text.split())


WORDS = "the a model token chunk page retrieval answer source engine cache prompt server fox".split()


def random_text(seed: int, paragraphs: int = 12) -> str:
    rng = random.Random(seed)
    paras = []
    for _ in range(paragraphs):
        sentences = [
            " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 25))).capitalize() + rng.choice(".!?")
            for _ in range(rng.randint(1, 8))
        ]
        paras.append(" ".join(sentences) if rng.random() < 0.8 else "\n".join(sentences))
    if rng.random() < 0.5:
        paras.insert(rng.randrange(len(paras)), "x" * rng.randint(50, 400))  # a word longer than any chunk
    return "\n\n".join(paras) + "\n"


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([random_text(s) for s in range(20)], trainer)
    return tok


def doc_from(tmp_path: Path, name: str, text: str) -> Document:
    f = tmp_path / name
    f.write_text(text)
    return load_file(f)


def check_invariants(doc: Document, chunks: list[Chunk], count: Callable[[str], int], limit: int) -> None:
    covered = [False] * len(doc.text)
    for c in chunks:
        assert c.text == doc.text[c.start : c.end] and c.span == (c.start, c.end)
        assert c.text == c.text.strip() and c.text
        assert c.n_tokens == count(c.text) <= limit
        section = doc.section_at(c.start)
        assert c.end <= section.end, "a chunk crosses a section boundary"
        assert (c.page, c.heading_path) == (section.page, section.heading_path)
        assert c.source == doc.source
        for i in range(c.start, c.end):
            covered[i] = True
    missing = [i for i, ch in enumerate(doc.text) if not ch.isspace() and not covered[i]]
    assert missing == [], f"uncovered characters at {missing[:10]}"
    assert len({c.id for c in chunks}) == len(chunks)
    starts = [c.start for c in chunks]
    assert starts == sorted(starts)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize(("limit", "overlap"), [(8, 0), (16, 4), (64, 16), (256, 32)])
def test_invariants_whitespace(tmp_path: Path, seed: int, limit: int, overlap: int) -> None:
    doc = doc_from(tmp_path, "a.txt", random_text(seed))
    chunks = chunk_document(doc, words, chunk_tokens=limit, overlap_tokens=overlap)
    check_invariants(doc, chunks, words, limit)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize(("limit", "overlap"), [(8, 2), (32, 8), (128, 32)])
def test_invariants_bpe(tmp_path: Path, bpe: Tokenizer, seed: int, limit: int, overlap: int) -> None:
    text = "# Intro\n\n" + random_text(100 + seed, 4) + "\n## Details\n\n" + random_text(200 + seed, 6)
    doc = doc_from(tmp_path, "a.md", text)
    chunks = chunk_document(doc, bpe, chunk_tokens=limit, overlap_tokens=overlap)
    check_invariants(doc, chunks, token_counter(bpe), limit)
    assert {c.heading_path for c in chunks} == {("Intro",), ("Intro", "Details")}


def test_whole_section_in_one_chunk_and_sections_not_merged(tmp_path: Path) -> None:
    doc = doc_from(tmp_path, "a.md", "# A\n\nshort one.\n\n# B\n\nshort two.\n\n## C\n\nshort three.\n")
    chunks = chunk_document(doc, words, chunk_tokens=64, overlap_tokens=8)
    assert [(c.text, c.heading_path) for c in chunks] == [
        ("# A\n\nshort one.", ("A",)),
        ("# B\n\nshort two.", ("B",)),
        ("## C\n\nshort three.", ("B", "C")),
    ]


def test_pdf_chunks_keep_pages(tmp_path: Path) -> None:
    from test_rag_documents import make_pdf

    f = tmp_path / "r.pdf"
    f.write_bytes(make_pdf(["alpha beta gamma.\ndelta epsilon.", "zeta eta theta."]))
    doc = load_file(f)
    chunks = chunk_document(doc, words, chunk_tokens=8, overlap_tokens=0)
    assert [c.page for c in chunks] == [1, 2]
    check_invariants(doc, chunks, words, 8)


def test_breaks_at_paragraphs_then_sentences(tmp_path: Path) -> None:
    para = "One two three four five. Six seven eight nine ten."  # 10 words, 2 sentences
    doc = doc_from(tmp_path, "a.txt", "\n\n".join([para] * 6))
    chunks = chunk_document(doc, words, chunk_tokens=25, overlap_tokens=0)
    assert [words(c.text) for c in chunks] == [20, 20, 20]
    assert all(c.text.endswith("ten.") and c.text.startswith("One") for c in chunks)
    chunks = chunk_document(doc, words, chunk_tokens=8, overlap_tokens=0)  # a paragraph no longer fits
    assert {c.text for c in chunks} == {"One two three four five.", "Six seven eight nine ten."}


def test_never_cuts_inside_a_word(tmp_path: Path) -> None:
    doc = doc_from(tmp_path, "a.txt", " ".join(["antidisestablishment"] * 40))
    chunks = chunk_document(doc, len, chunk_tokens=64, overlap_tokens=0)  # one token per character
    for c in chunks:
        assert re.fullmatch(r"antidisestablishment( antidisestablishment)*", c.text)
    check_invariants(doc, chunks, len, 64)


def test_word_longer_than_chunk_is_cut(tmp_path: Path) -> None:
    doc = doc_from(tmp_path, "a.txt", "short " + "y" * 50 + " tail")
    check_invariants(doc, chunk_document(doc, len, chunk_tokens=16, overlap_tokens=4), len, 16)
    chunks = chunk_document(doc, len, chunk_tokens=16, overlap_tokens=0)
    assert "".join(c.text for c in chunks).replace(" ", "") == doc.text.replace(" ", "").strip()


def test_overlap(tmp_path: Path) -> None:
    doc = doc_from(tmp_path, "a.txt", " ".join(f"w{i}" for i in range(100)))
    chunks = chunk_document(doc, words, chunk_tokens=20, overlap_tokens=5)
    check_invariants(doc, chunks, words, 20)
    for a, b in zip(chunks, chunks[1:], strict=False):
        assert a.start < b.start < a.end < b.end
        assert words(doc.text[b.start : a.end]) == 5
    no_overlap = chunk_document(doc, words, chunk_tokens=20, overlap_tokens=0)
    assert [words(c.text) for c in no_overlap] == [20] * 5


def test_ids_stable_and_content_addressed(tmp_path: Path) -> None:
    doc = doc_from(tmp_path, "a.txt", random_text(7))
    first = chunk_document(doc, words, chunk_tokens=32, overlap_tokens=8)
    again = chunk_document(load_file(doc.source), words, chunk_tokens=32, overlap_tokens=8)
    assert [c.id for c in first] == [c.id for c in again]
    assert all(re.fullmatch(r"[0-9a-f]{16}", c.id) for c in first)
    edited = doc_from(tmp_path, "a.txt", doc.text[0].lower() + doc.text[1:])
    assert chunk_document(edited, words, chunk_tokens=32, overlap_tokens=8)[0].id != first[0].id


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        (dict(chunk_tokens=7), "chunk_tokens"),
        (dict(chunk_tokens=16, overlap_tokens=16), "overlap_tokens"),
        (dict(overlap_tokens=-1), "overlap_tokens"),
    ],
)
def test_argument_validation(tmp_path: Path, kwargs: dict, field: str) -> None:
    doc = doc_from(tmp_path, "a.txt", "text")
    with pytest.raises(ValueError, match=field):
        chunk_document(doc, words, **kwargs)


def test_tokenizer_must_count() -> None:
    with pytest.raises(TypeError, match="encode"):
        token_counter(42)  # type: ignore[arg-type]
