"""Decode in plain XLA: the packed weight unpacked inside one XLA reduction fusion (no Pallas).

Why: on the H100 XLA's own int8 GEMV (`dot` of a [1, K] int8 row with an [N, K] int8 weight, lowered to a
reduction fusion) streams 2.85 TB/s, more than either Pallas decode kernel (Triton GEMV ≈ 1.6 TB/s,
Mosaic GPU TMA pipeline ≈ 1.7 TB/s; benchmarks/results/kernels.md, session 6). This path writes the
same integer arithmetic as `reference.py` as elementwise ops + reductions that XLA fuses: per (row m,
channel n, group g) the integer partial over the group's 128 codes, then the two-step rescale
Σ_g f32(I) · s_a · s_w. The partials are exact integers, so the result matches the reference to f32
summation order.

Packed 4-bit byte b of group g, position j (format.py): low nibble = u(k = 128g + j) − 8, high nibble =
u(k = 128g + 64 + j) − 8, so (b << 4) >> 4 and b >> 4 are the two signed values and
Σ_k x·(u − z) = Σ_j x_lo·lo + x_hi·hi + (8 − z)·Σ_k x.

`form` picks how the group partial is written ("reduce": product + sum, int32; "float": the same in f32;
"dot": a batched integer dot_general over groups), to compare what XLA makes of each.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.format import GROUP_SIZE, HALF_GROUP, MixedWeight
from pallas_kernels.reference import quantize_activations_ref

FORMS = ("reduce", "float", "dot", "dequant")


def _partials(x_lo, x_hi, lo, hi, form: str):
    """x_* int8 [M, G, 64], lo/hi int8 [R, G, 64] (hi None: 8-bit rows, x_hi unused) → [M, R, G]."""
    if form == "dot":
        dims = (((2,), (2,)), ((1,), (1,)))  # contract j, batch g → [G, M, R]
        p = lax.dot_general(x_lo, lo, dims, preferred_element_type=jnp.int32)
        if hi is not None:
            p = p + lax.dot_general(x_hi, hi, dims, preferred_element_type=jnp.int32)
        return p.transpose(1, 2, 0)
    t = jnp.float32 if form == "float" else jnp.int32
    p = x_lo[:, None].astype(t) * lo[None].astype(t)
    if hi is not None:
        p = p + x_hi[:, None].astype(t) * hi[None].astype(t)
    return p.sum(-1)


def _rescale(i, sa, sw):
    """Σ_g I[m, r, g] · s_a[m, g] · s_w[g, r] as elementwise products and a sum (not a dot: XLA may run an
    f32 dot in TF32)."""
    return (i * (sa[:, None, :] * sw.T[None])).sum(-1)


def _dequant_form(x_q, sa, qw: MixedWeight) -> jax.Array:
    """One row reduction over K per output: Σ_k (s_a x_q)[k] · (s_w (u − z))[k] in f32 — the two-step
    result up to f32 rounding (the products are not integer partials any more)."""
    m, g = sa.shape
    xd = (x_q.reshape(m, g, 2, HALF_GROUP).astype(jnp.float32) * sa[:, :, None, None])  # [M, G, 2, 64]
    x_lo, x_hi = xd[:, None, :, 0], xd[:, None, :, 1]  # [M, 1, G, 64]
    parts = []
    if qw.q8.shape[0]:
        q8 = qw.q8.reshape(-1, g, 2, HALF_GROUP).astype(jnp.float32) * qw.scale8.T[:, :, None, None]
        parts.append((q8[None, :, :, 0] * x_lo + q8[None, :, :, 1] * x_hi).sum((2, 3)))
    if qw.q4.shape[0]:
        b = qw.q4.reshape(-1, g, HALF_GROUP)
        sw = qw.scale4.T[:, :, None]  # [R, G, 1]
        off = (8.0 - qw.zero4.T.astype(jnp.float32))[:, :, None] * sw  # s_w (8 − z)
        lo = ((b << 4) >> 4).astype(jnp.float32) * sw + off  # s_w (u − z), k = 128g + j
        hi = (b >> 4).astype(jnp.float32) * sw + off  # k = 128g + 64 + j
        parts.append((lo[None] * x_lo + hi[None] * x_hi).sum((2, 3)))
    y = jnp.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]
    return y[:, qw.row_of_channel]


@functools.partial(jax.jit, static_argnames=("form",))
def mixed_matmul_xla_fused(x: jax.Array, qw: MixedWeight, *, form: str = "reduce") -> jax.Array:
    """x [M, K] float (small M) → [M, N] x.dtype, channel order; the reference's integer arithmetic."""
    if form not in FORMS:
        raise ValueError(f"mixed_matmul_xla_fused: form={form!r}, expected one of {FORMS}")
    m = x.shape[0]
    g = qw.num_groups
    x_q, sa = quantize_activations_ref(x)  # [M, Kp] int8, [M, G]
    if form == "dequant":
        return _dequant_form(x_q, sa, qw).astype(x.dtype)
    xg = x_q.reshape(m, g, 2, HALF_GROUP)
    xs = x_q.reshape(m, g, GROUP_SIZE).astype(jnp.int32).sum(-1)  # [M, G]
    parts = []
    if qw.q8.shape[0]:
        q8 = qw.q8.reshape(-1, g, 2, HALF_GROUP)
        i8 = _partials(xg[:, :, 0], None, q8[:, :, 0], None, form) + _partials(xg[:, :, 1], None, q8[:, :, 1], None, form)
        parts.append(_rescale(i8.astype(jnp.float32), sa, qw.scale8))
    if qw.q4.shape[0]:
        b = qw.q4.reshape(-1, g, HALF_GROUP)
        lo, hi = (b << 4) >> 4, b >> 4  # signed u − 8 of k = 128g + j and 128g + 64 + j
        i4 = _partials(xg[:, :, 0], xg[:, :, 1], lo, hi, form).astype(jnp.float32)
        i4 = i4 + (8.0 - qw.zero4.T.astype(jnp.float32))[None] * xs[:, None].astype(jnp.float32)
        parts.append(_rescale(i4, sa, qw.scale4))
    y = jnp.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]
    return y[:, qw.row_of_channel].astype(x.dtype)


