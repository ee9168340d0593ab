"""The one place a state dict in lmstack names becomes a `Transformer`.

Checkpoint formats are adapted at the load boundary: `hf.py` maps Hugging Face names and `gguf.py` maps
(and dequantizes) llama.cpp names, both into the names `Transformer` itself uses; then `build_model` checks
the result against the model and installs it without ever materializing random weights.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, MutableMapping
from pathlib import Path

import torch
from torch import nn

from lmstack.config import ModelConfig
from lmstack.models.transformer import Transformer

# (module name, the float nn.Linear or untied nn.Embedding as loaded) -> the module to install instead, or
# None to keep it
LinearSwap = Callable[[str, nn.Linear | nn.Embedding], nn.Module | None]

_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}  # fmt: skip


class SafetensorsReader(MutableMapping[str, torch.Tensor]):
    """A safetensors file read one tensor at a time with plain reads, without memory-mapping it.

    safetensors' own loaders memory-map the file, and every page a tensor touched stays in the process's
    resident set for as long as any tensor of the file lives. Loading a 4-bit base (QLoRA) reads each float
    weight once to quantize it, so with a mapping the whole float model would count towards peak memory;
    read this way, only one float weight exists at a time. Only the names and shapes are read up front
    (the JSON header); `pop` and `[name]` read that tensor's bytes into fresh memory.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._file = open(self.path, "rb")  # noqa: SIM115 (kept open: the file may be replaced meanwhile)
        n = int.from_bytes(self._file.read(8), "little")
        header = json.loads(self._file.read(n))
        header.pop("__metadata__", None)
        self._data_start = 8 + n
        self._entries: dict[str, dict] = header

    def shape(self, name: str) -> torch.Size:
        return torch.Size(self._entries[name]["shape"])

    def __getitem__(self, name: str) -> torch.Tensor:
        entry = self._entries[name]
        start, end = entry["data_offsets"]
        buf = torch.empty(end - start, dtype=torch.uint8)
        self._file.seek(self._data_start + start)
        if self._file.readinto(buf.numpy().data) != end - start:
            raise ValueError(f"{self.path}: the data of tensor {name!r} is cut short (a truncated file?)")
        return buf.view(_SAFETENSORS_DTYPES[entry["dtype"]]).reshape(entry["shape"])

    def __setitem__(self, name: str, value: torch.Tensor) -> None:
        raise TypeError("SafetensorsReader is read-only")

    def __delitem__(self, name: str) -> None:
        del self._entries[name]
        if not self._entries:
            self.close()  # everything is read

    def close(self) -> None:
        self._file.close()

    def __del__(self) -> None:
        if hasattr(self, "_file"):  # __init__ may have failed before opening
            self.close()

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._entries))

    def __len__(self) -> int:
        return len(self._entries)


def build_model(
    config: ModelConfig,
    state_dict: MutableMapping[str, torch.Tensor],
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    linear_swap: LinearSwap | None = None,
) -> Transformer:
    """A `Transformer` holding exactly `state_dict` (lmstack names), in eval mode.

    The model is built on the meta device and the tensors are assigned, so loading never pays for a random
    init and peak memory is one copy of the weights. Missing, unexpected or mis-shaped tensors are errors:
    a silently random layer is the worst possible loading bug.

    `linear_swap` replaces nn.Linear modules as they load (a 4-bit base for QLoRA): every other tensor is
    installed first, then each untied embedding table and each linear weight is read, handed over (with
    its bias), and dropped, so from a `SafetensorsReader` the float weights never all exist at once. (A
    tied table stays: its head shares it, and quantizing both together is `quant.quantize_model`'s job.)
    """
    with torch.device("meta"):
        model = Transformer(config)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if config.tie_embeddings:
        expected.pop("output.weight", None)
        state_dict.pop("output.weight", None)
    _check_names_and_shapes(config, expected, state_dict)
    # "tok_embeddings.weight" -> "tok_embeddings", "layers.0.attention.wq.weight" -> ...: swapped one at a
    # time after the rest loads, the tables first (each is gone to its swap before the head arrives)
    swapped: dict[str, str] = {}
    if linear_swap is not None:
        tables = [n for n, m in model.named_modules() if isinstance(m, nn.Embedding)]
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        names = linears if config.tie_embeddings else tables + linears
        swapped = {f"{n}.weight": n for n in names if f"{n}.weight" in state_dict}
    converted = {}
    for name in [k for k in state_dict if k not in swapped]:
        converted[name] = _convert(state_dict.pop(name), device, dtype)  # the source copy is freed at once
    model.load_state_dict(converted, strict=False, assign=True)
    for key, module_name in swapped.items():
        old = model.get_submodule(module_name)
        assert linear_swap is not None
        loaded = _as_loaded(old, _convert(state_dict.pop(key), device, dtype))
        new = linear_swap(module_name, loaded)
        parent, _, child = module_name.rpartition(".")
        setattr(model.get_submodule(parent), child, loaded if new is None else new)
        del loaded, new  # the float weight goes here unless the swap kept it
    if config.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    return model.eval()


def _as_loaded(old: nn.Module, weight: torch.Tensor) -> nn.Linear | nn.Embedding:
    """A fresh float module like `old` (built on meta) holding `weight` and `old`'s bias."""
    module: nn.Linear | nn.Embedding
    if isinstance(old, nn.Embedding):
        module = nn.Embedding(old.num_embeddings, old.embedding_dim, old.padding_idx, device="meta")
    else:
        assert isinstance(old, nn.Linear)
        module = nn.Linear(old.in_features, old.out_features, bias=old.bias is not None, device="meta")
        if old.bias is not None:
            module.bias = old.bias
    module.weight = nn.Parameter(weight)
    return module


def _convert(t: torch.Tensor, device: str | torch.device, dtype: torch.dtype) -> torch.Tensor:
    return t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)


def _shape(state_dict: MutableMapping[str, torch.Tensor], name: str) -> torch.Size:
    return state_dict.shape(name) if isinstance(state_dict, SafetensorsReader) else state_dict[name].shape


def _check_names_and_shapes(
    config: ModelConfig, expected: dict[str, torch.Size], state_dict: MutableMapping[str, torch.Tensor]
) -> None:
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong = [
        f"{k}: checkpoint {tuple(_shape(state_dict, k))} vs model {tuple(expected[k])}"
        for k in sorted(set(expected) & set(state_dict))
        if tuple(_shape(state_dict, k)) != tuple(expected[k])
    ]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensors (e.g. {missing[:4]})")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} tensors (e.g. {unexpected[:4]})")
    if wrong:
        problems.append(f"{len(wrong)} shape mismatches (e.g. {wrong[:3]})")
    if problems:
        raise ValueError(f"checkpoint does not fit model config {config.name!r}: " + "; ".join(problems))
