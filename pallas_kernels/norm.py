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

from pallas_kernels import pdl
from pallas_kernels.format import GROUP_SIZE

MAX_WIDTH = 65536  # widest row one program takes (the row lives in registers; Llama-3-405B is 16384)


def add_rms_norm_ref(x: jax.Array, delta: jax.Array | None, w: jax.Array, eps: float) -> tuple[jax.Array, jax.Array]:
    """(s, h): s = x + δ (x itself when δ is None) in x's dtype, h = RMSNorm(s)·w, as `mixjax.model.rms_norm`."""
    s = x if delta is None else x + delta.astype(x.dtype)
    sf = s.astype(jnp.float32)
    y = sf * lax.rsqrt(jnp.mean(sf * sf, axis=-1, keepdims=True) + eps)
    return s, w.astype(x.dtype) * y.astype(x.dtype)


def _kernel(*refs, width: int, block: int, eps: float, has_delta: bool, dtype, pdl_on: bool = False):
    if has_delta:
        x_ref, d_ref, w_ref, s_ref, h_ref = refs
    else:
        x_ref, w_ref, h_ref = refs
    (r,) = pdl.program_ids(1, pdl_on, trigger=True)
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
        functools.partial(_kernel, pdl_on=pdl.active(interpret),
                          width=d, block=block, eps=eps, has_delta=delta is not None, dtype=x.dtype),
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


# ------------------------------------------------------------------ residual add + RMSNorm + quantization
#
# Why (session 11): in a quantized decode step every RMSNorm feeds a mixed linear, which quantizes the
# norm's output again (one launch per linear, or inside every GEMV program). This kernel does the residual
# add (summing the previous linear's split-K partials itself, so that sum is not a launch of its own —
# the reason `add_rms_norm_pallas` saved nothing, session 8), the norm and the int8 quantization per
# group of 128 in one launch, one program per row; the linear then runs on the codes.

MAX_QUANT_ROWS = 64  # rows (tokens) up to which the model takes this kernel: decode batches


