"""Use MSpecKV's placements and presses from Hugging Face transformers: ``MSpecKVCache`` (a ``Cache``)."""

from .cache import HFSupportError, MSpecKVCache, cache_argument

__all__ = ["HFSupportError", "MSpecKVCache", "cache_argument"]
