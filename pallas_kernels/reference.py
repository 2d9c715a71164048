"""Pure-JAX references: the numerical spec of every kernel, written in the kernels' order of operations.

Activations: int8 symmetric, one scale per (token, group of 128 along K), computed on the fly:
`s_a = max|x_g| / 127`, `x_q = clip(floor(x_g · (127 / max|x_g|) + 0.5), -127, 127)` (0 where x_g ≡ 0).
GEMM, per group g: the integer partial `I_g = Σ_{k∈g} x_q · w_q` (int8 × int8 → int32; for 4-bit channels
`w_q = u − z`, computed as Σ x_q·(u − 8) + (8 − z)·Σ x_q), then `y += f32(I_g) · (s_a · s_w)` in f32.

The integer partials are computed as float32 dots: every product and partial sum of a group is an integer
below 2^24, so the f32 dot is exact (bit-identical to int32) and runs fast on any XLA backend. The
references loop (`lax.scan`) over groups so memory stays O(M·N); they are the CPU fallback of
`mixed_matmul` (implementation="xla").
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.format import GROUP_SIZE, MixedWeight, unpack_nibbles

_HIGHEST = lax.Precision.HIGHEST


def pad_k(x: jax.Array, kp: int) -> jax.Array:  # [M, K] → [M, Kp]
    return jnp.pad(x, [(0, 0), (0, kp - x.shape[1])]) if kp != x.shape[1] else x


def quantize_groups(xg: jax.Array) -> tuple[jax.Array, jax.Array]:
    """xg [..., 128] float → (x_q int8 [..., 128], s_a f32 [...]); the formula the kernels use."""
    xg = xg.astype(jnp.float32)
    amax = jnp.max(jnp.abs(xg), axis=-1)
    inv = jnp.where(amax > 0, 127.0 / jnp.where(amax > 0, amax, 1.0), 0.0)
    x_q = jnp.clip(jnp.floor(xg * inv[..., None] + 0.5), -127, 127).astype(jnp.int8)
    return x_q, amax / 127.0


def quantize_activations_ref(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x [M, K] float → (x_q int8 [M, Kp], a_scale f32 [M, G]); K zero-padded to Kp = G·128."""
    m, k = x.shape
    kp = -(-k // GROUP_SIZE) * GROUP_SIZE
    xg = pad_k(x, kp).reshape(m, kp // GROUP_SIZE, GROUP_SIZE)  # [M, G, 128]
    x_q, a_scale = quantize_groups(xg)
    return x_q.reshape(m, kp), a_scale


def _group_dot(a: jax.Array, b: jax.Array) -> jax.Array:
    """Exact integer dot of int8-valued tiles a [M, k], b [N, k] → f32 [M, N] (integers < 2^24)."""
    return lax.dot_general(
        a.astype(jnp.float32), b.astype(jnp.float32), (((1,), (1,)), ((), ())), precision=_HIGHEST
    )


def _by_group(a: jax.Array) -> jax.Array:  # [R, Kp] → [G, R, 128]
    return a.reshape(a.shape[0], -1, GROUP_SIZE).transpose(1, 0, 2)


def w8a8_ref(x_q, a_scale, w_q, w_scale) -> jax.Array:
    """x_q int8 [M, Kp], a_scale f32 [M, G], w_q int8 [N, Kp], w_scale f32 [G, N] → f32 [M, N]."""

    def step(acc, xs):
        xg, wg, sa, sw = xs  # [M, 128], [N, 128], [M], [N]
        return acc + _group_dot(xg, wg) * (sa[:, None] * sw[None, :]), None

    acc = jnp.zeros((x_q.shape[0], w_q.shape[0]), jnp.float32)
    return lax.scan(step, acc, (_by_group(x_q), _by_group(w_q), a_scale.T, w_scale))[0]


def w4a8_ref(x_q, a_scale, w_packed, w_scale, w_zero) -> jax.Array:
    """x_q int8 [M, Kp], a_scale f32 [M, G], w_packed int8 [N, Kp/2] (signed nibbles), w_scale f32 [G, N],
    w_zero int8 [G, N] → f32 [M, N]. Per group: I = Σ x_q·(u − 8) + (8 − z)·Σ x_q, the exact Σ x_q·(u − z)."""
    u8 = unpack_nibbles(w_packed) - 8  # int32 [N, Kp], u - 8

    def step(acc, xs):
        xg, wg, sa, sw, z = xs  # [M, 128], [N, 128], [M], [N], [N]
        x_sum = jnp.sum(xg.astype(jnp.float32), axis=1)  # [M]
        partial = _group_dot(xg, wg) + x_sum[:, None] * (8.0 - z.astype(jnp.float32))[None, :]
        return acc + partial * (sa[:, None] * sw[None, :]), None

    acc = jnp.zeros((x_q.shape[0], w_packed.shape[0]), jnp.float32)
    xs = (_by_group(x_q), _by_group(u8), a_scale.T, w_scale, w_zero)
    return lax.scan(step, acc, xs)[0]


def mixed_matmul_ref(x: jax.Array, qw: MixedWeight) -> jax.Array:
    """x [M, K] float → [M, N] in x's dtype: quantize activations, the two sub-GEMMs, scatter to channel order."""
    return mixed_codes_matmul_ref(*quantize_activations_ref(x), qw).astype(x.dtype)


def mixed_codes_matmul_ref(x_q: jax.Array, a_scale: jax.Array, qw: MixedWeight) -> jax.Array:
    """Activations already quantized (x_q int8 [M, Kp], a_scale f32 [M, G]: a producer's codes, whatever their
    scales' grain) → f32 [M, N] in channel order: the two sub-GEMMs of `mixed_matmul_ref`."""
    qw = qw.untiled()
    parts = []
    if qw.q8.shape[0]:
        parts.append(w8a8_ref(x_q, a_scale, qw.q8, qw.scale8))
    if qw.q4.shape[0]:
        parts.append(w4a8_ref(x_q, a_scale, qw.q4, qw.scale4, qw.zero4))
    y = jnp.concatenate(parts, axis=1)  # [M, N8p + N4p] packed order
    return y[:, qw.row_of_channel]


def dequant_matmul_ref(x: jax.Array, qw: MixedWeight) -> jax.Array:
    """The float-dequantization ablation: bf16 x @ bf16 dequantized W, f32 accumulation → x's dtype."""
    w = qw.dequantize().astype(jnp.bfloat16)  # [N, k]
    y = lax.dot_general(x.astype(jnp.bfloat16), w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    return y.astype(x.dtype)
