"""`lmstack merge`: a model (GGUF or HF folder), optionally with a LoRA adapter merged in, written as a
Hugging Face checkpoint (model.safetensors, config.json, tokenizer files, generation_config.json) that
transformers and `LLM.load` both read.

The folder is written next to OUT under a temporary name and moved into place only when complete, so a
failed merge leaves OUT as it was. A thin recipe: copy it to change what it does.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from lmstack.api import LLM
from lmstack.models.export import EXPORT_DTYPES, save_hf

# what an HF checkpoint folder holds: --force replaces these, so no stale shard outlives the new weights
_CHECKPOINT_FILES = (
    "*.safetensors",
    "model.safetensors.index.json",
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)


@dataclass
class MergeArgs:
    model: str
    out: Path
    adapter: Path | None = None
    dtype: str = "float32"
    force: bool = False
    cache_dir: Path | None = None


def check_args(args: MergeArgs) -> None:
    """Bad input is refused before the (slow) model load."""
    if args.dtype not in EXPORT_DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(EXPORT_DTYPES)}; got {args.dtype!r}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; pass a folder")
    if out.is_dir() and any(out.iterdir()) and not args.force:
        raise ValueError(f"--out {out} exists and is not empty; pick another folder or pass --force")
    if args.adapter is not None and not (Path(args.adapter) / "adapter_config.json").is_file():
        raise ValueError(
            f"--adapter {args.adapter} is not a LoRA adapter folder (no adapter_config.json there); pass the "
            "folder `lmstack finetune` wrote (OUT/adapter) or a PEFT save_pretrained folder"
        )


def merge(args: MergeArgs) -> Path:
    """Load the model in float32, merge the adapter, export in `args.dtype`; returns the output folder."""
    check_args(args)
    llm = LLM.load(args.model, device="cpu", dtype="float32", cache_dir=args.cache_dir, adapter=args.adapter)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        save_hf(llm.model, llm.tokenizer, tmp, dtype=EXPORT_DTYPES[args.dtype])
        _publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _publish(tmp: Path, out: Path) -> None:
    if not out.exists():
        tmp.rename(out)
        return
    for pattern in _CHECKPOINT_FILES:  # --force: the old checkpoint's files go, anything else stays
        for stale in out.glob(pattern):
            stale.unlink()
    for f in tmp.iterdir():
        f.replace(out / f.name)
