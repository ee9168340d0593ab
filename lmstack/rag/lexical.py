"""The lexical retriever's terms: what BM25 counts in a chunk and in a question (the embedded store's index).

Technical documentation names things in ways a word tokenizer destroys. A plain `\\w\\w+` tokenizer reads
`-B` and `-X dev` as nothing and "dev" (one-letter words are dropped, and case is lost: `-b` and `-B` are
different options), `-1**2` as nothing, `nargs='+'` as "nargs". So beside the usual words (lowercased,
English stopwords dropped, Snowball-stemmed) each text also yields its code terms, kept whole:

    command-line options    -B  -X  --help        case kept: `-b` is a different option from `-B`
    dotted names            os.path.join  str.format
    expressions             -1**2  nargs='+'  a|b  **kwargs  (a token with an operator and a letter or digit)

Code terms are counted in addition to their words, so `os.replace` matches a chunk that says `os.replace`
more than one that says "os" and "replace" apart. Adding them lifted BM25's recall@5 on the Python-docs
gold set from 0.712 to 0.740 and hybrid retrieval's from 0.769 to 0.798 (docs/benchmarks.md).
"""

from __future__ import annotations

import re

# bumped whenever the terms a text yields change: a saved index with another version is rebuilt
VERSION = 2

STOPWORDS = frozenset(
    """a about also an and any are as at be been being but by can could did do does doing done each for from
    get gets had has have how i if in into is it its may me might must my no not of on one or our should so
    some than that the their them then there these they this to use used uses using was we were what when
    where which who why will with would you your""".split()
)

_WORD = re.compile(r"\b\w\w+\b")
_OPTION = re.compile(r"--?[A-Za-z][\w-]*")
_OPERATORS = frozenset("*+/%<>=!&|^~@-.")
_PIECES = re.compile(r"[\s()\[\]{},;]+")  # whitespace, brackets and separators end a term
_QUOTES, _PUNCTUATION = "'\"`", ".:!?'\"`"  # stripped before a term and after it


def code_terms(text: str) -> list[str]:
    """The pieces of `text` between whitespace, brackets and separators that are code: options (case
    kept), dotted names and expressions (lowercased), without the quotes and punctuation around them."""
    terms = []
    for piece in _PIECES.split(text):
        term = piece.lstrip(_QUOTES).rstrip(_PUNCTUATION)
        if len(term) < 2:
            continue
        if _OPTION.fullmatch(term):
            terms.append(term)
        elif any(c in _OPERATORS for c in term) and any(c.isalnum() for c in term):
            terms.append(term.lower())
    return terms


def lexical_terms(texts: list[str]) -> list[list[str]]:
    """Each text's BM25 terms: its stemmed words, then its code terms. The same for chunks and questions."""
    import Stemmer

    stemmer = Stemmer.Stemmer("english")  # one per call: stemmer objects are not thread-safe
    out = []
    for text in texts:
        words = [w for w in _WORD.findall(text.lower()) if w not in STOPWORDS]
        out.append(stemmer.stemWords(words) + code_terms(text))
    return out
