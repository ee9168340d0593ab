"""Thin, copyable entry points that put the layers below together (fine-tuning)."""
