"""Files -> `Document`: plain text plus sections that map every character to its page or heading path.

A document's `text` is what later stages cut into chunks and cite by character span, so each loader keeps
one text per file and a partition of it into `Section`s: PDF pages (1-based) or the heading path (markdown
`#`, reStructuredText underlined titles, HTML h1-h6) in force at that character. Text files must be UTF-8;
anything else is refused with the reason rather than guessed at.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from hashlib import sha256
from pathlib import Path
from typing import Any, NamedTuple

SUPPORTED_SUFFIXES = (".txt", ".md", ".rst", ".html", ".htm", ".pdf")


class DocumentError(ValueError):
    """A file that cannot become a Document; the message names the file, the problem and the fix."""


class Section(NamedTuple):
    start: int  # first character in Document.text
    end: int  # one past the last character
    page: int | None  # 1-based PDF page, None for other formats
    heading_path: tuple[str, ...]  # enclosing headings, outermost first; () before the first heading


@dataclass(frozen=True)
class Document:
    source: str  # resolved path of the file
    text: str
    sections: tuple[Section, ...]  # contiguous, cover [0, len(text)) exactly
    sha256: str  # of `text`, so re-indexing can skip unchanged documents

    def section_at(self, char: int) -> Section:
        for section in self.sections:
            if section.start <= char < section.end:
                return section
        raise IndexError(f"character {char} is outside {self.source} (length {len(self.text)})")


@dataclass(frozen=True)
class Skipped:
    path: str
    reason: str


@dataclass
class LoadResult:
    documents: list[Document] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)  # files in a folder that did not load, with why


# --------------------------------------------------------------------------------------------- assembling


def _document(path: Path, text: str, marks: list[tuple[int, int | None, tuple[str, ...]]]) -> Document:
    """`marks`: (start, page, heading_path) where each section begins, in order; they become a partition."""
    if not text.strip():
        raise DocumentError(f"{path}: no text after extraction (empty document); remove it or add content")
    if not marks or marks[0][0] != 0:
        marks = [(0, None, ()), *marks]
    sections: list[Section] = []
    for i, (start, page, heading) in enumerate(marks):
        end = marks[i + 1][0] if i + 1 < len(marks) else len(text)
        if end > start:
            sections.append(Section(start, end, page, heading))
    return Document(str(path), text, tuple(sections), sha256(text.encode("utf-8")).hexdigest())


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise DocumentError(f"{path}: cannot be read ({e.strerror or e}); check its permissions") from e


def _read_text(path: Path) -> str:
    data = _read_bytes(path)
    if b"\x00" in data:
        raise DocumentError(f"{path}: binary file (contains NUL bytes); only text, HTML and PDF files load")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DocumentError(
            f"{path}: not UTF-8 text (invalid byte at offset {e.start}); convert it to UTF-8 first"
        ) from e
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _push_heading(stack: list[tuple[int, str]], level: int, title: str) -> tuple[str, ...]:
    while stack and stack[-1][0] >= level:
        stack.pop()
    stack.append((level, title))
    return tuple(t for _, t in stack)


# ------------------------------------------------------------------------------------------------ formats


def load_txt(path: Path) -> Document:
    return _document(path, _read_text(path), [])


_MD_HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.*?)(?:[ \t]+#+)?[ \t]*$")
_MD_FENCE = re.compile(r"^ {0,3}(```|~~~)")


def load_markdown(path: Path) -> Document:
    text = _read_text(path)
    marks: list[tuple[int, int | None, tuple[str, ...]]] = []
    stack: list[tuple[int, str]] = []
    fence: str | None = None
    pos = 0
    for line in text.splitlines(keepends=True):
        if m := _MD_FENCE.match(line):
            fence = None if fence == m.group(1) else (fence or m.group(1))
        elif fence is None and (m := _MD_HEADING.match(line.rstrip("\n"))):
            marks.append((pos, None, _push_heading(stack, len(m.group(1)), m.group(2).strip())))
        pos += len(line)
    return _document(path, text, marks)


_RST_ADORNMENT = re.compile(r"^([!-/:-@\[-`{-~])\1{2,}\s*$")


def load_rst(path: Path) -> Document:
    """A title is a line underlined (optionally also overlined) by one repeated punctuation character;
    levels follow the order in which adornment styles first appear, as docutils does."""
    text = _read_text(path)
    lines = text.splitlines(keepends=True)
    offsets = [0]
    for line in lines:
        offsets.append(offsets[-1] + len(line))
    styles: list[tuple[str, bool]] = []
    marks: list[tuple[int, int | None, tuple[str, ...]]] = []
    stack: list[tuple[int, str]] = []
    for i in range(1, len(lines)):
        under, title = lines[i].strip(), lines[i - 1].strip()
        if not _RST_ADORNMENT.match(lines[i]) or not title or _RST_ADORNMENT.match(lines[i - 1]):
            continue
        if len(under) < len(title) or (
            i >= 2 and lines[i - 2].strip() and not _RST_ADORNMENT.match(lines[i - 2])
        ):
            continue  # not a title: short underline, or the "title" continues a paragraph
        over = i >= 2 and lines[i - 2].strip() == under
        style = (under[0], over)
        if style not in styles:
            styles.append(style)
        start = offsets[i - 2] if over else offsets[i - 1]
        marks.append((start, None, _push_heading(stack, styles.index(style) + 1, title)))
    return _document(path, text, marks)


_DROP_ALWAYS = ("nav", "aside", "script", "style", "noscript", "template")
_BLOCKS = frozenset(
    "address article blockquote dd div dl dt figcaption figure footer form h1 h2 h3 h4 h5 h6 header hr li "
    "main ol p pre section table tbody thead tfoot tr ul".split()
)
_SEPARATORS = {"": 0, " ": 1, "\n": 2, "\n\n": 3}


class _TextBuilder:
    """Joins HTML text nodes with the lightest separator the markup asks for (space, line, paragraph)."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.length = 0
        self.pending = ""

    def separate(self, sep: str) -> None:
        if self.length and _SEPARATORS[sep] > _SEPARATORS[self.pending]:
            self.pending = sep

    def next_start(self) -> int:
        return self.length + len(self.pending)

    def add(self, text: str) -> None:
        if text:
            self.parts.append(self.pending + text)
            self.length += len(self.pending) + len(text)
            self.pending = ""


