"""Retrieval-augmented generation: files -> Document -> Chunk (-> embeddings -> store -> search -> answer).

Submodules import downward only: documents <- chunking <- embedder <- store <- retrieval <- pipeline.
"""

from lmstack.rag.chunking import Chunk, chunk_document
from lmstack.rag.documents import Document, DocumentError, LoadResult, Section, Skipped, load_file, load_path

__all__ = [
    "Chunk",
    "Document",
    "DocumentError",
    "LoadResult",
    "Section",
    "Skipped",
    "chunk_document",
    "load_file",
    "load_path",
]
