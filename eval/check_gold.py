"""Validate the Python-docs RAG gold set (eval/data/python_docs_gold.jsonl) against the HTML it cites.

Each answerable item's `source` page is loaded with `lmstack.rag.load_file`; its `passage` must be a
verbatim substring of the loaded `.text` and its short `answer` must occur in the passage
(case-insensitive). Unanswerable items must have null answer/source/passage. Ids must be unique.
Prints counts (answerable, unanswerable, distinct pages, pages per top-level directory) and exits 1
listing every problem found, 0 when the set is clean.

    .venv/bin/python eval/check_gold.py [--docs DIR] [--gold FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

from lmstack.rag import DocumentError, load_file

DEFAULT_DOCS = Path("/usr/share/doc/python3.11-doc/html")
DEFAULT_GOLD = Path(__file__).resolve().parent / "data" / "python_docs_gold.jsonl"
FIELDS = ("id", "question", "answer", "source", "passage", "answerable")
PASSAGE_CHARS = (30, 400)
ANSWER_MAX_WORDS = 8
EXCLUDED_PREFIXES = ("_sources/", "_static/", "_downloads/", "genindex")
EXCLUDED_PAGES = ("search.html", "py-modindex.html")


def _top_dir(source: str) -> str:
    return source.split("/", 1)[0] if "/" in source else source


def check(gold: Path, docs: Path) -> tuple[list[str], dict]:
    problems: list[str] = []
    items: list[dict] = []
    try:
        lines = gold.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        return [f"{gold}: cannot be read ({e.strerror or e})"], {}
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(f"line {n}: invalid JSON ({e.msg})")
            continue
        if not isinstance(item, dict):
            problems.append(f"line {n}: not a JSON object")
            continue
        item["_line"] = n
        items.append(item)

    ids = Counter(item.get("id") for item in items)
    for dup, count in ids.items():
        if count > 1:
            problems.append(f"id {dup!r} is used {count} times")

    texts: dict[str, str | None] = {}  # source -> loaded text (None when it failed to load)
    answerable = unanswerable = 0
    for item in items:
        where = f"line {item['_line']} ({item.get('id', '?')})"
        missing = [f for f in FIELDS if f not in item]
        if missing:
            problems.append(f"{where}: missing field(s) {', '.join(missing)}")
            continue
        if not isinstance(item["id"], str) or not item["id"]:
            problems.append(f"{where}: id must be a non-empty string")
        if not isinstance(item["question"], str) or not item["question"].strip():
            problems.append(f"{where}: question must be a non-empty string")
        if item["answerable"] is False:
            unanswerable += 1
            for f in ("answer", "source", "passage"):
                if item[f] is not None:
                    problems.append(f"{where}: unanswerable item must have {f} = null")
            continue
        if item["answerable"] is not True:
            problems.append(f"{where}: answerable must be true or false, got {item['answerable']!r}")
            continue
        answerable += 1
        answer, source, passage = item["answer"], item["source"], item["passage"]
        if not all(isinstance(v, str) and v.strip() for v in (answer, source, passage)):
            problems.append(f"{where}: answer, source and passage must be non-empty strings")
            continue
        if source.startswith(EXCLUDED_PREFIXES) or source in EXCLUDED_PAGES:
            problems.append(f"{where}: source {source} is an excluded page (index, search or sources)")
        if not PASSAGE_CHARS[0] <= len(passage) <= PASSAGE_CHARS[1]:
            low, high = PASSAGE_CHARS
            problems.append(f"{where}: passage is {len(passage)} characters, outside {low}-{high}")
        if len(answer.split()) > ANSWER_MAX_WORDS:
            problems.append(f"{where}: answer has {len(answer.split())} words, more than {ANSWER_MAX_WORDS}")
        if answer.lower() not in passage.lower():
            problems.append(f"{where}: answer {answer!r} does not occur in the passage")
        if source not in texts:
            try:
                texts[source] = load_file(docs / source).text
            except DocumentError as e:
                texts[source] = None
                problems.append(f"{where}: source cannot be loaded: {e}")
        text = texts[source]
        if text is not None and passage not in text:
            problems.append(f"{where}: passage is not a verbatim substring of {source} ({passage[:60]!r}...)")

    pages = sorted(s for s, t in texts.items() if t is not None)
    stats = {
        "items": len(items),
        "answerable": answerable,
        "unanswerable": unanswerable,
        "distinct_pages": len(pages),
        "pages_by_dir": dict(sorted(Counter(_top_dir(p) for p in pages).items())),
        "questions_by_dir": dict(
            sorted(
                Counter(
                    _top_dir(i["source"])
                    for i in items
                    if i.get("answerable") is True and isinstance(i.get("source"), str)
                ).items()
            )
        ),
    }
    return problems, stats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=Path, default=DEFAULT_DOCS, help=f"HTML root (default {DEFAULT_DOCS})")
    parser.add_argument("--gold", type=Path, default=DEFAULT_GOLD, help="gold JSONL file")
    args = parser.parse_args(argv)
    if not args.docs.is_dir():
        print(f"{args.docs}: not a folder; install python3.11-doc or pass --docs DIR", file=sys.stderr)
        return 2
    problems, stats = check(args.gold, args.docs)
    if stats:
        print(f"{args.gold}: {stats['items']} items")
        print(f"  answerable: {stats['answerable']}  unanswerable: {stats['unanswerable']}")
        print(f"  distinct pages: {stats['distinct_pages']}")
        print("  pages by dir:     " + ", ".join(f"{k} {v}" for k, v in stats["pages_by_dir"].items()))
        print("  questions by dir: " + ", ".join(f"{k} {v}" for k, v in stats["questions_by_dir"].items()))
    if problems:
        print(f"{len(problems)} problem(s):", file=sys.stderr)
        for p in problems:
            print(f"  - {p}", file=sys.stderr)
        return 1
    print("OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
