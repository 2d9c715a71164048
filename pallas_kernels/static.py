"""Static activation scales on the kernels: a `MixedWeight` with calibrated per-group input maxima.

MixLLM quantizes activations dynamically, one scale per (token, group of 128). The static-vs-dynamic ablation needs
the other choice run by the same kernels: one scale per group of 128 input features, calibrated once
(`mixjax.quant`, `ActFormat(static=True)`) and shared by every token. `StaticMixedWeight` holds the packed weight
and the calibrated maxima `a_absmax` [G]. Its matmul quantizes x with them in XLA ops, by the dynamic formula with the
maximum fixed (`static_codes`: q = clip(floor(x·127/a + ½), ±127), so a value beyond the maximum clips), and hands
the codes to `mixed_matmul` as `QuantizedActivations`: every kernel path runs unchanged, and XLA can fuse the
quantization into the producer of x.

The scale of group g is the same for every token, so s_a[g]·s_w[g, n] belongs to the weight. From `FOLD_MIN_M` rows
the matmul multiplies it into the weight's scales (`fold_scales`) and passes codes whose scale is 1 a row
(`QuantizedActivations.row_scale`), which the Hopper prefill GEMM rescales per token: the cheaper epilogue of
`MgpuConfig(act_scale="token")`, at MixLLM's per-group granularity. Below, the weight is read as stored (folding
would rewrite its scales at every decode step) and the scales go per (row, group). Both forms multiply the integer
partial of a group by the one f32 product s_a·s_w.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from pallas_kernels.format import GROUP_SIZE, MixedWeight, QuantizedActivations

FOLD_MIN_M = 256  # rows from which the activation scales are folded into the weight's (`api.MGPU_MIN_M`, prefill)


@functools.partial(jax.tree_util.register_dataclass, data_fields=["qw", "a_absmax"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class StaticMixedWeight:
    """A `MixedWeight` whose input is quantized with calibrated scales: a_absmax[g] / 127 for group g of the input
    features (every token alike). Make one with `static_weight`, which checks the shapes."""

    qw: MixedWeight
    a_absmax: jax.Array  # f32 [G]: the calibrated max |x| of each group of 128 input features

    @property
    def shape(self) -> tuple[int, int]:
        return self.qw.shape

    @property
    def n(self) -> int:
        return self.qw.n

    @property
    def k(self) -> int:
        return self.qw.k

    @property
    def n8(self) -> int:
        return self.qw.n8

    def dequantize(self) -> jax.Array:  # f32 [N, k]: the weight alone
        return self.qw.dequantize()

    def matmul(self, x: jax.Array, *, implementation: str = "auto", partials: bool = False) -> jax.Array:
        """x [..., K] float → [..., N] in x's dtype (see the module docstring); partials as `MixedWeight.matmul`."""
        from pallas_kernels.api import mixed_matmul

        if x.shape[-1] != self.qw.k:
            raise ValueError(f"StaticMixedWeight.matmul: x has {x.shape[-1]} features, the weight takes {self.qw.k}")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        fold = x2.shape[0] >= FOLD_MIN_M
        qw = fold_scales(self.qw, self.a_absmax) if fold else self.qw
        y = mixed_matmul(static_codes(x2, self.a_absmax, unit_scale=fold), qw, implementation=implementation,
                         partials=partials)
        return y.reshape(-1, *lead, self.qw.n) if partials else y.reshape(*lead, self.qw.n)


def static_weight(qw: MixedWeight, a_absmax) -> StaticMixedWeight:
    """qw with calibrated input maxima a_absmax [G] (G = qw's groups of 128 input features; finite, ≥ 0)."""
    a_absmax = jnp.asarray(a_absmax, jnp.float32)
    if a_absmax.shape != (qw.num_groups,):
        raise ValueError(f"static activation maxima of shape {a_absmax.shape} for a weight of {qw.k} input features: "
                         f"expected ({qw.num_groups},), one per group of {GROUP_SIZE}")
    if not isinstance(a_absmax, jax.core.Tracer) and not bool(jnp.all(jnp.isfinite(a_absmax) & (a_absmax >= 0))):
        raise ValueError("static activation maxima must be finite and ≥ 0; recalibrate (the calibration inputs held "
                         "inf or NaN)")
    return StaticMixedWeight(qw, a_absmax)


def static_codes(x: jax.Array, a_absmax: jax.Array, *, unit_scale: bool = False) -> QuantizedActivations:
    """x [M, K] float → its int8 codes with the fixed per-group maxima a_absmax [G] (the same rounding as
    `reference.quantize_groups` and `mixjax.quant.activations.fake_quant_act`). unit_scale: every scale 1 and
    `row_scale` set, for a weight whose scales hold the activation scales (`fold_scales`)."""
    m, k = x.shape
    g = a_absmax.shape[0]
    xg = jnp.pad(x.astype(jnp.float32), ((0, 0), (0, g * GROUP_SIZE - k))).reshape(m, g, GROUP_SIZE)
    amax = a_absmax.astype(jnp.float32)
    inv = jnp.where(amax > 0, 127.0 / jnp.where(amax > 0, amax, 1.0), 0.0)
    x_q = jnp.clip(jnp.floor(xg * inv[:, None] + 0.5), -127, 127).astype(jnp.int8)
    x_sum = jnp.sum(x_q.astype(jnp.int32), axis=-1).T  # [G, M]
    scale = jnp.ones((g, m), jnp.float32) if unit_scale else jnp.broadcast_to((amax / 127.0)[:, None], (g, m))
    return QuantizedActivations(x_q.reshape(m, g * GROUP_SIZE), scale, x_sum, lead=(m,), k=k,
                                dtype=jnp.dtype(x.dtype).name, row_scale=unit_scale)


def fold_scales(qw: MixedWeight, a_absmax: jax.Array) -> MixedWeight:
    """qw with each group's scales multiplied by the activation scale a_absmax[g] / 127 (the runtime int8 prefill
    matrix's too, if held): for codes whose scale is 1 (`static_codes(..., unit_scale=True)`)."""
    s = (a_absmax.astype(jnp.float32) / 127.0)[:, None]  # [G, 1]
    folded = dict(scale8=qw.scale8 * s, scale4=qw.scale4 * s)
    if qw.prefill_s is not None:
        folded["prefill_s"] = qw.prefill_s * s
    return dataclasses.replace(qw, **folded)
