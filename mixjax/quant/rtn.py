"""Round-to-nearest weight quantization, row (output channel) by row, in groups along K.

A linear weight is `w` [N, K] (out_features, in_features). Each row is one output channel and is
quantized either to int8 (symmetric, codes in [-127, 127], `w ≈ q·s`) or to int4 (asymmetric, codes
in [0, 15], `w ≈ (q − z)·s`; or symmetric in [-7, 7] for ablations). Scales are per (row, group of
`group_size` along K). When K is not a multiple of the group size the last group is padded with
zeros up to Kp = G·group_size; its scale and zero point are computed from the real elements only,
so a padded group quantizes exactly like a short group, and padded codes are 0.

All functions are pure, jittable and vectorised over rows; `is_int8` [N] picks the format per row.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

INT8_MAX = 127
INT4_ASYM_MAX = 15
INT4_SYM_MAX = 7


@dataclasses.dataclass(frozen=True)
class WeightFormat:
    """How weight rows are quantized. `group_size=None` means one group per row (per channel)."""

    group_size: int | None = 128
    symmetric4: bool = False  # int4 symmetric [-7, 7] instead of asymmetric [0, 15]

    def __post_init__(self):
        if self.group_size is not None and self.group_size <= 0:
            raise ValueError(f"group_size={self.group_size} must be positive or None (per channel)")

    def group(self, k: int) -> int:
        return k if self.group_size is None else self.group_size

    def num_groups(self, k: int) -> int:
        return -(-k // self.group(k))

    def padded_k(self, k: int) -> int:
        return self.num_groups(k) * self.group(k)


@functools.partial(
    jax.tree_util.register_dataclass, data_fields=["q", "scale", "zero", "is_int8"], meta_fields=["k"]
)
@dataclasses.dataclass(frozen=True)
class QuantizedRows:
    """Codes of a row-mixed quantized weight: `w[n] ≈ (q[n] − z[n])·s[n]` per group (z = 0 on int8 rows)."""

    q: jax.Array  # [N, Kp] int8, zero-padded beyond k
    scale: jax.Array  # [N, G] f32
    zero: jax.Array  # [N, G] int8 (0 on symmetric rows)
    is_int8: jax.Array  # [N] bool
    k: int


def row_ranges(is_int8: jax.Array, symmetric4: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-row code range (lo, hi) [N] int32 and whether the row is symmetric [N] bool."""
    lo4, hi4 = (-INT4_SYM_MAX, INT4_SYM_MAX) if symmetric4 else (0, INT4_ASYM_MAX)
    lo = jnp.where(is_int8, -INT8_MAX, lo4)
    hi = jnp.where(is_int8, INT8_MAX, hi4)
    sym = jnp.logical_or(is_int8, symmetric4)
    return lo, hi, sym


def to_groups(w: jax.Array, fmt: WeightFormat) -> tuple[jax.Array, jax.Array]:
    """[N, K] → zero-padded [N, G, g] and the validity mask [G, g]."""
    n, k = w.shape
    g, kp = fmt.group(k), fmt.padded_k(k)
    wp = jnp.pad(w, ((0, 0), (0, kp - k)))  # [N, Kp]
    mask = (jnp.arange(kp) < k).reshape(kp // g, g)  # [G, g]
    return wp.reshape(n, kp // g, g), mask


def group_params(
    wg: jax.Array,  # [N, G, g]
    mask: jax.Array,  # [G, g] (or broadcastable)
    lo: jax.Array,  # [N]
    hi: jax.Array,  # [N]
    sym: jax.Array,  # [N] bool
    ratio: jax.Array | float = 1.0,  # clip ratio, scalar or [N, G]
) -> tuple[jax.Array, jax.Array]:
    """Scale [N, G] f32 and zero point [N, G] int32 from the (clipped) range of the real elements."""
    wg = wg.astype(jnp.float32)
    wmax = jnp.max(jnp.where(mask, wg, -jnp.inf), axis=-1)  # [N, G]
    wmin = jnp.min(jnp.where(mask, wg, jnp.inf), axis=-1)
    wmax = jnp.maximum(wmax, 0.0) * ratio
    wmin = jnp.minimum(wmin, 0.0) * ratio
    lo_, hi_, sym_ = lo[:, None], hi[:, None], sym[:, None]
    amax = jnp.maximum(wmax, -wmin)
    scale = jnp.where(sym_, amax / hi_, (wmax - wmin) / (hi_ - lo_))
    scale = jnp.where(scale > 1e-30, scale, 1.0)
    zero = jnp.where(sym_, 0, jnp.clip(jnp.round(-wmin / scale), lo_, hi_)).astype(jnp.int32)
    return scale, zero


def quantize_codes(wg, scale, zero, lo, hi):
    """wg [N, G, g] → codes [N, G, g] int32 in [lo, hi]."""
    q = jnp.round(wg.astype(jnp.float32) / scale[..., None]) + zero[..., None]
    return jnp.clip(q, lo[:, None, None], hi[:, None, None]).astype(jnp.int32)


def dequantize_codes(q, scale, zero):
    """codes [N, G, g] → float [N, G, g]: (q − z)·s."""
    return (q - zero[..., None]).astype(jnp.float32) * scale[..., None]


def quantize_rows(
    w: jax.Array,  # [N, K]
    is_int8: jax.Array,  # [N] bool
    fmt: WeightFormat = WeightFormat(),
    ratio: jax.Array | float = 1.0,  # clip ratio, scalar or [N, G]
) -> QuantizedRows:
    """RTN quantization of every row in its own format."""
    n, k = w.shape
    wg, mask = to_groups(w, fmt)
    lo, hi, sym = row_ranges(is_int8, fmt.symmetric4)
    scale, zero = group_params(wg, mask, lo, hi, sym, ratio)
    q = jnp.where(mask, quantize_codes(wg, scale, zero, lo, hi), 0)  # [N, G, g]
    return QuantizedRows(
        q=q.reshape(n, -1).astype(jnp.int8), scale=scale, zero=zero.astype(jnp.int8), is_int8=is_int8, k=k
    )


def dequantize_rows(qr: QuantizedRows, fmt: WeightFormat = WeightFormat()) -> jax.Array:
    """QuantizedRows → f32 [N, k]."""
    n, kp = qr.q.shape
    g = kp // qr.scale.shape[1]
    q = qr.q.astype(jnp.int32).reshape(n, kp // g, g)
    return dequantize_codes(q, qr.scale, qr.zero.astype(jnp.int32)).reshape(n, kp)[:, : qr.k]


def fake_quantize_rows(w, is_int8, fmt: WeightFormat = WeightFormat(), ratio=1.0) -> jax.Array:
    """Quantize-dequantize [N, K] in f32."""
    return dequantize_rows(quantize_rows(w, is_int8, fmt, ratio), fmt)


@jax.jit
def rtn4_delta(w: jax.Array) -> jax.Array:
    """Δ = RTN4(w) − w with int4 asymmetric groups of 128 (MixLLM's salience perturbation), f32 [N, K]."""
    is_int8 = jnp.zeros((w.shape[0],), bool)
    return fake_quantize_rows(w, is_int8, WeightFormat()) - w.astype(jnp.float32)


def weight_bits(is_int8: np.ndarray, k: int) -> tuple[int, int]:
    """(code bits, elements) of one linear: 8 bits on int8 rows, 4 elsewhere; scales/zeros not counted."""
    n8 = int(np.sum(is_int8))
    n = int(np.size(is_int8))
    return (8 * n8 + 4 * (n - n8)) * k, n * k
