"""Document -> Chunks of at most `chunk_tokens` tokens, cut where the text itself breaks.

Each section (PDF page, heading) is chunked on its own, so a chunk never spans two pages or headings and
carries exactly one citation. Inside a section the text is split into units, coarsest first: paragraphs,
then sentences of a paragraph too long for a chunk, then words of a sentence too long, then characters of
a word longer than a chunk (the only place a word is cut). Units are packed greedily; a full chunk ends at
the strongest break in its second half, and the next starts up to `overlap_tokens` earlier, on a word.
Every chunk's text is `doc.text[start:end]`, so its span is its citation.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sized
from dataclasses import dataclass
from hashlib import sha256
from typing import Any, NamedTuple, Protocol

from lmstack.rag.documents import Document, Section


class _Encoder(Protocol):
    def encode(self, text: str) -> Any: ...


TokenCounter = Callable[[str], int] | _Encoder


@dataclass(frozen=True)
class Chunk:
    id: str  # sha256(source, start, end, text)[:16]: stable across runs, changes when the text does
    source: str  # Document.source
    text: str  # == document text[start:end]
    start: int
    end: int
    page: int | None  # of the section the chunk lies in
    heading_path: tuple[str, ...]
    n_tokens: int

    @property
    def span(self) -> tuple[int, int]:
        return (self.start, self.end)


class _Unit(NamedTuple):
    start: int
    end: int
    strength: int  # of the break after it: 3 paragraph, 2 sentence, 1 word, 0 inside a word


_GAPS = (
    re.compile(r"\n[ \t]*\n\s*"),  # paragraphs
    re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"')\]]))\s+|\s*\n\s*"),  # sentences (and lines)
    re.compile(r"\s+"),  # words
)


def sentences(text: str) -> list[str]:
    """The sentences (and lines) of a text, cut where the chunker cuts sentences; empty pieces dropped."""
    return [piece.strip() for piece in _GAPS[1].split(text) if piece.strip()]


def token_counter(tokenizer: TokenCounter) -> Callable[[str], int]:
    """A `str -> int` from a counting function or anything with `encode` (lmstack / tokenizers / HF)."""
    encode = getattr(tokenizer, "encode", None)
    if encode is None:
        if not callable(tokenizer):
            raise TypeError("tokenizer must be a callable str -> int or have an encode(str) method")
        return tokenizer

    def count(text: str) -> int:
        encoded = encode(text)
        ids = getattr(encoded, "ids", encoded)  # tokenizers.Encoding keeps its ids in .ids
        assert isinstance(ids, Sized)
        return len(ids)

    return count


def _pieces(text: str, start: int, end: int, gap: re.Pattern[str]) -> list[tuple[int, int]]:
    """Non-blank spans of text[start:end] between matches of `gap`, trimmed of whitespace."""
    spans, cur = [], start
    for m in gap.finditer(text, start, end):
        spans.append((cur, m.start()))
        cur = m.end()
    spans.append((cur, end))
    out = []
    for s, e in spans:
        segment = text[s:e]
        stripped = segment.strip()
        if stripped:
            s += len(segment) - len(segment.lstrip())
            out.append((s, s + len(stripped)))
    return out


def _split_word(text: str, start: int, end: int, count: Callable[[str], int], limit: int) -> list[_Unit]:
    units = []
    while start < end:
        lo, hi = start + 1, end  # longest prefix that fits, by bisection
        if count(text[start:lo]) > limit:
            raise ValueError(f"chunk_tokens={limit} is smaller than one character {text[start]!r}")
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if count(text[start:mid]) <= limit else (lo, mid - 1)
        units.append(_Unit(start, lo, 0))
        start = lo
    return units


def _units(
    text: str, start: int, end: int, count: Callable[[str], int], limit: int, level: int = 0
) -> list[_Unit]:
    """Spans of text[start:end] that each fit in `limit` tokens, coarse breaks first."""
    units: list[_Unit] = []
    for s, e in _pieces(text, start, end, _GAPS[level]):
        if count(text[s:e]) <= limit:
            units.append(_Unit(s, e, 3 - level))
        elif level + 1 < len(_GAPS):
            units.extend(_units(text, s, e, count, limit, level + 1))
        else:
            units.extend(_split_word(text, s, e, count, limit))
        units[-1] = units[-1]._replace(strength=3 - level)  # the break after the piece is this level's
    return units


def _fits(text: str, start: int, end: int, count: Callable[[str], int], limit: int) -> bool:
    return count(text[start:end]) <= limit


def _last_fitting(
    text: str, start: int, units: list[_Unit], i: int, count: Callable[[str], int], limit: int
) -> int:
    """Largest j >= i with text[start:units[j].end] within limit (galloping, then bisection)."""
    step, lo = 1, i
    while lo + step < len(units) and _fits(text, start, units[lo + step].end, count, limit):
        lo, step = lo + step, step * 2
    hi = min(lo + step, len(units)) - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if _fits(text, start, units[mid].end, count, limit) else (lo, mid - 1)
    return lo


def _best_cut(start: int, units: list[_Unit], i: int, j: int) -> int:
    """The strongest break among units[i..j] in the second half of the chunk (latest on a tie)."""
    half = start + (units[j].end - start) / 2
    candidates = [k for k in range(i, j + 1) if units[k].end >= half] or [j]
    return max(candidates, key=lambda k: (units[k].strength, k))


def _overlap_start(
    text: str, chunk: tuple[int, int], next_start: int, count: Callable[[str], int], overlap: int
) -> int:
    """Earliest word start inside the chunk whose tail to the chunk end fits in `overlap` tokens."""
    words = [m.start() for m in re.finditer(r"\S+", text[chunk[0] : chunk[1]])]
    starts = [chunk[0] + w for w in words if chunk[0] + w > chunk[0] and chunk[0] + w < next_start]
    lo, hi = 0, len(starts)  # counts shrink as the start moves right: bisect for the first that fits
    while lo < hi:
        mid = (lo + hi) // 2
        if count(text[starts[mid] : chunk[1]]) <= overlap:
            hi = mid
        else:
            lo = mid + 1
    return starts[lo] if lo < len(starts) else next_start


def _chunk_spans(
    text: str, section: Section, count: Callable[[str], int], limit: int, overlap: int
) -> list[tuple[int, int]]:
    units = _units(text, section.start, section.end, count, limit)
    spans: list[tuple[int, int]] = []
    i = 0
    start = units[0].start if units else 0
    while i < len(units):
        if not _fits(text, start, units[i].end, count, limit):
            start = units[i].start  # the overlap and the next unit don't fit together: drop the overlap
        j = _last_fitting(text, start, units, i, count, limit)
        cut = j if j + 1 == len(units) else _best_cut(start, units, i, j)
        while cut > i and not _fits(text, start, units[cut].end, count, limit):
            cut -= 1  # a tokenizer whose counts are not monotone in the prefix
        spans.append((start, units[cut].end))
        i = cut + 1
        if i < len(units):
            start = (
                units[i].start
                if overlap == 0
                else _overlap_start(text, spans[-1], units[i].start, count, overlap)
            )
    return spans


def chunk_document(
    doc: Document, tokenizer: TokenCounter, chunk_tokens: int = 256, overlap_tokens: int = 32
) -> list[Chunk]:
    if chunk_tokens < 8:
        raise ValueError(f"chunk_tokens must be >= 8, got {chunk_tokens}")
    if not 0 <= overlap_tokens < chunk_tokens:
        raise ValueError(f"overlap_tokens must be in [0, chunk_tokens={chunk_tokens}), got {overlap_tokens}")
    count = token_counter(tokenizer)
    chunks = []
    for section in doc.sections:
        for start, end in _chunk_spans(doc.text, section, count, chunk_tokens, overlap_tokens):
            text = doc.text[start:end]
            key = f"{doc.source}\0{start}\0{end}\0{text}".encode()
            chunks.append(
                Chunk(
                    id=sha256(key).hexdigest()[:16],
                    source=doc.source,
                    text=text,
                    start=start,
                    end=end,
                    page=section.page,
                    heading_path=section.heading_path,
                    n_tokens=count(text),
                )
            )
    return chunks
