"""The one optional Triton import, read by every kernel module (``kv.quant``, ``kv.quant_triton``,
``model.decode_attention``, ``model.fused``): ``HAS_TRITON``, and ``triton``/``tl`` (None on CPU-only installs)."""

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # CPU-only installs
    triton = None
    tl = None
    HAS_TRITON = False
