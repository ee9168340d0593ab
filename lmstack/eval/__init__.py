"""Evaluation: perplexity now; generation tasks and RAG metrics build on the same pieces."""
