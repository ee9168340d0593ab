"""lmstack.rag.documents on real files written to tmp_path: text, sections, errors, folders."""

from __future__ import annotations

import io
import os
from hashlib import sha256
from pathlib import Path

import pytest
from pypdf import PdfReader, PdfWriter

from lmstack.rag.documents import Document, DocumentError, load_file, load_path


def make_pdf(pages: list[str]) -> bytes:
    """A minimal valid PDF with one Helvetica text line per line of each page (pypdf cannot draw text)."""
    n = len(pages)
    objs = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        f"<< /Type /Pages /Kids [{' '.join(f'{4 + 2 * i} 0 R' for i in range(n))}] /Count {n} >>".encode(),
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    for i, text in enumerate(pages):
        esc = [
            line.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)") for line in text.split("\n")
        ]
        stream = (
            "BT /F1 12 Tf 14 TL 72 720 Td " + " ".join(f"({line}) Tj T*" for line in esc) + " ET"
        ).encode()
        objs.append(
            f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources << /Font << /F1 3 0 R >> >> "
            f"/Contents {5 + 2 * i} 0 R >>".encode()
        )
        objs.append(b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream")
    out, offsets = b"%PDF-1.4\n", []
    for k, obj in enumerate(objs, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % k + obj + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objs) + 1)
    out += b"".join(b"%010d 00000 n \n" % off for off in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objs) + 1, xref)
    return out


def heading_at(doc: Document, needle: str) -> tuple[str, ...]:
    return doc.section_at(doc.text.index(needle)).heading_path


def assert_partition(doc: Document) -> None:
    assert doc.sections[0].start == 0 and doc.sections[-1].end == len(doc.text)
    for a, b in zip(doc.sections, doc.sections[1:], strict=False):
        assert a.end == b.start and a.start < a.end


def test_txt(tmp_path: Path) -> None:
    f = tmp_path / "a.txt"
    f.write_bytes(b"\xef\xbb\xbfHello\r\nworld\n")
    doc = load_file(f)
    assert doc.text == "Hello\nworld\n"
    assert doc.source == str(f.resolve())
    assert doc.sha256 == sha256(doc.text.encode()).hexdigest()
    assert doc.sections == ((0, len(doc.text), None, ()),)


def test_markdown_heading_paths(tmp_path: Path) -> None:
    f = tmp_path / "guide.md"
    f.write_text(
        "intro line\n\n# Install\n\npip it.\n\n## Linux\n\napt it.\n\n```sh\n# not a heading\n```\n\n"
        "## macOS ##\n\nbrew it.\n\n# Usage\n\nrun it.\n"
    )
    doc = load_file(f)
    assert doc.text == f.read_text()
    assert_partition(doc)
    assert heading_at(doc, "intro line") == ()
    assert heading_at(doc, "pip it") == ("Install",)
    assert heading_at(doc, "# Install") == ("Install",)
    assert heading_at(doc, "apt it") == ("Install", "Linux")
    assert heading_at(doc, "not a heading") == ("Install", "Linux")
    assert heading_at(doc, "brew it") == ("Install", "macOS")
    assert heading_at(doc, "run it") == ("Usage",)


def test_rst_heading_paths(tmp_path: Path) -> None:
    f = tmp_path / "guide.rst"
    f.write_text(
        "=====\nGuide\n=====\n\nabout.\n\nInstall\n-------\n\npip it.\n\nLinux\n~~~~~\n\napt it.\n\n"
        "Usage\n-----\n\nrun it. A paragraph\nline that is not a title\n\n----\n\nafter a transition.\n"
    )
    doc = load_file(f)
    assert_partition(doc)
    assert heading_at(doc, "about.") == ("Guide",)
    assert heading_at(doc, "pip it") == ("Guide", "Install")
    assert heading_at(doc, "apt it") == ("Guide", "Install", "Linux")
    assert heading_at(doc, "run it") == ("Guide", "Usage")
    assert heading_at(doc, "after a transition") == ("Guide", "Usage")


HTML = """<!doctype html><html><head><title>T</title><style>p {color: red}</style></head><body>
<header><a href="/">Home</a> | <a href="/docs">Docs</a></header>
<nav><ul><li>Menu item</li></ul></nav>
<main>
  <h1>Guide</h1>
  <p>First   paragraph
     with <b>bold</b> text.</p>
  <!-- a comment -->
  <h2>Install</h2><p>pip it.<br>then run.</p>
  <script>var x = "script text";</script>
  <aside>Related links</aside>
  <pre>  code  keeps
spaces</pre>
  <h2>Usage</h2><ul><li>one</li><li>two</li></ul>
</main>
<footer>Copyright</footer>
</body></html>"""


