"""`FakeQuantWeight`: simulated quantized inference for configurations the kernels cannot run.

Holds the dequantized weight (float [N, K], the exact values (q − z)·s of the quantized codes) and the
activation format; `matmul` fake-quantizes the input activations, then runs a float matmul. It is a
`QuantizedLinear`, so `mixjax.model.forward`, evaluation and generation run it unchanged.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from mixjax.linear import Implementation
from mixjax.quant.activations import ActFormat, fake_quant_act


@functools.partial(jax.tree_util.register_dataclass, data_fields=["w", "a_absmax"], meta_fields=["act"])
@dataclasses.dataclass(frozen=True)
class FakeQuantWeight:
    """w: dequantized weight [N, K] (float); a_absmax: calibrated per-group |x| max [G] (static only)."""

    w: jax.Array
    a_absmax: jax.Array | None = None
    act: ActFormat = ActFormat()

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.w.shape)

    def dequantize(self) -> jax.Array:
        return self.w.astype(jnp.float32)

    def matmul(self, x: jax.Array, *, implementation: Implementation = "auto") -> jax.Array:
        """x [..., K] → [..., N] in x's dtype (activations fake-quantized first; `implementation` unused)."""
        xq = fake_quant_act(x, self.act, self.a_absmax)
        y = jnp.einsum("...k,nk->...n", xq, self.w.astype(x.dtype), preferred_element_type=jnp.float32)
        return y.astype(x.dtype)


def as_fake_quant(qparams, act: ActFormat = ActFormat()):
    """Replaces every `MixedWeight` leaf by the equivalent `FakeQuantWeight` (same codes, same int8
    per-(token, group 128) activation rounding; only the float summation order differs). Useful where
    the kernels' XLA reference is slow (CPU perplexity sweeps)."""
    from pallas_kernels import MixedWeight

    def convert(leaf):
        if isinstance(leaf, MixedWeight):
            return FakeQuantWeight(w=leaf.dequantize(), act=act)
        return leaf

    return jax.tree.map(convert, qparams, is_leaf=lambda x: isinstance(x, MixedWeight))
