"""The one place a state dict in lmstack names becomes a `Transformer`.

Checkpoint formats are adapted at the load boundary: `hf.py` maps Hugging Face names and `gguf.py` maps
(and dequantizes) llama.cpp names, both into the names `Transformer` itself uses; then `build_model` checks
the result against the model and installs it without ever materializing random weights.
"""

from __future__ import annotations

import torch

from lmstack.config import ModelConfig
from lmstack.models.transformer import Transformer


def build_model(
    config: ModelConfig,
    state_dict: dict[str, torch.Tensor],
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Transformer:
    """A `Transformer` holding exactly `state_dict` (lmstack names), in eval mode.

    The model is built on the meta device and the tensors are assigned, so loading never pays for a random
    init and peak memory is one copy of the weights. Missing, unexpected or mis-shaped tensors are errors:
    a silently random layer is the worst possible loading bug.
    """
    with torch.device("meta"):
        model = Transformer(config)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if config.tie_embeddings:
        expected.pop("output.weight", None)
        state_dict.pop("output.weight", None)
    _check_names_and_shapes(config, expected, state_dict)
    converted = {}
    for name in list(state_dict):
        t = state_dict.pop(name)  # free the source tensor as soon as its copy exists
        converted[name] = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
    model.load_state_dict(converted, strict=False, assign=True)
    if config.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    return model.eval()


def _check_names_and_shapes(
    config: ModelConfig, expected: dict[str, torch.Size], state_dict: dict[str, torch.Tensor]
) -> None:
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(expected[k])}"
        for k in sorted(set(expected) & set(state_dict))
        if tuple(state_dict[k].shape) != tuple(expected[k])
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
