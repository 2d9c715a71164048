"""Activation fake-quantization: symmetric, per (token, group along K) or per token, dynamic or static.

The default (MixLLM's choice and what `pallas_kernels.mixed_matmul` runs) is int8 symmetric with one
scale per (token, group of 128 input features), computed on the fly: s = max|x_group| / 127. Options
for ablations: one scale per token (`granularity="token"`), 4 bits, and static scales calibrated on
the calibration set (one scale per group, shared by all tokens: the max over calibration tokens, or that max
clipped to the ratio with the least squared error over them, `static_calib="mse"`).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class ActFormat:
    """Activation quantization of a linear's input. `bits=None` keeps activations in float."""

    bits: int | None = 8
    granularity: Literal["group", "token"] = "group"
    group_size: int = 128
    static: bool = False  # calibrated per-group scales instead of dynamic per-token ones
    # how static scales are calibrated: the largest |x| seen, or that maximum clipped to the ratio (of
    # STATIC_RATIOS) with the least squared quantization error over the calibration inputs, per group
    static_calib: Literal["max", "mse"] = "max"

    def __post_init__(self):
        if self.bits is not None and self.bits not in (4, 8):
            raise ValueError(f"activation bits={self.bits}; expected 4, 8 or None (float)")
        if self.granularity not in ("group", "token"):
            raise ValueError(f"activation granularity={self.granularity!r}; expected 'group' or 'token'")
        if self.group_size <= 0:
            raise ValueError(f"activation group_size={self.group_size} must be positive")
        if self.static_calib not in ("max", "mse"):
            raise ValueError(f"activation static_calib={self.static_calib!r}; expected 'max' or 'mse'")

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    def group(self, k: int) -> int:
        return self.group_size if self.granularity == "group" else k


def _grouped(x: jax.Array, g: int) -> jax.Array:
    """x [..., K] → zero-padded [..., G, g]."""
    k = x.shape[-1]
    kp = -(-k // g) * g
    xp = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, kp - k)])
    return xp.reshape(*x.shape[:-1], kp // g, g)


def group_absmax(x: jax.Array, fmt: ActFormat) -> jax.Array:
    """max |x| per group over all tokens: x [..., K] → [G] f32 (for static calibration)."""
    xg = _grouped(jnp.abs(x.astype(jnp.float32)), fmt.group(x.shape[-1]))  # [..., G, g]
    return jnp.max(xg.reshape(-1, *xg.shape[-2:]), axis=(0, 2))


# Clipping ratios of the calibrated maximum tried by static_calib="mse": 1 down to 1/64 in steps of √2 (one
# outlier token can set a group's maximum 100× above the other tokens').
STATIC_RATIOS = tuple(2.0 ** (-i / 2) for i in range(13))


def static_clip_errors(x: jax.Array, absmax: jax.Array, fmt: ActFormat) -> jax.Array:
    """Σ (x − fake_quant(x))² over all tokens and each group's features, with the static scale ratio·absmax:
    x [..., K], absmax [G] → [len(STATIC_RATIOS), G] f32."""
    xg = _grouped(x.astype(jnp.float32), fmt.group(x.shape[-1]))
    xg = xg.reshape(-1, *xg.shape[-2:])  # [M, G, g]

    def error(ratio):
        fmt_max = dataclasses.replace(fmt, static_calib="max")
        xq = fake_quant_act(xg.reshape(xg.shape[0], -1), fmt_max, ratio * absmax).reshape(xg.shape)
        return jnp.sum(jnp.square(xq - xg), axis=(0, 2))

    return jnp.stack([error(r) for r in STATIC_RATIOS])


def fake_quant_act(x: jax.Array, fmt: ActFormat, static_absmax: jax.Array | None = None) -> jax.Array:
    """Quantize-dequantize x [..., K]; returns x's shape and dtype. static_absmax [G] when fmt.static."""
    if fmt.bits is None:
        return x
    k = x.shape[-1]
    xg = _grouped(x.astype(jnp.float32), fmt.group(k))  # [..., G, g]
    if fmt.static:
        if static_absmax is None:
            raise ValueError("static activation quantization needs calibrated scales (static_absmax)")
        amax = static_absmax.astype(jnp.float32)[:, None]  # [G, 1]
    else:
        amax = jnp.max(jnp.abs(xg), axis=-1, keepdims=True)  # [..., G, 1]
    # Same arithmetic as pallas_kernels' activation quantizer: q = floor(x·(qmax/amax) + ½), s = amax/qmax.
    inv = jnp.where(amax > 0, fmt.qmax / jnp.where(amax > 0, amax, 1.0), 0.0)
    q = jnp.clip(jnp.floor(xg * inv + 0.5), -fmt.qmax, fmt.qmax)
    scale = amax / fmt.qmax
    return (q * scale).reshape(*x.shape[:-1], -1)[..., :k].astype(x.dtype)
