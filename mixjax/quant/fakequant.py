"""`FakeQuantWeight`: simulated quantized inference for configurations the kernels cannot run.

Holds the dequantized weight (float [N, K], the exact values (q − z)·s of the quantized codes) and the
activation format; `matmul` fake-quantizes the input activations, then runs a float matmul. It is a
`QuantizedLinear`, so `mixjax.model.forward`, evaluation and generation run it unchanged.

`OneStepWeight`: MixLLM's two-step dequantization turned off (`mixjax ablate dequant`). The packed weight and the
int8 activations are both dequantized to bf16 and multiplied in one bf16 dot with f32 accumulation
(`pallas_kernels.dequant_dot`), instead of the integer product of a group first and its scales after.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

from mixjax.linear import Implementation
from mixjax.quant.activations import ActFormat, fake_quant_act

if TYPE_CHECKING:
    from pallas_kernels import MixedWeight


@functools.partial(jax.tree_util.register_dataclass, data_fields=["w", "a_absmax"], meta_fields=["act", "exact"])
@dataclasses.dataclass(frozen=True)
class FakeQuantWeight:
    """w: dequantized weight [N, K] (float); a_absmax: calibrated per-group |x| max [G] (static only).

    exact: f32 products at full precision on every backend (the simulation's contract). False: the backend's
    default (TF32 operands on a GPU, ≈ 3e-4 relative; a CPU's f32 products are exact either way), which the
    quantizer's calibration pass takes to carry the inputs from one layer to the next, where int4 noise dwarfs that
    rounding."""

    w: jax.Array
    a_absmax: jax.Array | None = None
    act: ActFormat = ActFormat()
    exact: bool = True

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.w.shape)

    def dequantize(self) -> jax.Array:
        return self.w.astype(jnp.float32)

    def matmul(self, x: jax.Array, *, implementation: Implementation = "auto") -> jax.Array:
        """x [..., K] → [..., N] in x's dtype (activations fake-quantized first; `implementation` unused)."""
        xq = fake_quant_act(x, self.act, self.a_absmax)
        # HIGHEST: an f32 simulation stays f32 on a GPU too, where the default rounds the operands to TF32 (≈ 3e-4
        # relative, session 30), as the kernels' integer reference does (bf16 operands are unaffected)
        y = jnp.einsum("...k,nk->...n", xq, self.w.astype(x.dtype), preferred_element_type=jnp.float32,
                       precision=jax.lax.Precision.HIGHEST if self.exact else None)
        return y.astype(x.dtype)


@functools.partial(jax.tree_util.register_dataclass, data_fields=["qw"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class OneStepWeight:
    """A `MixedWeight` multiplied without the two-step dequantization: x quantized to int8 per (token, group of
    128) as the kernels do, then x̂ = bf16(x_q·s_a) and ŵ = bf16((q − z)·s), one bf16 dot with f32 accumulation
    (`pallas_kernels.dequant_dot.dequant_dot_matmul`, XLA ops on every backend). Each scaled value is rounded to
    bf16 once (relative 2⁻⁹), where the two-step product is exact in integers before its f32 scaling."""

    qw: MixedWeight

    @property
    def shape(self) -> tuple[int, int]:
        return (self.qw.n, self.qw.k)

    def dequantize(self) -> jax.Array:
        return self.qw.dequantize()

    def matmul(self, x: jax.Array, *, implementation: Implementation = "auto") -> jax.Array:
        """x [..., K] → [..., N] in x's dtype (`implementation` unused: the path is XLA's)."""
        from pallas_kernels.dequant_dot import dequant_dot_matmul

        lead = x.shape[:-1]
        return dequant_dot_matmul(x.reshape(-1, x.shape[-1]), self.qw).reshape(*lead, self.qw.n)


def as_one_step(qparams):
    """Replaces every `MixedWeight` leaf by `OneStepWeight(leaf)`: the same codes and activation rounding, the
    products formed in bf16 after dequantizing (the two-step dequantization off)."""
    from pallas_kernels import MixedWeight, StaticMixedWeight

    def convert(leaf):
        if isinstance(leaf, StaticMixedWeight):
            raise ValueError("as_one_step: this model quantizes its activations with static scales; the two-step "
                             "dequantization ablation compares forms of MixLLM's dynamic scales (quantize with "
                             "ActFormat(static=False))")
        return OneStepWeight(leaf) if isinstance(leaf, MixedWeight) else leaf

    return jax.tree.map(convert, qparams, is_leaf=lambda x: isinstance(x, (MixedWeight, StaticMixedWeight)))


def dequantize_params(qparams):
    """Float params holding every quantized linear's dequantized weight ((q − z)·s, in the dtype of the final norm):
    the weight quantization's values as a float model (`mixjax export --dequantize`). The int8 activation rounding
    the kernels add is not part of them."""
    from mixjax.linear import QuantizedLinear

    dtype = qparams["norm"].dtype
    return jax.tree.map(lambda leaf: leaf.dequantize().astype(dtype) if isinstance(leaf, QuantizedLinear) else leaf,
                        qparams, is_leaf=lambda x: isinstance(x, QuantizedLinear))


def as_fake_quant(qparams, act: ActFormat = ActFormat()):
    """Replaces every `MixedWeight` leaf by the equivalent `FakeQuantWeight` (same codes, same int8
    per-(token, group 128) activation rounding; only the float summation order differs), and every
    `StaticMixedWeight` by one with its calibrated maxima (`act` with static=True). Useful where
    the kernels' XLA reference is slow (CPU perplexity sweeps)."""
    from pallas_kernels import MixedWeight, StaticMixedWeight

    def convert(leaf):
        if isinstance(leaf, StaticMixedWeight):
            return FakeQuantWeight(w=leaf.dequantize(), a_absmax=leaf.a_absmax,
                                   act=dataclasses.replace(act, static=True))
        if isinstance(leaf, MixedWeight):
            return FakeQuantWeight(w=leaf.dequantize(), act=act)
        return leaf

    return jax.tree.map(convert, qparams, is_leaf=lambda x: isinstance(x, (MixedWeight, StaticMixedWeight)))
