"""The packed mixed weight as one int8 matrix in channel order (Pallas-Triton), beside its pure-JAX reference.

Why: the Hopper prefill GEMM (`mgpu.w8a8_group_matmul`) reads one int8 matrix [Np, Kp] through TMA, rows in
channel order. A `MixedWeight` holds its 8-bit and 4-bit channels as two sub-matrices, the 4-bit codes two a
byte, so every prefill call first builds that matrix: 8-bit rows copied, 4-bit rows unpacked to u − z ∈
[-15, 15] (exact in int8), rows gathered into channel order, with the scales [G, Np] gathered alike. It
reads the packed bytes once and writes one byte a weight: a 2048-token Llama-3-8B prefill moves ≈ 11 GB
this way, at every call (the GEMM cannot absorb it: benchmarks/NOTES-kernels.md item 65). H200 (session 23,
item 82): 3.1 ms a prefill at ≈ 3.6 TB/s on the large layers, against ≈ 3.3 ms for the reference's eight XLA
fusions a layer; one launch a linear instead of eight, and 2.6 s less compile time for the model.

Reference (`int8_weight_ref`): the XLA pass, on 32-bit words (four codes an operation). A stored nibble is
the signed u − 8, so flipping its top bit gives u; u − z is a per-byte add of 256 − z with no carry between
bytes (`_bytes_add`). In a group's 64 packed bytes, byte j holds k = 128g + j (low nibble) and k = 128g +
64 + j (high nibble) (`format.py`): word i of the group gives the output's words i (low nibbles) and 16 + i
(high nibbles).

Kernel (`int8_weight_pallas`): the same word arithmetic, one program per (block of rows, block of groups):
each row's source row (`row_of_channel`) is loaded once, then the program gathers the rows' packed words
[rows, groups, 16] from the 4-bit codes (masked to the 4-bit rows) and their words [rows, 2·groups, 16]
from the 8-bit codes (masked to the 8-bit rows) — a row's words are contiguous, so the loads stay
coalesced — and writes the output rows and their scales. Each byte is read once and written once.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.format import HALF_GROUP, TILE_ROWS, MixedWeight

_WORDS = HALF_GROUP // 4  # 16 words: one group's packed 4-bit bytes, or one half of its int8 row
BLOCK_ROWS = 16  # rows a program. H200 (session 23, benchmarks/bench_unpack.py): 16 rows × 4 groups × 4 warps
BLOCK_GROUPS = 4  # 2–5 % faster than XLA's pass on Llama-3-8B's four linears; 32 × 4 was 9–19 % slower


def _words(a: jax.Array, dtype=jnp.uint32) -> jax.Array:  # int8 [R, C] → [R, C/4] (little-endian: byte 0 lowest)
    return lax.bitcast_convert_type(a.reshape(a.shape[0], -1, 4), dtype)


def _const(bits: int, dtype) -> np.generic:
    """A 32-bit constant as a numpy scalar of dtype (uint32, or int32 with the same bits: the kernel's words)."""
    return np.array(bits, np.uint32).view(np.dtype(dtype))[()]


def _bytes_add(a: jax.Array, b: jax.Array) -> jax.Array:
    """Per-byte a + b mod 256 of 32-bit words (no carry between bytes): SWAR on 4 codes at once."""
    low7 = _const(0x7F7F7F7F, a.dtype)
    return ((a & low7) + (b & low7)) ^ ((a ^ b) & _const(0x80808080, a.dtype))


def _unpack_words(packed: jax.Array, zero: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Packed 4-bit words (signed nibbles u − 8) and their rows' zero points (int, broadcastable) → the words
    of u − z for the low nibbles (k = 128g + 4i + b) and the high nibbles (k = 128g + 64 + 4i + b)."""
    dt = packed.dtype
    nib, flip = _const(0x0F0F0F0F, dt), _const(0x08080808, dt)  # (u − 8) mod 16 → u
    zb = ((_const(256, dt) - zero.astype(dt)) & _const(0xFF, dt)) * _const(0x01010101, dt)  # 256 − z in every byte
    lo = _bytes_add((packed & nib) ^ flip, zb)
    hi = _bytes_add(((packed >> 4) & nib) ^ flip, zb)
    return lo, hi


def _check_rows(qw: MixedWeight, rows: int | None) -> int:
    if not isinstance(qw, MixedWeight):
        raise TypeError(f"int8_weight: expected a MixedWeight, got {type(qw).__name__}")
    np_ = qw.n if rows is None else int(rows)
    if np_ < qw.n:
        raise ValueError(f"int8_weight: rows={rows} < N={qw.n}; pass rows ≥ N (or None for N)")
    return np_


def int8_weight_ref(qw: MixedWeight, *, rows: int | None = None) -> tuple[jax.Array, jax.Array]:
    """The packed weight as one int8 matrix in channel order: (w int8 [Np, Kp], scale f32 [G, Np]).

    8-bit channels keep q; 4-bit channels become u − z ∈ [-15, 15], so w[n]·s[g, n] is the same
    dequantized weight as `qw.dequantize()`. Np = `rows` (≥ N; padding rows are zero with zero scale).
    One XLA gather-and-unpack pass on 32-bit words."""
    np_ = _check_rows(qw, rows)
    qw = qw.untiled()
    g, kp = qw.num_groups, qw.k_padded
    n8p = qw.q8.shape[0]
    src = jnp.concatenate([qw.row_of_channel, jnp.zeros((np_ - qw.n,), jnp.int32)])  # packed row per output row
    valid = jnp.arange(np_) < qw.n
    is8 = src < n8p
    r8, r4 = jnp.where(is8, src, 0), jnp.where(is8, 0, src - n8p)
    words, scales = jnp.zeros((np_, kp // 4), jnp.uint32), jnp.zeros((g, np_), jnp.float32)
    if qw.q4.shape[0]:
        packed = _words(qw.q4)[r4].reshape(np_, g, _WORDS)  # 16 words = 64 bytes per group
        lo, hi = _unpack_words(packed, qw.zero4[:, r4].T[..., None])
        words = jnp.concatenate([lo, hi], axis=2).reshape(np_, kp // 4)
        scales = qw.scale4[:, r4]
    if n8p:
        words = jnp.where(is8[:, None], _words(qw.q8)[r8], words)
        scales = jnp.where(is8[None, :], qw.scale8[:, r8], scales)
    words = jnp.where(valid[:, None], words, 0)
    scales = jnp.where(valid[None, :], scales, 0.0)
    return lax.bitcast_convert_type(words, jnp.int8).reshape(np_, kp), scales


def _kernel(src_ref, q4_ref, z4_ref, s4_ref, q8_ref, s8_ref, w_ref, sc_ref, *, n: int, n8p: int, n4p: int,
            block_rows: int, block_groups: int, tiled: int = 0):
    i, j = pl.program_id(0), pl.program_id(1)
    rows = i * block_rows + jnp.arange(block_rows)  # [bn] output rows (channels)
    groups = j * block_groups + jnp.arange(block_groups)  # [bg]
    word = jnp.arange(_WORDS)  # [16]
    valid = rows < n
    src = plgpu.load(src_ref.at[rows], mask=valid, other=0)  # [bn] packed row of each channel
    is8, is4 = valid & (src < n8p), valid & (src >= n8p)
    r8, r4 = jnp.where(is8, src, 0), jnp.where(is4, src - n8p, 0)
    rr, gg, ww = rows[:, None, None], groups[None, :, None], word[None, None, :]  # → [bn, bg, 16]
    lo = hi = jnp.zeros((block_rows, block_groups, _WORDS), jnp.int32)
    scale = jnp.zeros((block_groups, block_rows), jnp.float32)
    if n4p:
        m4 = jnp.broadcast_to(is4[:, None, None], lo.shape)
        at = (r4[:, None, None] // TILE_ROWS, gg // tiled, r4[:, None, None] % TILE_ROWS, gg % tiled, ww) if tiled \
            else (r4[:, None, None], gg, ww)  # tiled: the [tiles, G/Q, 64, Q, 16] view
        packed = plgpu.load(q4_ref.at[at], mask=m4, other=0, eviction_policy="evict_first")  # [bn, bg, 16]
        zero = plgpu.load(z4_ref.at[gg, r4[:, None, None]], other=0,
                          mask=jnp.broadcast_to(is4[:, None, None], (block_rows, block_groups, 1)))  # [bn, bg, 1]
        lo4, hi4 = _unpack_words(packed, zero.astype(jnp.int32))
        lo, hi = jnp.where(m4, lo4, 0), jnp.where(m4, hi4, 0)
        scale = plgpu.load(s4_ref.at[groups[:, None], r4[None, :]], mask=jnp.broadcast_to(is4[None, :], scale.shape),
                            other=0.0)  # [bg, bn]
    if n8p:
        m8 = jnp.broadcast_to(is8[:, None, None], lo.shape)
        r, s8_mask = r8[:, None, None], jnp.broadcast_to(is8[None, :], scale.shape)
        if tiled:  # the [tiles, G/Q, 64, Q, 32] view: 32 words a row and group, halves 16 words each
            at_lo, at_hi = ((r // TILE_ROWS, gg // tiled, r % TILE_ROWS, gg % tiled, h * _WORDS + ww) for h in (0, 1))
        else:
            at_lo, at_hi = (r, 2 * gg, ww), (r, 2 * gg + 1, ww)
        lo = jnp.where(m8, plgpu.load(q8_ref.at[at_lo], mask=m8, other=0, eviction_policy="evict_first"), lo)
        hi = jnp.where(m8, plgpu.load(q8_ref.at[at_hi], mask=m8, other=0, eviction_policy="evict_first"), hi)
        scale = jnp.where(s8_mask, plgpu.load(s8_ref.at[groups[:, None], r8[None, :]], mask=s8_mask, other=0.0), scale)
    plgpu.store(w_ref.at[rr, 2 * gg, ww], lo)
    plgpu.store(w_ref.at[rr, 2 * gg + 1, ww], hi)
    plgpu.store(sc_ref.at[groups[:, None], rows[None, :]], scale)


@functools.partial(jax.jit, static_argnames=("rows", "block_rows", "block_groups", "num_warps", "interpret"))
def _int8_weight_pallas(qw: MixedWeight, *, rows: int, block_rows: int, block_groups: int, num_warps: int,
                        interpret: bool):
    g, kp = qw.num_groups, qw.k_padded
    n8p, n4p = qw.q8.shape[0], qw.q4.shape[0]

    def words(a, per_row):  # int8 [R, C] → int32 [R, per_row, 16] (tiled: [R/64, G/Q, 64, Q, 16·per_row/G]); a
        q = qw.tiled  # dummy word for an empty channel set
        tail = (g // q, TILE_ROWS, q, _WORDS * per_row // g) if q else (per_row, _WORDS)
        if not a.shape[0]:
            return jnp.zeros((1, *tail), jnp.int32)
        return _words(a, jnp.int32).reshape(-1, *tail)

    def group_major(a, dtype):
        return a if a.shape[1] else jnp.zeros((g, 1), dtype)

    src = jnp.concatenate([qw.row_of_channel, jnp.zeros((rows - qw.n,), jnp.int32)])
    kernel = functools.partial(_kernel, n=qw.n, n8p=n8p, n4p=n4p, block_rows=block_rows, block_groups=block_groups,
                               tiled=qw.tiled)
    w, scale = pl.pallas_call(
        kernel,
        out_shape=(jax.ShapeDtypeStruct((rows, 2 * g, _WORDS), jnp.int32),
                   jax.ShapeDtypeStruct((g, rows), jnp.float32)),
        grid=(rows // block_rows, g // block_groups),
        interpret=interpret,
        name="unpack_int8",
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
    )(src, words(qw.q4, g), group_major(qw.zero4, jnp.int8), group_major(qw.scale4, jnp.float32),
      words(qw.q8, 2 * g), group_major(qw.scale8, jnp.float32))
    return lax.bitcast_convert_type(w, jnp.int8).reshape(rows, kp), scale


def int8_weight_pallas(qw: MixedWeight, *, rows: int | None = None, block_rows: int = BLOCK_ROWS,
                       block_groups: int = BLOCK_GROUPS, num_warps: int = 4, interpret: bool = False):
    """`int8_weight_ref` in one launch over (block of `block_rows` rows, block of `block_groups` groups).
    rows (≥ N; None: N) must be a multiple of block_rows and the weight's G of block_groups (both powers of
    two): the callers pad rows to a GEMM tile (128 or 256); block_groups falls back to the largest power of
    two dividing G."""
    np_ = _check_rows(qw, rows)
    for name, v in (("block_rows", block_rows), ("block_groups", block_groups), ("num_warps", num_warps)):
        if v < 1 or v & (v - 1):
            raise ValueError(f"int8_weight: {name} must be a power of two ≥ 1, got {v}")
    if np_ % block_rows:
        raise ValueError(f"int8_weight: rows={np_} must be a multiple of block_rows={block_rows}; pad rows to it "
                         f"(the GEMM's tile) or pass a smaller block_rows")
    while qw.num_groups % block_groups:
        block_groups //= 2
    return _int8_weight_pallas(qw, rows=np_, block_rows=int(block_rows), block_groups=int(block_groups),
                               num_warps=int(num_warps), interpret=interpret)


def int8_weight(qw: MixedWeight, *, rows: int | None = None, implementation: str = "xla",
                interpret: bool = False) -> tuple[jax.Array, jax.Array]:
    """(w int8 [Np, Kp], scale f32 [G, Np]) in channel order: `int8_weight_ref` ("xla") or the kernel
    ("pallas", `BLOCK_ROWS` rows a program or the largest power of two dividing the rows)."""
    if implementation == "xla":
        return int8_weight_ref(qw, rows=rows)
    if implementation == "pallas":
        np_ = _check_rows(qw, rows)
        block_rows = min(BLOCK_ROWS, np_ & -np_)  # the largest power of two dividing the rows, up to BLOCK_ROWS
        return int8_weight_pallas(qw, rows=np_, block_rows=block_rows, interpret=interpret)
    raise ValueError(f'int8_weight: implementation must be "xla" or "pallas", got {implementation!r}')