def _api_entry(dt: Any) -> str | None:
    """The name an API reference entry documents: Sphinx (and pydoc-style) pages render each function,
    class, method or attribute as <dl><dt class="sig ..." id="os.path.splitext">signature</dt><dd>...</dd>.
    The entry becomes a heading below the page's own, so its chunks say which API they describe (the
    sentences themselves rarely repeat the name) and no chunk mixes two entries."""
    classes = dt.get("class") or []
    ident = dt.get("id")
    if not (isinstance(ident, str) and ident and "sig" in classes):
        return None
    if re.fullmatch(r"[\w.]+", ident):  # a dotted name: json.JSONEncoder.default
        return ident
    text = re.sub(r"\s+", " ", dt.get_text(" ", strip=True))  # an option: "--indent, --tab"
    return re.sub(r" ,", ",", text) or None


def _entry_level(dl: Any) -> int:
    """Heading level of the entries directly in <dl> `dl`: below h6, one deeper per enclosing <dl> (a
    class's methods sit under the class)."""
    return 6 + len(dl.find_parents("dl"))


def load_html(path: Path) -> Document:
    """Main text only: the first of <main>, role=main or a lone <article> when present, else <body>; nav,
    aside, scripts and styles go, and outside a main/article root header and footer go too (inside one the
    <header> holds the title, so it stays)."""
    from bs4 import BeautifulSoup, NavigableString, Tag
    from bs4.element import PreformattedString

    soup = BeautifulSoup(_read_text(path), "lxml")
    articles = soup.find_all("article")
    root = (
        soup.find("main")
        or soup.find(True, attrs={"role": "main"})
        or (articles[0] if len(articles) == 1 else None)
    )
    drop = _DROP_ALWAYS + (("footer",) if root is not None else ("header", "footer"))
    root = root or soup.body or soup
    for tag in root.find_all(drop):
        tag.decompose()
    for tag in root.select("a.headerlink"):  # Sphinx/MkDocs permalink anchors: a pilcrow after each heading
        tag.decompose()
    out = _TextBuilder()
    marks: list[tuple[int, int | None, tuple[str, ...]]] = []
    heading_stack: list[tuple[int, str]] = []
    # (closing, node) on an explicit stack: deep markup cannot hit the recursion limit
    todo: list[tuple[bool, object]] = [(False, root)]
    while todo:
        closing, node = todo.pop()
        if isinstance(node, PreformattedString):  # comments, doctype, CDATA
            continue
        if isinstance(node, NavigableString):
            in_pre = node.find_parent("pre") is not None
            text = str(node) if in_pre else re.sub(r"\s+", " ", str(node))
            if not in_pre and text.startswith(" "):
                out.separate(" ")
            out.add(text if in_pre else text.strip())
            if not in_pre and text.endswith(" "):
                out.separate(" ")
            continue
        if not isinstance(node, Tag):
            continue
        if node.name == "br":
            out.separate("\n")
        elif node.name in ("td", "th"):
            out.separate(" ")
        elif node.name in _BLOCKS:
            out.separate("\n\n")
        if closing:
            if node.name == "dl" and heading_stack and heading_stack[-1][0] > _entry_level(node):
                # the entries of this list end: the text after it is back under the enclosing heading
                while heading_stack and heading_stack[-1][0] > _entry_level(node):
                    heading_stack.pop()
                marks.append((out.next_start(), None, tuple(t for _, t in heading_stack)))
            continue
        if node.name in ("h1", "h2", "h3", "h4", "h5", "h6") and (title := node.get_text(" ", strip=True)):
            title = re.sub(r"\s+", " ", title)
            marks.append((out.next_start(), None, _push_heading(heading_stack, int(node.name[1]), title)))
        elif node.name == "dt" and (name := _api_entry(node)):
            level = _entry_level(node.parent) + 1
            marks.append((out.next_start(), None, _push_heading(heading_stack, level, name)))
        todo.append((True, node))
        todo.extend((False, child) for child in reversed(node.contents))
    return _document(path, "".join(out.parts), marks)