def int4_view(q4: jax.Array) -> jax.Array:
    """Packed 4-bit rows int8 [R, Kp/2] → int4 [R, G, 128] (the same bytes): element 2j of group g is byte
    j's low nibble (k = 128g + j), element 2j + 1 its high nibble (k = 128g + 64 + j), each u − 8."""
    r, half = q4.shape
    return lax.bitcast_convert_type(q4, jnp.int4).reshape(r, half // HALF_GROUP, GROUP_SIZE)


def _interleave(xd: jax.Array) -> jax.Array:  # [M, G, 128] → element 2j = k j, 2j + 1 = k 64 + j
    m, g, _ = xd.shape
    return xd.reshape(m, g, 2, HALF_GROUP).transpose(0, 1, 3, 2).reshape(m, g, GROUP_SIZE)


@functools.partial(jax.jit, static_argnames=("min_rows",))
def int4_dot_matmul(x: jax.Array, qw: MixedWeight, q4_int4: jax.Array | None = None, *,
                    min_rows: int = 2) -> jax.Array:
    """x [M, K] float → [M, N] x.dtype: int8-fake-quantized activations (bf16) × the packed weight
    dequantized inside XLA's GEMM fusion (the int4 bytes as XLA int4, group scale and zero applied to the
    operand), one dot per channel set; the numerics of `dequant_dot`. M is padded to `min_rows` (XLA turns
    an M = 1 dot into a reduction that reads int4 slowly). `q4_int4`: `int4_view(qw.q4)` made beforehand."""
    m = x.shape[0]
    mp = max(m, min_rows)
    x_q, sa = quantize_activations_ref(jnp.pad(x, [(0, mp - m), (0, 0)]))
    g = qw.num_groups
    xd = (x_q.reshape(mp, g, GROUP_SIZE).astype(jnp.float32) * sa[..., None]).astype(jnp.bfloat16)
    dims = (((1, 2), (1, 2)), ((), ()))
    parts = []
    if qw.q8.shape[0]:
        w8 = (qw.q8.reshape(-1, g, GROUP_SIZE).astype(jnp.float32) * qw.scale8.T[..., None]).astype(jnp.bfloat16)
        parts.append(lax.dot_general(xd, w8, dims, preferred_element_type=jnp.float32))
    if qw.q4.shape[0]:
        w4 = int4_view(qw.q4) if q4_int4 is None else q4_int4
        off = 8.0 - qw.zero4.T.astype(jnp.float32)  # [R, G]
        w4 = ((w4.astype(jnp.float32) + off[..., None]) * qw.scale4.T[..., None]).astype(jnp.bfloat16)
        parts.append(lax.dot_general(_interleave(xd), w4, dims, preferred_element_type=jnp.float32))
    y = jnp.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]
    return y[:m, qw.row_of_channel].astype(x.dtype)
