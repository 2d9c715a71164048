"""The one linear function every projection in the model goes through.

Weights are stored as Hugging Face stores them: `w` is [N, K] (out_features, in_features), so
`y = x @ w.T`. A float weight runs as an XLA dot. Any other weight is an object implementing the
`QuantizedLinear` protocol (a registered pytree): quantized kernels (`pallas_kernels.MixedWeight`),
fake-quantized simulation (`mixjax.quant.FakeQuantWeight`) and the salience probe all plug in here,
so the model code never changes when the weight representation does.
"""

from __future__ import annotations

from typing import Literal, Protocol, runtime_checkable

import jax
import jax.numpy as jnp

Implementation = Literal["auto", "xla", "pallas"]


@runtime_checkable
class QuantizedLinear(Protocol):
    """A non-float linear weight of logical shape [N, K]."""

    @property
    def shape(self) -> tuple[int, int]:  # (N, K)
        ...

    def matmul(self, x: jax.Array, *, implementation: Implementation = "auto") -> jax.Array:
        """x [..., K] float → [..., N] in x's dtype."""
        ...


def resolve_implementation(implementation: Implementation) -> Literal["xla", "pallas"]:
    """"auto" picks Pallas kernels on an NVIDIA GPU and the XLA reference elsewhere."""
    if implementation == "auto":
        return "pallas" if jax.default_backend() == "gpu" else "xla"
    if implementation not in ("xla", "pallas"):
        raise ValueError(f"implementation={implementation!r}; expected 'auto', 'xla' or 'pallas'")
    return implementation


def linear(
    x: jax.Array,  # [..., K]
    w,  # [N, K] float array, or a QuantizedLinear
    bias: jax.Array | None = None,  # [N]
    *,
    implementation: Implementation = "auto",
) -> jax.Array:  # [..., N]
    if isinstance(w, QuantizedLinear):
        y = w.matmul(x, implementation=implementation)
    else:
        y = jnp.einsum("...k,nk->...n", x, w.astype(x.dtype), preferred_element_type=jnp.float32).astype(x.dtype)
    if bias is not None:
        y = y + bias.astype(y.dtype)
    return y
