"""The `LLM` facade: load a model by name or path, then generate, chat, stream or read logits.

It composes hub (resolve + load), tokenizer, quant and generate; it owns no logic of its own.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from lmstack.config import ModelConfig
from lmstack.generate import GenerationResult, SamplingParams, generate_text, stream_text
from lmstack.hub import load_model
from lmstack.models.transformer import Transformer
from lmstack.tokenizer import Tokenizer

DType = Literal["float32", "bfloat16", "int8", "q4"]
DTYPES: tuple[str, ...] = ("float32", "bfloat16", "int8", "q4", "nf4")
Messages = Sequence[dict[str, Any]]


def default_home() -> Path:
    """Where lmstack keeps converted weights and caches: $LMSTACK_HOME or ~/.lmstack."""
    return Path(os.environ.get("LMSTACK_HOME") or Path.home() / ".lmstack")


def _keep_8bit(name: str) -> bool:
    """q4's mixed recipe, as llama.cpp's Q4_K_M: embeddings, LM head, value and down projections stay at
    8 bits, where 4 bits cost the most quality; the rest (3/4 of the layer weights) go to 4 bits."""
    return name in ("tok_embeddings", "output") or name.endswith(("attn.wv", "mlp.w2"))


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"device must be one of auto, cpu, cuda (or cuda:N); got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available here; use --device cpu")
    return torch.device(device)


@dataclass
class LLM:
    model: Transformer
    tokenizer: Tokenizer
    config: ModelConfig
    name: str
    dtype: str
    device: torch.device
    load_seconds: float = 0.0

    @classmethod
    def load(
        cls,
        name_or_path: str,
        *,
        device: str = "auto",
        dtype: str = "float32",
        cache_dir: str | Path | None = None,
        adapter: str | Path | None = None,
    ) -> LLM:
        """Resolve a model (local path, installed weights package, or the HF hub) and load it.

        `adapter`: a LoRA adapter folder in PEFT's format (lmstack's or PEFT's), merged into the float
        weights before any quantization, so it costs nothing at inference.

        `dtype="nf4"` is QLoRA's frozen 4-bit base (lmstack.nf4): each linear layer is quantized as it
        loads, so the float model is never resident as a whole, and the embedding table and LM head are
        kept as int8 rows; an adapter then stays unmerged on top, as it was trained. Made for training:
        inference dequantizes every call (int8/q4 are the fast ones)."""
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
        dev = pick_device(device)
        t0 = time.perf_counter()
        float_dtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
        swap = None
        if dtype == "nf4":
            from lmstack.nf4 import nf4_swap

            swap = nf4_swap(tables_int8=True)
        loaded = load_model(
            name_or_path,
            device=dev,
            dtype=float_dtype,
            cache_dir=Path(cache_dir or default_home()),
            linear_swap=swap,
        )
        model = loaded.model.eval()
        if dtype == "nf4":
            from lmstack.nf4 import quantize_tables_int8

            quantize_tables_int8(model)  # the frozen embedding and head as int8 rows
        if adapter is not None:
            from lmstack.adapters import load_adapter
            from lmstack.lora import merge_lora

            load_adapter(model, adapter, base_model_name=name_or_path)
            if dtype != "nf4":  # an NF4 base keeps the adapter unmerged, as QLoRA trained it
                merge_lora(model)
        if dtype in ("int8", "q4"):
            from lmstack.quant import quantize_model

            if dtype == "q4":  # llama.cpp's Q4_K_M recipe: the most sensitive matrices stay at 8 bits
                quantize_model(model, "q4", skip=_keep_8bit)
            quantize_model(model, "int8")  # swaps the (remaining) modules in place
            model.fuse_projections()  # q/k/v and gate/up in one kernel call each where formats agree
        src = loaded.tokenizer_source
        tok = (
            Tokenizer.from_gguf_metadata(src) if isinstance(src, dict) else Tokenizer.from_pretrained_dir(src)
        )
        template = Path(adapter) / "chat_template.jinja" if adapter is not None else None
        if template is not None and template.exists() and tok.chat_template is None:
            tok.chat_template = template.read_text()  # a base model fine-tuned to chat with this template
        return cls(model, tok, loaded.config, name_or_path, dtype, dev, time.perf_counter() - t0)

    # --- numbers -------------------------------------------------------------------------------
    def _batch(self, ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """ids as a (1, T) batch on the model's device, refused when they overflow the context window or the
        vocabulary."""
        idx = torch.as_tensor(ids, dtype=torch.long, device=self.device).reshape(1, -1)
        if idx.shape[1] == 0:
            raise ValueError("the model needs at least one token id")
        if idx.shape[1] > self.config.max_seq_len:
            raise ValueError(
                f"{idx.shape[1]} token ids are over the context window of {self.config.max_seq_len}: "
                "shorten the input"
            )
        if int(idx.min()) < 0 or int(idx.max()) >= self.config.vocab_size:
            raise ValueError(f"token ids must lie in [0, {self.config.vocab_size})")
        return idx

    @torch.inference_mode()
    def logits(self, ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Float32 logits (T, V) of a full forward over ids, no KV cache: the reference for every test."""
        return self.model(self._batch(ids))[0].float()

    @torch.inference_mode()
    def continuation_logprobs(self, context: Sequence[int], continuation: Sequence[int]) -> torch.Tensor:
        """Float32 log-probabilities (N,) of the N continuation ids, each after the context and the ids before
        it: what "how likely is this text after that prompt" scores read (lm-eval's loglikelihood). One
        forward; the vocabulary head runs only on the N rows that predict the continuation."""
        if not context or not continuation:
            raise ValueError("continuation_logprobs() needs at least one context id and one continuation id")
        idx = self._batch([*context, *continuation])
        n = len(continuation)
        hidden = self.model.forward_hidden(idx)[:, -n - 1 : -1]  # (1, N, C): the rows before each id
        logprobs = torch.log_softmax(self.model.head(hidden)[0].float(), dim=-1)  # (N, V)
        return logprobs.gather(1, idx[0, -n:, None]).squeeze(1)

    # --- text ----------------------------------------------------------------------------------
    @property
    def is_chat_model(self) -> bool:
        return self.tokenizer.chat_template is not None

    def prompt_ids(self, prompt: str | Messages, chat: bool | None = None) -> list[int]:
        """Token ids for a raw prompt, or for messages rendered by the model's chat template.

        A plain string is chat-formatted (as one user turn) when the model has a chat template, unless
        chat=False; base models always complete the raw text.
        """
        if not isinstance(prompt, str):
            text = self.tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True)
            return self.tokenizer.encode(text, add_special_tokens=False)
        if chat is None:
            chat = self.is_chat_model
        if chat:
            text = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
            return self.tokenizer.encode(text, add_special_tokens=False)
        return self.tokenizer.encode(prompt)

    def complete(
        self, prompt: str | Messages, *, chat: bool | None = None, **sampling: Any
    ) -> GenerationResult:
        """Generate and return the text with token ids, finish reason, token counts and logprobs."""
        params = SamplingParams(**sampling)
        return generate_text(self.model, self.tokenizer, self.prompt_ids(prompt, chat), params)

    def generate(self, prompt: str, *, chat: bool | None = None, **sampling: Any) -> str:
        return self.complete(prompt, chat=chat, **sampling).text

    def chat(self, messages: Messages, **sampling: Any) -> str:
        return self.complete(messages, **sampling).text

    def stream(self, prompt: str | Messages, *, chat: bool | None = None, **sampling: Any) -> Iterator[str]:
        """Text deltas as they are produced (never half a UTF-8 character, never part of a stop string)."""
        params = SamplingParams(**sampling)
        yield from stream_text(self.model, self.tokenizer, self.prompt_ids(prompt, chat), params)
