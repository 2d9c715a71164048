"""The fused residual add + RMSNorm kernel (pallas_kernels/norm.py) against its reference and the model's
norm, on fresh random rows of awkward widths; Pallas interpret mode on CPU, the real kernel on a GPU."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixjax import model
from pallas_kernels import norm

INTERPRET = jax.default_backend() != "gpu"


def _ulps(a, b, dtype) -> float:
    """Largest |a − b| in units of the dtype's spacing at b's magnitude."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    eps = float(jnp.finfo(dtype).eps)
    return float(np.max(np.abs(a - b) / (np.maximum(np.abs(b), 1e-30) * eps)))


@pytest.mark.parametrize("shape, dtype", [((1, 4096), jnp.bfloat16), ((3, 576), jnp.bfloat16),
                                          ((2, 5, 200), jnp.float32), ((7, 5000), jnp.bfloat16)])
@pytest.mark.parametrize("with_delta", [True, False])
def test_add_rms_norm_matches_reference(shape, dtype, with_delta):
    rng = np.random.default_rng()
    x = jnp.asarray(rng.normal(size=shape) * rng.uniform(0.1, 10), dtype)
    delta = jnp.asarray(rng.normal(size=shape), dtype) if with_delta else None
    w = jnp.asarray(rng.normal(size=shape[-1]), jnp.float32)
    s, h = norm.add_rms_norm_pallas(x, delta, w, 1e-5, interpret=INTERPRET)
    s_ref, h_ref = norm.add_rms_norm_ref(x, delta, w, 1e-5)
    assert s.shape == h.shape == shape and s.dtype == h.dtype == dtype
    np.testing.assert_array_equal(np.asarray(s, np.float32), np.asarray(s_ref, np.float32))  # the same add
    # Only the f32 sum's order (and the GPU's rsqrt) differ: in bf16 y may round once differently and w·y
    # once more; in f32 the sum's and rsqrt's few ulps carry through.
    assert _ulps(h, h_ref, dtype) <= (2.0 if dtype == jnp.bfloat16 else 8.0)
    # And the reference is the model's norm after the residual add.
    np.testing.assert_array_equal(np.asarray(h_ref, np.float32),
                                  np.asarray(model.rms_norm(s_ref, w, 1e-5), np.float32))


def test_zero_rows_and_bad_inputs_are_named():
    x = jnp.zeros((0, 64), jnp.bfloat16)
    s, h = norm.add_rms_norm_pallas(x, x, jnp.ones(64), 1e-5, interpret=True)
    assert s.shape == h.shape == (0, 64)
    with pytest.raises(ValueError, match="w must be"):
        norm.add_rms_norm_pallas(jnp.ones((2, 64)), None, jnp.ones(32), 1e-5, interpret=True)
    with pytest.raises(ValueError, match="delta must"):
        norm.add_rms_norm_pallas(jnp.ones((2, 64)), jnp.ones((1, 64)), jnp.ones(64), 1e-5, interpret=True)
    with pytest.raises(TypeError, match="floating"):
        norm.add_rms_norm_pallas(jnp.ones((2, 64), jnp.int32), None, jnp.ones(64), 1e-5, interpret=True)