def test_html_main_text_and_headings(tmp_path: Path) -> None:
    f = tmp_path / "page.html"
    f.write_text(HTML)
    doc = load_file(f)
    assert_partition(doc)
    for gone in ("Home", "Menu item", "script text", "Related links", "Copyright", "color: red", "a comment"):
        assert gone not in doc.text
    assert "First paragraph with bold text." in doc.text
    assert "pip it.\nthen run." in doc.text
    assert "  code  keeps\nspaces" in doc.text
    assert heading_at(doc, "First paragraph") == ("Guide",)
    assert heading_at(doc, "Install") == ("Guide", "Install")
    assert heading_at(doc, "then run") == ("Guide", "Install")
    assert heading_at(doc, "two") == ("Guide", "Usage")
    assert doc.text.startswith("Guide\n\nFirst")


API_HTML = """<html><body><div role="main"><section><h1>json</h1><p>Intro.</p>
<section><h2>Basic Usage</h2>
<dl class="py function"><dt class="sig sig-object py" id="json.dumps">json.<b>dumps</b>(obj)</dt>
<dd><p>If ensure_ascii is true, escape.</p></dd></dl>
<dl class="py class"><dt class="sig sig-object py" id="json.JSONEncoder">class json.JSONEncoder</dt>
<dd><p>Extensible encoder.</p>
<dl class="py method"><dt class="sig sig-object py" id="json.JSONEncoder.default">default(o)</dt>
<dd><p>Implement this in a subclass.</p></dd></dl>
<p>More about the class.</p></dd></dl>
<dl class="std option"><dt class="sig sig-object std" id="cmdoption-json.tool-indent">
<span>--indent</span>, <span>--tab</span></dt><dd><p>Whitespace control.</p></dd></dl>
<p>After the entries.</p>
<dl class="simple"><dt>term</dt><dd>plain definition list</dd></dl>
</section></section></div></body></html>"""


def test_html_api_entries_are_headings_below_the_page_headings(tmp_path: Path) -> None:
    """Sphinx API entries (<dt class="sig" id=...>) head their own sections, named by their id (a class's
    methods below the class), options by their text; after the list the page's heading is back."""
    f = tmp_path / "api.html"
    f.write_text(API_HTML)
    doc = load_file(f)
    assert_partition(doc)
    assert heading_at(doc, "Intro.") == ("json",)
    assert heading_at(doc, "If ensure_ascii") == ("json", "Basic Usage", "json.dumps")
    assert heading_at(doc, "Extensible") == ("json", "Basic Usage", "json.JSONEncoder")
    assert heading_at(doc, "Implement this") == (
        "json", "Basic Usage", "json.JSONEncoder", "json.JSONEncoder.default"
    )  # fmt: skip
    assert heading_at(doc, "More about the class") == ("json", "Basic Usage", "json.JSONEncoder")
    assert heading_at(doc, "Whitespace control") == ("json", "Basic Usage", "--indent, --tab")
    assert heading_at(doc, "After the entries") == ("json", "Basic Usage")
    assert heading_at(doc, "plain definition") == ("json", "Basic Usage")  # a <dt> without id: no heading


def test_html_without_main_drops_chrome(tmp_path: Path) -> None:
    f = tmp_path / "page.htm"
    f.write_text("<body><header>Site</header><nav>Nav</nav><div><p>Body text.</p></div><footer>F</footer>")
    doc = load_file(f)
    assert doc.text == "Body text."
    assert doc.sections[0].heading_path == ()


def test_pdf_pages(tmp_path: Path) -> None:
    f = tmp_path / "report.pdf"
    f.write_bytes(make_pdf(["Page one text.\nSecond line.", "Page two (text)."]))
    doc = load_file(f)
    assert_partition(doc)
    assert [s.page for s in doc.sections] == [1, 2]
    assert doc.section_at(doc.text.index("Second line")).page == 1
    assert doc.section_at(doc.text.index("Page two (text).")).page == 2


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(DocumentError, match="no such file"):
        load_file(tmp_path / "nope.txt")
    with pytest.raises(DocumentError, match="no such file"):
        load_path(tmp_path / "nope")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file(tmp_path: Path) -> None:
    f = tmp_path / "secret.txt"
    f.write_text("x")
    f.chmod(0)
    with pytest.raises(DocumentError, match="cannot be read"):
        load_file(f)


