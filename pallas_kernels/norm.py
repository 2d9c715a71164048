"""Residual add + RMSNorm in one launch (Pallas-Triton), beside its pure-JAX reference.

Why: a Llama decode step on the GPU is ≈ 690 kernels, and outside the GEMMs most are tiny XLA fusions of
the residual stream — per layer the residual add, the mean-square reduction and the normalising multiply,
twice (H200, session 8, `bench_generate.py --profile-top`: ≈ 255 µs of a 2.37 ms W4.4A8 b1 step in 190
launches of 1–1.5 µs). XLA does not fuse a row reduction with the broadcast multiply that consumes it, so
each norm costs three launches. This kernel does s = x + δ and h = RMSNorm(s)·w for one row per program:
one launch, the row read once. Measured wired into the model (session 8, results/generation.md): 64 fewer
launches but no time saved — the GEMV's split-K sum, fused by XLA into the residual add before, became a
launch of its own. So the model does not use it yet; the next step is a form that sums those partials too.

Arithmetic as `mixjax.model.rms_norm` after the add in the activations' dtype: s = x + δ rounded to the
dtype; the mean of s² in f32; y = s·rsqrt(mean + eps) rounded to the dtype; h = w·y in the dtype. Only the
order of the f32 sum differs from XLA's, so h can differ from the reference by one rounding of the dtype.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

MAX_WIDTH = 65536  # widest row one program takes (the row lives in registers; Llama-3-405B is 16384)


def add_rms_norm_ref(x: jax.Array, delta: jax.Array | None, w: jax.Array, eps: float) -> tuple[jax.Array, jax.Array]:
    """(s, h): s = x + δ (x itself when δ is None) in x's dtype, h = RMSNorm(s)·w, as `mixjax.model.rms_norm`."""
    s = x if delta is None else x + delta.astype(x.dtype)
    sf = s.astype(jnp.float32)
    y = sf * lax.rsqrt(jnp.mean(sf * sf, axis=-1, keepdims=True) + eps)
    return s, w.astype(x.dtype) * y.astype(x.dtype)


def _kernel(*refs, width: int, block: int, eps: float, has_delta: bool, dtype):
    if has_delta:
        x_ref, d_ref, w_ref, s_ref, h_ref = refs
    else:
        x_ref, w_ref, h_ref = refs
    r = pl.program_id(0)
    cols = jnp.arange(block)
    mask = cols < width
    s = plgpu.load(x_ref.at[r, cols], mask=mask, other=0.0)
    if has_delta:
        s = (s + plgpu.load(d_ref.at[r, cols], mask=mask, other=0.0)).astype(dtype)
        plgpu.store(s_ref.at[r, cols], s, mask=mask)
    sf = s.astype(jnp.float32)
    mean = jnp.sum(sf * sf) / width  # masked columns load as 0
    y = (sf * lax.rsqrt(mean + eps)).astype(dtype)
    w = plgpu.load(w_ref.at[cols], mask=mask, other=0.0).astype(dtype)
    plgpu.store(h_ref.at[r, cols], w * y, mask=mask)


@functools.partial(jax.jit, static_argnames=("eps", "interpret"))
def _add_rms_norm(x, delta, w, *, eps: float, interpret: bool):
    shape, d = x.shape, x.shape[-1]
    rows = x.reshape(-1, d)
    block = pl.next_power_of_2(d)
    args = (rows,) if delta is None else (rows, delta.reshape(-1, d).astype(x.dtype))
    out = jax.ShapeDtypeStruct(rows.shape, x.dtype)
    res = pl.pallas_call(
        functools.partial(_kernel, width=d, block=block, eps=eps, has_delta=delta is not None, dtype=x.dtype),
        out_shape=out if delta is None else (out, out),
        grid=(rows.shape[0],),
        interpret=interpret,
        name="add_rms_norm",
        compiler_params=plgpu.CompilerParams(num_warps=4 if block <= 4096 else 8, num_stages=1),
    )(*args, w)
    if delta is None:
        return x, res.reshape(shape)
    return res[0].reshape(shape), res[1].reshape(shape)


def add_rms_norm_pallas(x: jax.Array, delta: jax.Array | None, w: jax.Array, eps: float, *,
                        interpret: bool = False) -> tuple[jax.Array, jax.Array]:
    """x, δ [..., D] (δ may be None: the norm alone), w [D] → (s, h) as `add_rms_norm_ref`, one launch."""
    if x.ndim < 1 or w.shape != (x.shape[-1],):
        raise ValueError(f"add_rms_norm: w must be [D] with D = x.shape[-1]; got x {x.shape}, w {w.shape}")
    if delta is not None and delta.shape != x.shape:
        raise ValueError(f"add_rms_norm: delta must have x's shape {x.shape}, got {delta.shape}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"add_rms_norm: x must be floating point, got {x.dtype}")
    if x.shape[-1] > MAX_WIDTH:
        raise ValueError(f"add_rms_norm: rows of {x.shape[-1]} > {MAX_WIDTH} values: use add_rms_norm_ref")
    if x.size == 0:
        return add_rms_norm_ref(x, delta, w, eps)
    return _add_rms_norm(x, delta, w, eps=float(eps), interpret=interpret)
