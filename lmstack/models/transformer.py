"""One decoder-only transformer for every family in the config table (GPT-2, Llama, Qwen2, Gemma 3).

Read top to bottom: embeddings -> N x Block(attention, MLP) -> final norm -> LM head. The shape
glossary is in lmstack/models/layers.py.
"""

from __future__ import annotations

import contextlib
import functools
from contextlib import AbstractContextManager
from typing import cast

import torch
import torch.utils.checkpoint
from torch import nn

from lmstack.config import ModelConfig
from lmstack.models.attention import Attention, KVCache, attention_mask
from lmstack.models.layers import MLP, Linear, make_norm, recomputing, rope_cos_sin, sinusoidal_embedding


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.attn_norm = make_norm(config)
        self.attn = Attention(config, layer_idx)
        self.mlp_norm = make_norm(config)
        self.mlp = MLP(config)
        self.post_attn_norm = make_norm(config) if config.post_norms else None
        self.post_mlp_norm = make_norm(config) if config.post_norms else None

    def recompute_contexts(self) -> tuple[AbstractContextManager, AbstractContextManager]:
        """Gradient checkpointing's (forward, recompute) contexts: recomputing, the down projection's output
        is not needed when it only feeds the residual sum (no post-norm saves it)."""
        output = self.mlp.w2 if self.post_mlp_norm is None else None
        return contextlib.nullcontext(), recomputing(output)

    def forward(self, x, rope, input_pos, mask_for, kv_len) -> torch.Tensor:  # (B, T, C)
        h = self.attn(self.attn_norm(x), rope, input_pos, mask_for, kv_len)
        if self.post_attn_norm is not None:
            h = self.post_attn_norm(h)
        x = x + h
        h = self.mlp(self.mlp_norm(x))
        if self.post_mlp_norm is not None:
            h = self.post_mlp_norm(h)
        return x + h


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.pos_embeddings = (
            nn.Embedding(config.max_seq_len, config.dim) if config.positions == "learned" else None
        )
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = make_norm(config)
        self.output = Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.rotary_dim = config.rotary_dim or config.hd
        self.cache_len = 0  # 0 -> no KV cache set up
        self.gradient_checkpointing = False  # training: recompute each block in backward instead of storing

    # --- inference state -------------------------------------------------------------------------
    def setup_caches(self, batch: int, max_seq_len: int, dtype: torch.dtype | None = None) -> None:
        """Allocate a KV cache of `max_seq_len` positions per layer; replaces any previous cache."""
        if max_seq_len > self.config.max_seq_len:
            raise ValueError(
                f"requested a KV cache of {max_seq_len} positions but {self.config.name} has a context "
                f"window of {self.config.max_seq_len}; shorten the prompt or max_new_tokens"
            )
        p = self.tok_embeddings.weight if isinstance(self.tok_embeddings, nn.Embedding) else None
        device = p.device if p is not None else next(self.buffers()).device
        dtype = dtype or (p.dtype if p is not None and p.is_floating_point() else torch.float32)
        c = self.config
        for attn in self.attentions():
            attn.kv_cache = KVCache(batch, c.kv_heads, max_seq_len, c.hd, dtype, device)
        self.cache_len = max_seq_len

    def clear_caches(self) -> None:
        for attn in self.attentions():
            attn.kv_cache = None
        self.cache_len = 0

    def reorder_caches(self, index: torch.Tensor) -> None:
        for attn in self.attentions():
            if attn.kv_cache is not None:
                attn.kv_cache.reorder(index)

    def attentions(self) -> list[Attention]:
        return [cast(Block, layer).attn for layer in self.layers]

    # --- forward ---------------------------------------------------------------------------------
    def forward(self, idx: torch.Tensor, input_pos: torch.Tensor | None = None) -> torch.Tensor:
        """idx (B, T) token ids at positions input_pos (T,) -> logits (B, T, V).

        Without a KV cache, input_pos defaults to 0..T-1 (a full forward). With a cache, the new keys
        are written at input_pos and attention reads positions 0..max(input_pos).
        """
        return self.head(self.forward_hidden(idx, input_pos))  # (B, T, V)

    def forward_hidden(self, idx: torch.Tensor, input_pos: torch.Tensor | None = None) -> torch.Tensor:
        """The final-normed hidden states (B, T, C) that the LM head reads; a reward model's scalar head
        reads them too."""
        B, T = idx.shape
        square_causal = input_pos is None and not self.cache_len  # positions 0..T-1 see their past only
        if input_pos is None:
            input_pos = torch.arange(T, device=idx.device)
        kv_len = int(input_pos[-1]) + 1 if self.cache_len else T
        if kv_len > (self.cache_len or self.config.max_seq_len):
            raise ValueError(
                f"position {kv_len - 1} is beyond the {'KV cache' if self.cache_len else 'context window'} "
                f"of {self.cache_len or self.config.max_seq_len} positions"
            )
        x = self.embed(idx, input_pos)  # (B, T, C)
        k_pos = torch.arange(kv_len, device=idx.device) if self.cache_len else input_pos

        @functools.cache
        def mask_for(window: int | None) -> torch.Tensor | None:  # (T, S), built once per window, if needed
            if square_causal and (window is None or window >= T):
                return None  # plain causal: SDPA's flash path (training, full forwards)
            return attention_mask(input_pos, k_pos, window)

        ropes = self._ropes(input_pos)
        checkpoint = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for i, layer in enumerate(self.layers):
            rope = ropes.get(self._rope_key(i))
            if checkpoint:
                x = torch.utils.checkpoint.checkpoint(
                    layer, x, rope, input_pos, mask_for, kv_len, use_reentrant=False,
                    context_fn=cast(Block, layer).recompute_contexts,
                )  # fmt: skip
            else:
                x = layer(x, rope, input_pos, mask_for, kv_len)
        return self.norm(x)  # (B, T, C)

    def fuse_projections(self) -> None:
        """Fuse q/k/v and gate/up projections where their modules allow it (quantized inference)."""
        for layer in self.layers:
            cast(Block, layer).attn.fuse_projections()
            cast(Block, layer).mlp.fuse_projections()

    def embed(self, idx: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        c = self.config
        x = self.tok_embeddings(idx)  # (B, T, C)
        if c.embed_scale is not None:
            x = x * torch.tensor(c.embed_scale, dtype=x.dtype)
        if self.pos_embeddings is not None:
            x = x + self.pos_embeddings(input_pos)
        elif c.positions == "sinusoidal":
            x = x + sinusoidal_embedding(input_pos, c.dim).to(x.dtype)
        return x

    def head(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.output(x)  # (B, T, V)
        if self.config.final_softcap is not None:
            cap = self.config.final_softcap
            logits = cap * torch.tanh(logits / cap)
        return logits

    def _rope_key(self, i: int) -> tuple[float, float]:
        c = self.config
        return c.rope_base_for(i), (c.rope_scaling if c.layer_type(i) == "global" else 1.0)

    def _ropes(self, input_pos: torch.Tensor) -> dict[tuple[float, float], tuple[torch.Tensor, torch.Tensor]]:
        """cos/sin tables per distinct (base, scaling): Gemma 3 has one for local, one for global layers."""
        if self.config.positions != "rope":
            return {}
        keys = {self._rope_key(i) for i in range(self.config.n_layers)}
        return {(b, s): rope_cos_sin(input_pos, self.rotary_dim, b, s) for b, s in keys}