def quant_rows(m: int) -> int:
    """Rows of the codes for M input rows: a multiple of the decode kernels' row tiles (16, 32, 64)."""
    return 16 if m <= 16 else 32 if m <= 32 else -(-m // 64) * 64


def rms_norm_quant_ref(x: jax.Array, delta: jax.Array | None, w: jax.Array, eps: float, *, row_scale: bool = False,
                       delta_w: jax.Array | None = None):
    """(s, QuantizedActivations of h) with (s, h) = `add_rms_norm_ref(x, Σ_S delta, w)`: delta is None, an
    x-shaped array or f32 partials [S, *x.shape] summed in f32 and rounded to x's dtype before the add.
    row_scale: one activation scale a row (`QuantizedActivations.row_scale`), for the per-token prefill GEMM.
    delta_w [D]: Σ delta is itself RMS-normalized and × delta_w before the add (Gemma 3's sandwich norm on a
    branch's output), as `add_rms_norm_ref`'s h."""
    from pallas_kernels.format import QuantizedActivations
    from pallas_kernels.kernels import quantize_activations_xla

    if delta is not None and delta.ndim == x.ndim + 1:
        delta = jnp.sum(delta.astype(jnp.float32), axis=0).astype(x.dtype)
    if delta_w is not None:
        delta = add_rms_norm_ref(delta.astype(x.dtype), None, delta_w, eps)[1]
    s, h = add_rms_norm_ref(x, delta, w, eps)
    lead, d = x.shape[:-1], x.shape[-1]
    rows = h.reshape(-1, d)
    x_q, a_scale, x_sum = quantize_activations_xla(rows, block_m=quant_rows(rows.shape[0]), row_scale=row_scale)
    return s, QuantizedActivations(x_q, a_scale, x_sum, tuple(lead), d, jnp.dtype(x.dtype).name, row_scale)


def store_group_codes(h, q_ref, sc_ref, sum_ref, r, col, first: int, groups: int, amax=None) -> None:
    """Quantizes h [n, 128] f32 (groups first … first + n − 1 of row r, at feature indices col) as
    `reference.quantize_groups` does and stores codes, scales and code sums where the groups exist
    (< groups): the layout of `QuantizedActivations`. amax: the row's maximum |h| (one scale a row,
    `QuantizedActivations.row_scale`), or None: each group's own."""
    amax = jnp.max(jnp.abs(h), axis=1) if amax is None else jnp.broadcast_to(amax, h.shape[:1])  # [n]
    inv = jnp.where(amax > 0, 127.0 / jnp.where(amax > 0, amax, 1.0), 0.0)
    q = jnp.clip(jnp.floor(h * inv[:, None] + 0.5), -127.0, 127.0)
    g1 = first + jnp.arange(h.shape[0])
    plgpu.store(q_ref.at[r, col], q.astype(jnp.int8), mask=jnp.broadcast_to((g1 < groups)[:, None], h.shape))
    plgpu.store(sc_ref.at[g1, r], amax / 127.0, mask=g1 < groups)
    plgpu.store(sum_ref.at[g1, r], jnp.sum(q, axis=1).astype(jnp.int32), mask=g1 < groups)


def _norm_quant_kernel(*refs, m: int, width: int, groups: int, gp: int, parts: int, eps: float, dtype,
                       row_scale: bool = False, delta_norm: bool = False, pdl_on: bool = False):
    if parts and delta_norm:
        x_ref, d_ref, w_ref, dw_ref, s_ref, q_ref, sc_ref, sum_ref = refs
    elif parts:
        x_ref, d_ref, w_ref, s_ref, q_ref, sc_ref, sum_ref = refs
    else:
        x_ref, w_ref, q_ref, sc_ref, sum_ref = refs
    (r,) = pdl.program_ids(1, pdl_on, trigger=True)
    live_row = r < m
    src = jnp.minimum(r, m - 1)  # rows ≥ M (padding of the codes) read row M − 1, masked to zero
    gi = lax.broadcasted_iota(jnp.int32, (gp, GROUP_SIZE), 0)
    col = gi * GROUP_SIZE + lax.broadcasted_iota(jnp.int32, (gp, GROUP_SIZE), 1)  # [gp, 128] feature index
    valid = (col < width) & live_row
    s = plgpu.load(x_ref.at[src, col], mask=valid, other=0.0)
    if parts:
        total = jnp.zeros((gp, GROUP_SIZE), jnp.float32)
        for j in range(parts):  # the previous linear's split-K partials, summed here
            total = total + plgpu.load(d_ref.at[j, src, col], mask=valid, other=0.0).astype(jnp.float32)
        total = total.astype(dtype)
        if delta_norm:  # the branch's output normalized first (Gemma 3), as the norm below
            tf = total.astype(jnp.float32)
            t = (tf * lax.rsqrt(jnp.sum(tf * tf) / width + eps)).astype(dtype)
            total = (plgpu.load(dw_ref.at[col], mask=col < width, other=0.0).astype(dtype) * t).astype(dtype)
        s = (s + total).astype(dtype)
        plgpu.store(s_ref.at[src, col], s, mask=valid)
    sf = s.astype(jnp.float32)
    mean = jnp.sum(sf * sf) / width
    y = (sf * lax.rsqrt(mean + eps)).astype(dtype)
    h = (plgpu.load(w_ref.at[col], mask=col < width, other=0.0).astype(dtype) * y).astype(jnp.float32)
    store_group_codes(h, q_ref, sc_ref, sum_ref, r, col, 0, groups, jnp.max(jnp.abs(h)) if row_scale else None)


def chunk_cols(c, chunk: int):
    gi = lax.broadcasted_iota(jnp.int32, (chunk, GROUP_SIZE), 0)
    col = (c * chunk + gi) * GROUP_SIZE + lax.broadcasted_iota(jnp.int32, (chunk, GROUP_SIZE), 1)
    return gi, col  # [chunk, 128]: group within the chunk, feature index


def _rms_chunks(d: int, chunk: int) -> int:
    """Chunks of `chunk` groups of 128 covering d features."""
    return -(-(-(-d // GROUP_SIZE)) // chunk)


def _chunk_residual(x_ref, d_ref, s_ref, row, col, valid, *, chunk: int, parts: int, dtype):
    """s = x + Σ partials at (row, col) [chunk, 128] in the dtype, stored to s_ref where `valid` (x alone
    without partials: nothing stored)."""
    s = plgpu.load(x_ref.at[row, col], mask=valid, other=0.0)
    if parts:
        total = jnp.zeros((chunk, GROUP_SIZE), jnp.float32)
        for j in range(parts):
            total = total + plgpu.load(d_ref.at[j, row, col], mask=valid, other=0.0).astype(jnp.float32)
        s = (s + total.astype(dtype)).astype(dtype)
        plgpu.store(s_ref.at[row, col], s, mask=valid)
    return s


def _residual_kernel(*refs, width: int, chunk: int, parts: int, dtype, pdl_on: bool = False):
    """Two-launch form, first launch: program (row, chunk of groups) adds the partials to the residual and
    writes the chunk's sum of squares."""
    if parts:
        x_ref, d_ref, s_ref, ssq_ref = refs
    else:
        (x_ref, ssq_ref), d_ref, s_ref = refs, None, None
    r, c = pdl.program_ids(2, pdl_on, trigger=True)
    _, col = chunk_cols(c, chunk)
    s = _chunk_residual(x_ref, d_ref, s_ref, r, col, col < width, chunk=chunk, parts=parts, dtype=dtype)
    sf = s.astype(jnp.float32)
    one = jnp.arange(1)  # a one-element vector store (no scalar ref access)
    plgpu.store(ssq_ref.at[r, c + one], jnp.broadcast_to(jnp.sum(sf * sf), (1,)))


def _quant_chunk_kernel(s_ref, ssq_ref, w_ref, q_ref, sc_ref, sum_ref, *, m: int, width: int, chunk: int,
                        groups: int, chunks: int, eps: float, dtype, pdl_on: bool = False):
    """Second launch: program (row of the codes, chunk) normalizes its groups with the row's summed squares
    and quantizes them (the arithmetic of `_norm_quant_kernel`); rows ≥ M are the codes' zero padding."""
    r, c = pdl.program_ids(2, pdl_on, trigger=True)
    live_row = r < m
    src = jnp.minimum(r, m - 1)
    _, col = chunk_cols(c, chunk)
    valid = (col < width) & live_row
    ci = jnp.arange(pl.next_power_of_2(chunks))
    mean = jnp.sum(plgpu.load(ssq_ref.at[src, ci], mask=ci < chunks, other=0.0)) / width
    sf = plgpu.load(s_ref.at[src, col], mask=valid, other=0.0).astype(jnp.float32)
    y = (sf * lax.rsqrt(mean + eps)).astype(dtype)
    h = (plgpu.load(w_ref.at[col], mask=col < width, other=0.0).astype(dtype) * y).astype(jnp.float32)
    store_group_codes(h, q_ref, sc_ref, sum_ref, r, col, c * chunk, groups)


def _residual_sumsq(rows, delta, *, chunk: int, num_warps: int | None, interpret: bool):
    """Two-launch form, first launch: rows [M, D] (+ Σ delta [S, M, D]) → (s [M, D], sums of squares f32
    [M, chunks])."""
    m, d = rows.shape
    chunks = _rms_chunks(d, chunk)
    parts = 0 if delta is None else delta.shape[0]
    ssq = jax.ShapeDtypeStruct((m, chunks), jnp.float32)
    first = pl.pallas_call(
        functools.partial(_residual_kernel, pdl_on=pdl.active(interpret),
                          width=d, chunk=chunk, parts=parts, dtype=rows.dtype),
        out_shape=ssq if delta is None else (jax.ShapeDtypeStruct(rows.shape, rows.dtype), ssq),
        grid=(m, chunks), interpret=interpret, name="residual_sumsq",
        compiler_params=plgpu.CompilerParams(num_warps=num_warps or 4, num_stages=1),
    )(*((rows,) if delta is None else (rows, delta.reshape(parts, m, d))))
    return (rows, first) if delta is None else first


def _chunk_codes(s, ssq, w, *, eps: float, chunk: int, num_warps: int | None, interpret: bool):
    """Second launch: s [M, D], ssq [M, chunks], w [D] → codes, scales, sums (`QuantizedActivations` layout)."""
    m, d = s.shape
    mp, groups = quant_rows(m), -(-d // GROUP_SIZE)
    chunks = ssq.shape[1]
    return pl.pallas_call(
        functools.partial(_quant_chunk_kernel, pdl_on=pdl.active(interpret),
                          m=m, width=d, chunk=chunk, groups=groups, chunks=chunks, eps=eps,
                          dtype=s.dtype),
        out_shape=(jax.ShapeDtypeStruct((mp, groups * GROUP_SIZE), jnp.int8),
                   jax.ShapeDtypeStruct((groups, mp), jnp.float32), jax.ShapeDtypeStruct((groups, mp), jnp.int32)),
        grid=(mp, chunks), interpret=interpret, name="norm_quant_chunks",
        compiler_params=plgpu.CompilerParams(num_warps=num_warps or 4, num_stages=1),
    )(s, ssq, w)


@functools.partial(jax.jit, static_argnames=("eps", "chunk", "num_warps", "interpret"))
def _rms_norm_quant_2l(x, delta, w, *, eps: float, chunk: int, num_warps: int | None, interpret: bool):
    from pallas_kernels.format import QuantizedActivations

    lead, d = x.shape[:-1], x.shape[-1]
    kw = dict(chunk=chunk, num_warps=num_warps, interpret=interpret)
    s, ssq = _residual_sumsq(x.reshape(-1, d), delta, **kw)
    x_q, a_scale, x_sum = _chunk_codes(s, ssq, w, eps=eps, **kw)
    return s.reshape(x.shape), QuantizedActivations(x_q, a_scale, x_sum, tuple(lead), d, jnp.dtype(x.dtype).name)


@functools.partial(jax.jit, static_argnames=("eps", "chunk", "interpret"))
def _rms_norm_defer(x, delta, w, *, eps: float, chunk: int, interpret: bool):
    from pallas_kernels.format import NormedActivations

    lead, d = x.shape[:-1], x.shape[-1]
    s, ssq = _residual_sumsq(x.reshape(-1, d), delta, chunk=chunk, num_warps=None, interpret=interpret)
    return s.reshape(x.shape), NormedActivations(s, ssq, w, eps, chunk, tuple(lead))


def rms_norm_defer_pallas(x: jax.Array, delta: jax.Array | None, w: jax.Array, eps: float, *,
                          chunk_groups: int = 2, interpret: bool = False):
    """The two-launch `rms_norm_quant_pallas` without its second launch: (s = x + Σ delta, `NormedActivations`)
    for a linear that normalizes and quantizes its own groups (the M ≤ 2 GEMV); other consumers make the
    codes with `normed_codes` (the second launch, the same codes as `rms_norm_quant_pallas`)."""
    if w.shape != (x.shape[-1],) or x.shape[-1] % GROUP_SIZE or x.size == 0 or x.shape[-1] > MAX_WIDTH:
        raise ValueError(f"rms_norm_defer: x [..., D] with D a multiple of {GROUP_SIZE} (≤ {MAX_WIDTH}) and w [D]; "
                         f"got x {x.shape}, w {w.shape}: use rms_norm_quant_pallas")
    if delta is not None and delta.shape not in (x.shape, (delta.shape[0], *x.shape)):
        raise ValueError(f"rms_norm_defer: delta must be x's shape {x.shape} or [S, *{x.shape}], got {delta.shape}")
    if chunk_groups < 1 or chunk_groups & (chunk_groups - 1):
        raise ValueError(f"rms_norm_defer: chunk_groups must be a power of two ≥ 1, got {chunk_groups}")
    if delta is not None and delta.ndim == x.ndim:
        delta = delta[None]
    return _rms_norm_defer(x, delta, w, eps=float(eps), chunk=int(chunk_groups), interpret=interpret)


def normed_codes(x, *, interpret: bool = False):
    """`NormedActivations` → `QuantizedActivations` (the two-launch norm's second launch)."""
    return _normed_codes(x, interpret=interpret)


@functools.partial(jax.jit, static_argnames=("interpret",))
def _normed_codes(x, *, interpret: bool):
    from pallas_kernels.format import QuantizedActivations

    x_q, a_scale, x_sum = _chunk_codes(x.s, x.ssq, x.w, eps=x.eps, chunk=x.chunk, num_warps=None, interpret=interpret)
    return QuantizedActivations(x_q, a_scale, x_sum, x.lead, x.k, x.dtype)


def normed_codes_ref(x):
    """`NormedActivations` → `QuantizedActivations` through the reference (the XLA path)."""
    from pallas_kernels.format import QuantizedActivations
    from pallas_kernels.kernels import quantize_activations_xla

    _, h = add_rms_norm_ref(x.s, None, x.w, x.eps)
    x_q, a_scale, x_sum = quantize_activations_xla(h, block_m=quant_rows(x.s.shape[0]))
    return QuantizedActivations(x_q, a_scale, x_sum, x.lead, x.k, x.dtype)


@functools.partial(jax.jit, static_argnames=("eps", "num_warps", "row_scale", "interpret"))
def _rms_norm_quant(x, delta, w, *, eps: float, num_warps: int | None, row_scale: bool, interpret: bool,
                    delta_w=None):
    from pallas_kernels.format import QuantizedActivations

    lead, d = x.shape[:-1], x.shape[-1]
    rows = x.reshape(-1, d)
    m = rows.shape[0]
    mp, groups = quant_rows(m), -(-d // GROUP_SIZE)
    gp = pl.next_power_of_2(groups)
    parts = 0 if delta is None else delta.shape[0]
    args = (rows,) if delta is None else (rows, delta.reshape(parts, m, d))
    codes = (jax.ShapeDtypeStruct((mp, groups * GROUP_SIZE), jnp.int8), jax.ShapeDtypeStruct((groups, mp), jnp.float32),
             jax.ShapeDtypeStruct((groups, mp), jnp.int32))
    out_shape = codes if delta is None else (jax.ShapeDtypeStruct(rows.shape, x.dtype), *codes)
    res = pl.pallas_call(
        functools.partial(_norm_quant_kernel, pdl_on=pdl.active(interpret),
                          m=m, width=d, groups=groups, gp=gp, parts=parts, eps=eps, dtype=x.dtype,
                          row_scale=row_scale, delta_norm=delta_w is not None),
        out_shape=out_shape,
        grid=(mp,),
        interpret=interpret,
        name="rms_norm_quant_rows" if row_scale else "rms_norm_quant",
        compiler_params=plgpu.CompilerParams(num_warps=num_warps or (4 if gp * GROUP_SIZE <= 4096 else 8), num_stages=1),
    )(*args, w, *(() if delta_w is None else (delta_w,)))
    s = x if delta is None else res[0].reshape(x.shape)
    x_q, a_scale, x_sum = res[-3:]
    return s, QuantizedActivations(x_q, a_scale, x_sum, tuple(lead), d, jnp.dtype(x.dtype).name, row_scale)


def rms_norm_quant_pallas(x: jax.Array, delta: jax.Array | None, w: jax.Array, eps: float, *,
                          num_warps: int | None = None, chunk_groups: int | None = None, row_scale: bool = False,
                          delta_w: jax.Array | None = None, interpret: bool = False):
    """`rms_norm_quant_ref` in one launch: x [..., D] (the residual stream), delta None, x-shaped, or f32
    split-K partials [S, *x.shape] of the previous linear; w [D] → (s = x + Σ delta, QuantizedActivations
    of RMSNorm(s)·w) for a mixed linear to consume. The norm's f32 sum runs in another order than XLA's,
    so h (and a code) can differ from the reference by one rounding of x's dtype. num_warps: of the one
    program per row (None: 4 up to 4096 features, else 8).

    chunk_groups: None — one program per row does everything (a decode row's 8–28 partials are then read
    by one program); an int — two launches over (row, chunk of that many groups of 128): the residual add
    with each chunk's sum of squares, then the normalization and quantization of each chunk.

    row_scale: one activation scale a row (`QuantizedActivations.row_scale`; the per-token prefill GEMM,
    `mgpu.PREFILL_ACT_SCALE = "token"`), the one-program-a-row form only (its program holds the whole row).

    delta_w [D]: Σ delta is RMS-normalized and × delta_w before the add (Gemma 3's norm on o_proj's output, so its
    split-K partials need no launch of their own), the one-program-a-row form only: a row's sum of squares first."""
    if x.ndim < 1 or w.shape != (x.shape[-1],):
        raise ValueError(f"rms_norm_quant: w must be [D] with D = x.shape[-1]; got x {x.shape}, w {w.shape}")
    if delta_w is not None and (delta is None or delta_w.shape != w.shape or chunk_groups is not None):
        raise ValueError(f"rms_norm_quant: delta_w normalizes a delta before the add, in the one-program-a-row form: "
                         f"it needs a delta, the shape of w ({w.shape}, got {delta_w.shape}) and chunk_groups=None "
                         f"(got {chunk_groups})")
    if delta is not None and delta.shape not in (x.shape, (delta.shape[0], *x.shape)):
        raise ValueError(f"rms_norm_quant: delta must be x's shape {x.shape} or [S, *{x.shape}], got {delta.shape}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"rms_norm_quant: x must be floating point, got {x.dtype}")
    if row_scale and chunk_groups is not None:
        raise ValueError(f"rms_norm_quant: row_scale needs the one-program-a-row form (chunk_groups=None), got "
                         f"chunk_groups={chunk_groups}: a chunk's program does not see the rest of its row")
    if x.shape[-1] > MAX_WIDTH or x.size == 0:
        return rms_norm_quant_ref(x, delta, w, eps, row_scale=row_scale, delta_w=delta_w)
    if delta is not None and delta.ndim == x.ndim:
        delta = delta[None]
    if chunk_groups is not None:
        if chunk_groups < 1 or chunk_groups & (chunk_groups - 1):
            raise ValueError(f"rms_norm_quant: chunk_groups must be a power of two ≥ 1, got {chunk_groups}")
        return _rms_norm_quant_2l(x, delta, w, eps=float(eps), chunk=int(chunk_groups), num_warps=num_warps,
                                  interpret=interpret)
    return _rms_norm_quant(x, delta, w, eps=float(eps), num_warps=num_warps, row_scale=bool(row_scale),
                           interpret=interpret, delta_w=delta_w)


# ------------------------------------------------------------------ the norm's codes in one decode launch
#
# Why (session 22): at decode the two-launch form spends its second launch waiting for the row's sum of
# squares before it can normalize (65 launches, ≈ 133 µs of a 2.03 ms b1 step, NOTES-kernels.md item 56).
# RMSNorm(s)·w = r·(w·s) with r = rsqrt(mean(s²) + eps) one number per row, and a linear commutes with it.
# So one launch over (row, chunk) adds the partials, writes each chunk's sum of squares and quantizes w·s,
# whose groups need nothing from the rest of the row; the consumer of the linear's output multiplies by r
# (`format.RowRms`). Codes of w·s equal those of r·(w·s) in exact arithmetic (the group scale absorbs r);
# here w·s is exact in f32 (a product of two bf16 values), where the two-launch form rounds s·r and
# then w·(s·r) to the dtype, so a code can differ from it by one step.


def rms_norm_codes_ref(x: jax.Array, delta: jax.Array | None, w: jax.Array, eps: float, *, chunk_groups: int = 2):
    """(s, QuantizedActivations of w·s, RowRms of s) for s = x + Σ delta as `rms_norm_quant_ref`: the linear
    fed these codes returns its output on RMSNorm(s)·w divided by r = `RowRms.inv()`. w·s in f32; the sums of
    squares per chunk of `chunk_groups` groups of 128."""
    from pallas_kernels.format import QuantizedActivations, RowRms
    from pallas_kernels.kernels import quantize_activations_xla

    if delta is not None and delta.ndim == x.ndim + 1:
        delta = jnp.sum(delta.astype(jnp.float32), axis=0).astype(x.dtype)
    s = x if delta is None else x + delta.astype(x.dtype)
    lead, d = x.shape[:-1], x.shape[-1]
    sf = s.reshape(-1, d).astype(jnp.float32)
    chunks = _rms_chunks(d, chunk_groups)
    sq = jnp.pad(sf * sf, ((0, 0), (0, chunks * chunk_groups * GROUP_SIZE - d)))
    ssq = jnp.sum(sq.reshape(sf.shape[0], chunks, -1), axis=-1)
    h = w.astype(jnp.float32) * sf
    x_q, a_scale, x_sum = quantize_activations_xla(h, block_m=quant_rows(h.shape[0]))
    codes = QuantizedActivations(x_q, a_scale, x_sum, tuple(lead), d, jnp.dtype(x.dtype).name)
    return s, codes, RowRms(ssq, d, float(eps))


def _residual_codes_kernel(*refs, m: int, width: int, chunk: int, groups: int, parts: int, dtype,
                           pdl_on: bool = False):
    """Program (row of the codes, chunk): the residual add, the chunk's sum of squares and the codes of w·s
    for its groups; rows ≥ M are the codes' zero padding (they store neither s nor a sum)."""
    if parts:
        x_ref, d_ref, w_ref, s_ref, ssq_ref, q_ref, sc_ref, sum_ref = refs
    else:
        (x_ref, w_ref, ssq_ref, q_ref, sc_ref, sum_ref), d_ref, s_ref = refs, None, None
    r, c = pdl.program_ids(2, pdl_on, trigger=True)
    live_row = r < m
    src = jnp.minimum(r, m - 1)
    _, col = chunk_cols(c, chunk)
    s = _chunk_residual(x_ref, d_ref, s_ref, src, col, (col < width) & live_row, chunk=chunk, parts=parts,
                        dtype=dtype)
    sf = s.astype(jnp.float32)
    one = jnp.arange(1)
    plgpu.store(ssq_ref.at[src, c + one], jnp.broadcast_to(jnp.sum(sf * sf), (1,)), mask=(one == 0) & live_row)
    h = plgpu.load(w_ref.at[col], mask=col < width, other=0.0).astype(jnp.float32) * sf
    store_group_codes(h, q_ref, sc_ref, sum_ref, r, col, c * chunk, groups)


@functools.partial(jax.jit, static_argnames=("eps", "chunk", "num_warps", "interpret"))
def _rms_norm_codes(x, delta, w, *, eps: float, chunk: int, num_warps: int | None, interpret: bool):
    from pallas_kernels.format import QuantizedActivations, RowRms

    lead, d = x.shape[:-1], x.shape[-1]
    rows = x.reshape(-1, d)
    m = rows.shape[0]
    mp, groups = quant_rows(m), -(-d // GROUP_SIZE)
    chunks = _rms_chunks(d, chunk)
    parts = 0 if delta is None else delta.shape[0]
    args = (rows, w) if delta is None else (rows, delta.reshape(parts, m, d), w)
    outs = (jax.ShapeDtypeStruct((m, chunks), jnp.float32), jax.ShapeDtypeStruct((mp, groups * GROUP_SIZE), jnp.int8),
            jax.ShapeDtypeStruct((groups, mp), jnp.float32), jax.ShapeDtypeStruct((groups, mp), jnp.int32))
    if delta is not None:
        outs = (jax.ShapeDtypeStruct(rows.shape, x.dtype), *outs)
    res = pl.pallas_call(
        functools.partial(_residual_codes_kernel, pdl_on=pdl.active(interpret), m=m, width=d, chunk=chunk,
                          groups=groups, parts=parts, dtype=x.dtype),
        out_shape=outs, grid=(mp, chunks), interpret=interpret, name="rms_norm_codes",
        compiler_params=plgpu.CompilerParams(num_warps=num_warps or 4, num_stages=1),
    )(*args)
    s = x if delta is None else res[0].reshape(x.shape)
    ssq, x_q, a_scale, x_sum = res[-4:]
    return s, QuantizedActivations(x_q, a_scale, x_sum, tuple(lead), d, jnp.dtype(x.dtype).name), RowRms(ssq, d, eps)


def rms_norm_codes_pallas(x: jax.Array, delta: jax.Array | None, w: jax.Array, eps: float, *, chunk_groups: int = 2,
                          num_warps: int | None = None, interpret: bool = False):
    """`rms_norm_codes_ref` in one launch over (row, chunk of `chunk_groups` groups of 128): x [..., D] (the
    residual stream), delta None, x-shaped or f32 split-K partials [S, *x.shape], w [D] → (s, the codes of
    w·s, `RowRms`). The consumer of the linear fed these codes multiplies its output by `RowRms`'s r
    (`attend_new_tokens_pallas(rms=...)`, `silu_mul_quant_pallas(rms=...)`)."""
    if x.ndim < 1 or w.shape != (x.shape[-1],):
        raise ValueError(f"rms_norm_codes: w must be [D] with D = x.shape[-1]; got x {x.shape}, w {w.shape}")
    if delta is not None and delta.shape not in (x.shape, (delta.shape[0], *x.shape)):
        raise ValueError(f"rms_norm_codes: delta must be x's shape {x.shape} or [S, *{x.shape}], got {delta.shape}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"rms_norm_codes: x must be floating point, got {x.dtype}")
    if chunk_groups < 1 or chunk_groups & (chunk_groups - 1):
        raise ValueError(f"rms_norm_codes: chunk_groups must be a power of two ≥ 1, got {chunk_groups}")
    if x.size == 0:
        return rms_norm_codes_ref(x, delta, w, eps, chunk_groups=chunk_groups)
    if delta is not None and delta.ndim == x.ndim:
        delta = delta[None]
    return _rms_norm_codes(x, delta, w, eps=float(eps), chunk=int(chunk_groups), num_warps=num_warps,
                           interpret=interpret)


def load_inv_rms(ssq_ref, rows, chunks: int, width: int, eps: float) -> jax.Array:
    """Inside a kernel: r = rsqrt(Σ_c ssq[rows, c] / width + eps) for `rows` (an int or an int array; the
    result has its shape) from a `RowRms`'s ssq [M, C] ref."""
    ci = jnp.arange(pl.next_power_of_2(chunks))
    rows = jnp.asarray(rows)
    idx = rows[..., None], ci.reshape((1,) * rows.ndim + (-1,))
    total = jnp.sum(plgpu.load(ssq_ref.at[idx], mask=idx[1] < chunks, other=0.0), axis=-1)
    return lax.rsqrt(total / width + eps)
