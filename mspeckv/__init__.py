"""MSpecKV: long-context inference with KV offload, quantization, residency and hierarchical speculative decoding."""
__version__ = "0.1.0"