def load_pdf(path: Path) -> Document:
    from pypdf import PdfReader
    from pypdf.errors import DependencyError, PyPdfError

    data = _read_bytes(path)
    try:
        import io

        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted:
            try:
                opened = reader.decrypt("")  # owner-password-only PDFs open with an empty user password
            except DependencyError as e:
                raise DocumentError(
                    f"{path}: encrypted PDF needing another package ({e}); decrypt it first"
                ) from e
            if not opened:
                raise DocumentError(
                    f"{path}: encrypted PDF (password required); save a decrypted copy and load it"
                )
        marks: list[tuple[int, int | None, tuple[str, ...]]] = []
        parts: list[str] = []
        pos = 0
        for number, page in enumerate(reader.pages, start=1):
            page_text = (page.extract_text() or "").replace("\r\n", "\n").strip() + "\n\n"
            marks.append((pos, number, ()))
            parts.append(page_text)
            pos += len(page_text)
    except DocumentError:
        raise
    except (PyPdfError, ValueError, KeyError, TypeError, AttributeError, IndexError, OSError) as e:
        raise DocumentError(
            f"{path}: corrupt or unreadable PDF ({type(e).__name__}: {e}); re-export it"
        ) from e
    return _document(path, "".join(parts), marks)


def load_file(path: str | Path) -> Document:
    p = Path(path)
    if not p.exists():
        raise DocumentError(f"{p}: no such file or folder; check the path")
    p = p.resolve()
    if not p.is_file():
        raise DocumentError(f"{p}: not a regular file; pass a file or use load_path for folders")
    suffix = p.suffix.lower()
    if suffix == ".txt":
        return load_txt(p)
    if suffix == ".md":
        return load_markdown(p)
    if suffix == ".rst":
        return load_rst(p)
    if suffix in (".html", ".htm"):
        return load_html(p)
    if suffix == ".pdf":
        return load_pdf(p)
    raise DocumentError(
        f"{p}: unsupported file type {suffix or '(no extension)'!r}; "
        f"supported: {', '.join(SUPPORTED_SUFFIXES)}"
    )


# ---------------------------------------------------------------------------------------------- folders


def _is_hidden(rel: Path) -> bool:
    return any(part.startswith(".") for part in rel.parts)


def list_files(
    path: str | Path, include: tuple[str, ...] = ("**/*",), exclude: tuple[str, ...] = ()
) -> tuple[list[Path], list[Skipped]]:
    """The loadable files under `path` (itself if it is a file), resolved and sorted, and the files left
    out because of their type. A folder's files match an `include` glob and no `exclude` glob (an excluded
    folder takes its files with it), relative to the folder; hidden files and folders are left out."""
    root = Path(path)
    if not root.exists():
        raise DocumentError(f"{root}: no such file or folder; check the path")
    root = root.resolve()
    if root.is_file():
        return [root], []
    excluded = {p for pattern in exclude for p in root.glob(pattern)}
    files = sorted(
        {
            p
            for pattern in include
            for p in root.glob(pattern)
            if p.is_file() and p not in excluded and not excluded.intersection(p.parents)
        },
        key=lambda p: p.relative_to(root).as_posix(),
    )
    out, skipped = [], []
    for f in files:
        if _is_hidden(f.relative_to(root)):
            continue
        if f.suffix.lower() not in SUPPORTED_SUFFIXES:
            skipped.append(Skipped(str(f), f"unsupported file type {f.suffix or '(no extension)'!r}"))
        else:
            out.append(f.resolve())
    return out, skipped


def load_path(
    path: str | Path, include: tuple[str, ...] = ("**/*",), exclude: tuple[str, ...] = ()
) -> LoadResult:
    """One file (errors raise) or a folder (see `list_files`). A file in a folder that cannot load (binary,
    empty, encrypted ...) is listed in `skipped` with its reason instead of failing the whole folder."""
    files, skipped = list_files(path, include, exclude)
    if Path(path).resolve().is_file():
        return LoadResult(documents=[load_file(files[0])])
    result = LoadResult(skipped=skipped)
    for f in files:
        try:
            result.documents.append(load_file(f))
        except DocumentError as e:
            result.skipped.append(Skipped(str(f), str(e)))
    result.skipped.sort(key=lambda s: s.path)
    return result
