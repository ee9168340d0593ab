"""BM25's terms (lmstack/rag/lexical.py) and what they let the embedded store find: command-line options
with their case, dotted names and expressions, which a word tokenizer reads as nothing or as other words."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lmstack.rag import lexical
from lmstack.rag.embedded import EmbeddedStore
from lmstack.rag.lexical import code_terms, lexical_terms
from lmstack.rag.store import Record


@pytest.mark.parametrize(
    ("text", "terms"),
    [
        ("What does the -B command-line option do?", ["-B", "command-line"]),
        ("-X dev: enable Python Development Mode", ["-X"]),
        ("pass --help or -h", ["--help", "-h"]),
        ("-b and -B differ", ["-b", "-B"]),  # an option keeps its case
        ("see os.path.join() and (os.replace).", ["os.path.join", "os.replace"]),
        ("-1**2 results in -1.", ["-1**2", "-1"]),  # no letter after the dash: expressions, not options
        ("add_argument('foo', nargs='+')", ["nargs='+"]),  # the closing quote goes, as in a question's
        ("def f(*args, **KWARGS):", ["*args", "**kwargs"]),
        ("Plain words, nothing else; really!", []),
        ("a - b + c", []),  # operators alone are not terms
    ],
)
def test_code_terms(text: str, terms: list[str]) -> None:
    assert code_terms(text) == terms


def test_lexical_terms_are_stemmed_words_then_code_terms() -> None:
    (terms,) = lexical_terms(["The replacing is atomic: os.replace() -B"])
    assert terms == ["replac", "atom", "os", "replac", "os.replace", "-B"]  # "the", "is" are stopwords
    assert lexical_terms(["", "   "]) == [[], []]
    # the same function reads questions, so a question's terms meet a chunk's
    assert lexical_terms(["Is os.replace atomic?"])[0][-1] == "os.replace"


OPTIONS = {
    "-b": "-b\nIssue a warning when comparing bytes or bytearray with str, or bytes with int.",
    "-B": "-B\nIf given, Python won't try to write .pyc files on the import of source modules.",
    "-x": "-x\nSkip the first row of the source, allowing use of non-Unix forms of #!cmd.",
    "-X": "-X\n-X dev: enable Python Development Mode, with runtime checks too expensive by default.",
    "power": "The power operator binds more tightly than unary operators on its left: -1**2 results in -1.",
    "unary": "The unary - (minus) operator yields the negation of its numeric argument; 1 and 2 are numbers.",
    "dev": "Development tools: the dev guide explains how a development build is made and enabled.",
}


def option_store(folder: Path) -> EmbeddedStore:
    store = EmbeddedStore.open(folder, "options", create=True, dim=4, info={})
    records, offset = [], 0
    for key, text in OPTIONS.items():
        records.append(Record(key, "cmdline.html", text, offset, offset + len(text), None, (), 10, None, {}))
        offset += len(text) + 1
    vectors = np.eye(4, dtype=np.float32)[np.arange(len(records)) % 4]
    store.replace_source("cmdline.html", "v1", records, vectors, [])
    return store


def test_options_expressions_and_case_are_found(tmp_path: Path) -> None:
    with option_store(tmp_path) as store:
        assert store.lexical_search("What does the -B command-line option do?", 3)[0][0] == "-B"
        assert store.lexical_search("what does -b warn about", 3)[0][0] == "-b"
        assert store.lexical_search("What does the -X dev option turn on?", 3)[0][0] == "-X"
        assert store.lexical_search("What does -1**2 evaluate to?", 3)[0][0] == "power"


def test_an_index_saved_with_other_terms_is_rebuilt(tmp_path: Path) -> None:
    with option_store(tmp_path) as store:
        pass  # closing flushes: the index is saved with this version's terms
    meta = tmp_path / "options" / "bm25.json"
    saved = json.loads(meta.read_text())
    assert saved["terms"] == lexical.VERSION
    meta.write_text(json.dumps({**saved, "terms": lexical.VERSION - 1}))  # as an older lmstack left it
    with EmbeddedStore.open(tmp_path, "options") as store:
        assert store.lexical_search("-B", 3)[0][0] == "-B"
    assert json.loads(meta.read_text())["terms"] == lexical.VERSION
