"""lmstack: a self-hosted LLM toolkit in plain PyTorch."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["LLM", "ModelConfig", "__version__"]

if TYPE_CHECKING:
    from lmstack.api import LLM
    from lmstack.config import ModelConfig


def __getattr__(name: str) -> Any:
    # Lazy so `lmstack models` and config-only users don't pay for importing torch.
    if name == "LLM":
        from lmstack.api import LLM

        return LLM
    if name == "ModelConfig":
        from lmstack.config import ModelConfig

        return ModelConfig
    raise AttributeError(name)