def test_unreadable_path_is_not_a_file(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe.txt")
    with pytest.raises(DocumentError, match="not a regular file"):
        load_file(tmp_path / "pipe.txt")


def test_encrypted_pdf(tmp_path: Path) -> None:
    writer = PdfWriter(clone_from=PdfReader(io.BytesIO(make_pdf(["secret text"]))))
    writer.encrypt("hunter2", algorithm="RC4-128")
    f = tmp_path / "locked.pdf"
    writer.write(f)
    with pytest.raises(DocumentError, match=r"locked\.pdf: encrypted PDF \(password required\)"):
        load_file(f)


def test_owner_password_only_pdf_opens(tmp_path: Path) -> None:
    writer = PdfWriter(clone_from=PdfReader(io.BytesIO(make_pdf(["open text"]))))
    writer.encrypt("", owner_password="owner", algorithm="RC4-128")
    f = tmp_path / "owner.pdf"
    writer.write(f)
    assert "open text" in load_file(f).text


def test_corrupt_pdf(tmp_path: Path) -> None:
    f = tmp_path / "bad.pdf"
    f.write_bytes(b"%PDF-1.4\nthis is not a pdf body\n")
    with pytest.raises(DocumentError, match=r"bad\.pdf: corrupt or unreadable PDF"):
        load_file(f)


@pytest.mark.parametrize(
    ("data", "match"),
    [(b"abc\x00def", "binary file"), (b"caf\xe9 latin-1", "not UTF-8 text")],
)
def test_binary_and_non_utf8(tmp_path: Path, data: bytes, match: str) -> None:
    f = tmp_path / "x.md"
    f.write_bytes(data)
    with pytest.raises(DocumentError, match=match):
        load_file(f)


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("empty.txt", b""),
        ("blank.md", b"  \n\n\t\n"),
        ("chrome.html", b"<body><nav>only nav</nav><script>x()</script></body>"),
        ("blank.pdf", make_pdf([""])),
    ],
)
def test_empty_documents(tmp_path: Path, name: str, data: bytes) -> None:
    f = tmp_path / name
    f.write_bytes(data)
    with pytest.raises(DocumentError, match="no text after extraction"):
        load_file(f)


def test_unsupported_single_file(tmp_path: Path) -> None:
    f = tmp_path / "data.csv"
    f.write_text("a,b\n")
    with pytest.raises(DocumentError, match=r"data\.csv: unsupported file type '\.csv'; supported: \.txt"):
        load_path(f)


def test_document_error_is_value_error() -> None:
    assert issubclass(DocumentError, ValueError)


def test_load_folder(tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    (tmp_path / ".git").mkdir()
    (tmp_path / "b" / "z.md").write_text("# Z\n\nzed\n")
    (tmp_path / "a.txt").write_text("alpha\n")
    (tmp_path / "b" / "img.png").write_bytes(b"\x89PNG\x00\x00")
    (tmp_path / "b" / "empty.txt").write_text("")
    (tmp_path / ".git" / "HEAD.txt").write_text("ref\n")
    (tmp_path / ".hidden.txt").write_text("hidden\n")
    (tmp_path / "drafts").mkdir()
    (tmp_path / "drafts" / "d.txt").write_text("draft\n")
    result = load_path(tmp_path, exclude=("drafts/**/*",))
    assert [Path(d.source).relative_to(tmp_path).as_posix() for d in result.documents] == ["a.txt", "b/z.md"]
    reasons = {Path(s.path).name: s.reason for s in result.skipped}
    assert set(reasons) == {"empty.txt", "img.png"}
    assert "unsupported file type '.png'" in reasons["img.png"]
    assert "no text after extraction" in reasons["empty.txt"]
    assert [Path(d.source).name for d in load_path(tmp_path, exclude=("drafts", "b")).documents] == ["a.txt"]
    only_md = load_path(tmp_path, include=("**/*.md",))
    assert [Path(d.source).name for d in only_md.documents] == ["z.md"] and only_md.skipped == []


def test_load_path_single_file(tmp_path: Path) -> None:
    f = tmp_path / "a.txt"
    f.write_text("alpha")
    result = load_path(f)
    assert [d.text for d in result.documents] == ["alpha"] and result.skipped == []


@pytest.mark.parametrize(
    "body",
    [
        '<nav>Menu</nav><div role="main"><h1>Title</h1><p>Body.</p></div><p>Sidebar junk</p>',
        "<nav>Menu</nav><article><header><h1>Title</h1></header><p>Body.</p><footer>Tags</footer></article>"
        "<p>Sidebar junk</p>",
    ],
)
def test_html_prefers_main_region(tmp_path: Path, body: str) -> None:
    f = tmp_path / "page.html"
    f.write_text(f"<html><body>{body}</body></html>")
    doc = load_file(f)
    assert doc.text == "Title\n\nBody."
    assert doc.sections == ((0, len(doc.text), None, ("Title",)),)


def test_package_exports() -> None:
    import lmstack.rag as rag

    assert rag.load_path is load_path and rag.DocumentError is DocumentError
