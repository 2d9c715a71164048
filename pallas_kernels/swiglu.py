"""SwiGLU that hands int8 codes to the down projection (Pallas-Triton), beside its pure-JAX reference.

Why: in a quantized decode step the fused gate/up linear returns f32 split-K partials; XLA sums them into
SiLU(gate)·up (one fusion), and the down projection's GEMV then quantizes that row again inside every one
of its programs (block-wide reductions: the GEMV's main stall, benchmarks/NOTES-kernels.md item 41; on
codes its loop is 214 PTX instructions instead of 309). This kernel does the partial sum, SiLU(gate)·up in
the activations' dtype and the int8 quantization per group of 128 in the one launch that XLA's fusion
was: every group is independent, so a row spreads over many programs (program = row × chunk of groups).
The output is a `QuantizedActivations` that `mixed_matmul` consumes without quantizing.

At prefill (thousands of rows, `model.PREFILL_CODES`) a program of the per-row form holds too little work; the
blocked form gives one `BLOCK_ROWS` (16) rows × one group. At 2048 rows × F = 14336 on an H200: 49 µs (57 with
64 rows), against 95 µs per row and 72 µs for XLA's fusion plus the prefill GEMM's own quantization launch
(NOTES-kernels.md items 66, 70).

With one activation scale a row (`row_scale`, the per-token prefill GEMM of `mgpu.PREFILL_ACT_SCALE = "token"`)
a program needs its whole row: the row form gives one program a row, which walks the row twice in chunks of
`ROW_CHUNK` groups, first for the row's maximum, then for the codes. Its second walk reads what the first read
≈ 57 KB before (F = 14336), so from L2 rather than memory. A chunk as wide as the row (128 groups) walks once,
with the row in registers: the default (`ROW_CHUNK`, `ROW_WARPS`), the fastest row form measured on the H200.

Arithmetic as `mixjax.model`: gate and up are the linear's output rounded to the dtype (Σ partials in f32),
h = silu(gate)·up in the dtype (silu(x) = x·sigmoid(x), computed in f32 and rounded once — XLA may keep
more precision inside its fusion, so h can differ from the reference by a rounding of the dtype), then
`reference.quantize_groups`. `act="gelu_tanh"`: GeGLU (Gemma), GELU's tanh form in place of SiLU, the same way.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import pdl
from pallas_kernels.format import GROUP_SIZE, HALF_GROUP
from pallas_kernels.norm import chunk_cols, load_inv_rms, quant_rows, store_group_codes

MAX_ROWS = 64  # tokens up to which the model takes this kernel at decode (one program per row and chunk)
BLOCK_ROWS = 16  # rows a program of the blocked form (prefill, `model.PREFILL_CODES`); NOTES-kernels.md item 70
ROW_CHUNK = 128  # groups of 128 a step of the row form (`row_scale`): 128 walks a row of up to 16384 features once,
ACTIVATIONS = ("silu", "gelu_tanh")  # the gate's activation (`LlamaConfig.mlp_act`)
ROW_WARPS = 16  # with this many warps. H200, session 30 (`bench_norm.py --row-scale`, M = 2048, F = 14336): 59.3 µs
# against 85.7 for 8 groups × 4 warps (the first default) and 49.1 for the per-group blocked form; NOTES item 100


def silu_mul_quant_ref(gate_up: jax.Array, dtype=None, *, partials: bool = False, rms=None, row_scale: bool = False,
                       act: str = "silu"):
    """gate_up [..., 2F] in the activations' dtype, or (partials=True) f32 split-K partials [S, ..., 2F]
    summed and rounded to `dtype` → QuantizedActivations of silu(gate)·up [..., F] (gate: the first F).
    rms (`format.RowRms`, one row per token): gate and up are first multiplied by its r in f32 (the linear ran
    on the codes of `norm.rms_norm_codes_pallas`). row_scale: one activation scale a row
    (`QuantizedActivations.row_scale`). act: "silu" (SwiGLU) or "gelu_tanh" (GeGLU: GELU's tanh approximation)."""
    from pallas_kernels.format import QuantizedActivations
    from pallas_kernels.kernels import quantize_activations_xla

    dtype = jnp.dtype(dtype or gate_up.dtype)
    y = jnp.sum(gate_up.astype(jnp.float32), axis=0) if partials else gate_up
    if rms is not None:
        y = y.astype(jnp.float32) * rms.inv().reshape(y.shape[:-1])[..., None]
    y = y.astype(dtype)
    f = y.shape[-1] // 2
    gate = y[..., :f]
    h = (jax.nn.silu(gate) if act == "silu" else jax.nn.gelu(gate, approximate=True)) * y[..., f:]
    lead = h.shape[:-1]
    rows = h.reshape(-1, f)
    x_q, a_scale, x_sum = quantize_activations_xla(rows, block_m=quant_rows(rows.shape[0]), row_scale=row_scale)
    return QuantizedActivations(x_q, a_scale, x_sum, tuple(lead), f, dtype.name, row_scale)


def _gated(gate, up, dtype, act: str = "silu"):
    """act(gate)·up in the dtype, returned in f32: gate f32 and up in the dtype (`_kernel`'s arithmetic)."""
    if act == "silu":
        a = gate / (1.0 + jnp.exp(-gate))
    else:  # GELU, tanh form: 0.5·g·(1 + tanh(√(2/π)·(g + 0.044715·g³)))
        a = 0.5 * gate * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (gate + 0.044715 * gate * gate * gate)))
    return (a.astype(dtype) * up).astype(dtype).astype(jnp.float32)


def _row_kernel(x_ref, q_ref, sc_ref, sum_ref, *, m: int, f: int, groups: int, chunk: int, dtype,
                pdl_on: bool = False, act: str = "silu"):
    """One program a row of the codes (rows ≥ M are their zero padding): a first walk over the row in chunks
    of `chunk` groups finds max |h|, a second quantizes every group with that one scale (`row_scale`); a chunk
    that covers the row takes one walk."""
    (r,) = pdl.program_ids(1, pdl_on, trigger=True)
    live_row = r < m
    src = jnp.minimum(r, m - 1)

    def gated(c):
        _, col = chunk_cols(c, chunk)
        valid = (col < f) & live_row
        gate = plgpu.load(x_ref.at[src, col], mask=valid, other=0.0).astype(jnp.float32)
        return _gated(gate, plgpu.load(x_ref.at[src, col + f], mask=valid, other=0.0), dtype, act), col

    chunks = -(-groups // chunk)
    if chunks == 1:  # the whole row in one step: one walk
        h, col = gated(0)
        store_group_codes(h, q_ref, sc_ref, sum_ref, r, col, 0, groups, jnp.max(jnp.abs(h)))
        return
    amax = lax.fori_loop(0, chunks, lambda c, a: jnp.maximum(a, jnp.max(jnp.abs(gated(c)[0]))), jnp.float32(0.0))

    def store(c, carry):
        h, col = gated(c)
        store_group_codes(h, q_ref, sc_ref, sum_ref, r, col, c * chunk, groups, amax)
        return carry

    lax.fori_loop(0, chunks, store, 0)


def _kernel(*refs, m: int, f: int, groups: int, chunk: int, parts: int, dtype, rms: tuple | None = None,
            pdl_on: bool = False, act: str = "silu"):
    x_ref, *ssq_ref, q_ref, sc_ref, sum_ref = refs
    r, c = pdl.program_ids(2, pdl_on, trigger=True)
    live_row = r < m
    src = jnp.minimum(r, m - 1)  # rows ≥ M (the codes' padding) read row M − 1, masked to zero
    _, col = chunk_cols(c, chunk)  # [chunk, 128] feature indices
    valid = (col < f) & live_row

    inv = load_inv_rms(ssq_ref[0], src, *rms) if rms else None

    def load(cols):  # the linear's output at these columns (× r), in the dtype
        if not parts:
            total = plgpu.load(x_ref.at[src, cols], mask=valid, other=0.0)
        else:
            total = jnp.zeros((chunk, GROUP_SIZE), jnp.float32)
            for j in range(parts):
                total = total + plgpu.load(x_ref.at[j, src, cols], mask=valid, other=0.0).astype(jnp.float32)
        if rms:
            total = total.astype(jnp.float32) * inv
        return total.astype(dtype)

    h = _gated(load(col).astype(jnp.float32), load(col + f), dtype, act)
    store_group_codes(h, q_ref, sc_ref, sum_ref, r, col, c * chunk, groups)


def _block_kernel(x_ref, *refs, m: int, f: int, block: int, parts: int, dtype, rms: tuple | None = None,
                  pdl_on: bool = False, act: str = "silu"):
    """One program per (block of rows, group): `_kernel`'s arithmetic on [block, 64] halves, stored as
    `kernels.quantize_activations_pallas` stores its codes (prefill: thousands of rows)."""
    from pallas_kernels.kernels import store_quantized_halves

    *ssq_ref, q_ref, sc_ref, sum_ref = refs
    r, g = pdl.program_ids(2, pdl_on, trigger=True)
    rows = r * block + jnp.arange(block)
    inv = load_inv_rms(ssq_ref[0], jnp.minimum(rows, m - 1), *rms)[:, None] if rms else None
    halves = []
    for h in range(2):
        cols = g * GROUP_SIZE + h * HALF_GROUP + jnp.arange(HALF_GROUP)
        mask = (rows < m)[:, None] & (cols < f)[None, :]

        def load(c):  # the linear's output at columns c of these rows, in the dtype (rows ≥ M, cols ≥ F → 0)
            src = jnp.minimum(rows, m - 1)[:, None], c[None, :]
            if not parts:
                total = plgpu.load(x_ref.at[src], mask=mask, other=0.0)
            else:
                total = jnp.zeros((block, HALF_GROUP), jnp.float32)
                for j in range(parts):
                    total = total + plgpu.load(x_ref.at[(j, *src)], mask=mask, other=0.0).astype(jnp.float32)
            if rms:
                total = total.astype(jnp.float32) * inv
            return total.astype(dtype)

        halves.append(_gated(load(cols).astype(jnp.float32), load(cols + f), dtype, act))
    store_quantized_halves(q_ref, sc_ref, sum_ref, r * block, g, block, *halves)


@functools.partial(jax.jit, static_argnames=("dtype", "partials", "chunk", "num_warps", "blocked", "row_scale",
                                             "act", "interpret"))
def _silu_mul_quant(gate_up, rms, *, dtype, partials: bool, chunk: int, num_warps: int, blocked: int, row_scale: bool,
                    act: str, interpret: bool):
    from pallas_kernels.format import QuantizedActivations

    parts = gate_up.shape[0] if partials else 0
    lead = gate_up.shape[1:-1] if parts else gate_up.shape[:-1]
    f = gate_up.shape[-1] // 2
    m = math.prod(lead)
    x = gate_up.reshape(parts, m, 2 * f) if parts else gate_up.reshape(m, 2 * f)
    mp, groups = quant_rows(m), -(-f // GROUP_SIZE)
    static_rms = None if rms is None else (rms.ssq.shape[1], rms.width, rms.eps)
    if row_scale:
        kernel = functools.partial(_row_kernel, pdl_on=pdl.active(interpret), m=m, f=f, groups=groups,
                                   chunk=chunk, dtype=dtype, act=act)
        grid = (mp,)
    elif blocked:
        block = min(blocked, mp)  # mp is a multiple of it (`quant_rows`)
        kernel = functools.partial(_block_kernel, pdl_on=pdl.active(interpret), m=m, f=f, block=block,
                                   parts=parts, dtype=dtype, rms=static_rms, act=act)
        grid = (mp // block, groups)
    else:
        kernel = functools.partial(_kernel, pdl_on=pdl.active(interpret), m=m, f=f, groups=groups, chunk=chunk,
                                   parts=parts, dtype=dtype, rms=static_rms, act=act)
        grid = (mp, -(-groups // chunk))
    x_q, a_scale, x_sum = pl.pallas_call(
        kernel,
        out_shape=(jax.ShapeDtypeStruct((mp, groups * GROUP_SIZE), jnp.int8),
                   jax.ShapeDtypeStruct((groups, mp), jnp.float32), jax.ShapeDtypeStruct((groups, mp), jnp.int32)),
        grid=grid,
        interpret=interpret,
        name="silu_mul_quant_rows" if row_scale else "silu_mul_quant",
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
    )(x, *(() if rms is None else (rms.ssq,)))
    return QuantizedActivations(x_q, a_scale, x_sum, tuple(lead), f, jnp.dtype(dtype).name, row_scale)


def silu_mul_quant_pallas(gate_up: jax.Array, dtype=None, *, partials: bool = False, chunk_groups: int = 2,
                          num_warps: int | None = None, blocked: bool | int | None = None, rms=None,
                          row_scale: bool = False, row_chunk: int | None = None, act: str = "silu",
                          interpret: bool = False):
    """`silu_mul_quant_ref` in one launch over (row, chunk of `chunk_groups` groups of 128), or with
    `blocked` over (block of rows, group): True — `BLOCK_ROWS` rows, an int — that many (8, 16, 32 or 64).
    None: blocked past `MAX_ROWS` rows (prefill). rms: a `format.RowRms` with one row per token (see the
    reference). num_warps None: 4, or `ROW_WARPS` in the row form. row_scale: one activation scale a row, by the
    row form (one program a row, `row_chunk` groups a step, None: `ROW_CHUNK`; `chunk_groups` and `blocked` do
    not apply), on a linear's plain output (no
    partials, no rms: the prefill GEMM's). act: the gate's activation, one of `ACTIVATIONS`."""
    dtype = jnp.dtype(dtype or gate_up.dtype)
    if act not in ACTIVATIONS:
        raise ValueError(f"silu_mul_quant: act={act!r}; expected one of {', '.join(ACTIVATIONS)}")
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"silu_mul_quant: the activations' dtype must be floating point, got {dtype}")
    if partials and (gate_up.dtype != jnp.float32 or gate_up.ndim < 2):
        raise ValueError(f"silu_mul_quant: partials must be f32 [S, ..., 2F]; got {gate_up.dtype} {gate_up.shape}")
    if gate_up.ndim < 1 or gate_up.shape[-1] % 2:
        raise ValueError(f"silu_mul_quant: gate_up must be [..., 2F] (gate, then up); got {gate_up.shape}")
    if chunk_groups < 1 or chunk_groups & (chunk_groups - 1):
        raise ValueError(f"silu_mul_quant: chunk_groups must be a power of two ≥ 1, got {chunk_groups}")
    row_chunk = ROW_CHUNK if row_chunk is None else row_chunk
    if row_scale and num_warps is None:
        num_warps = ROW_WARPS
    num_warps = 4 if num_warps is None else num_warps
    if row_chunk < 1 or row_chunk & (row_chunk - 1):
        raise ValueError(f"silu_mul_quant: row_chunk must be a power of two ≥ 1, got {row_chunk}")
    rows = math.prod(gate_up.shape[1:-1] if partials else gate_up.shape[:-1])
    if rms is not None and (rms.ssq.ndim != 2 or rms.ssq.shape[0] != rows):
        raise ValueError(f"silu_mul_quant: rms must hold one row of sums of squares per token, [{rows}, C]; got "
                         f"{rms.ssq.shape}")
    if row_scale and (partials or rms is not None):
        raise ValueError("silu_mul_quant: row_scale takes the linear's output in the activations' dtype, not "
                         "split-K partials or a RowRms (the per-token prefill GEMM's output, `mgpu.PREFILL_ACT_SCALE`)")
    if gate_up.size == 0:
        return silu_mul_quant_ref(gate_up, dtype, partials=partials, rms=rms, row_scale=row_scale, act=act)
    if blocked is None:
        blocked = rows > MAX_ROWS
    if blocked is True:
        blocked = BLOCK_ROWS
    if blocked not in (False, 8, 16, 32, 64):
        raise ValueError(f"silu_mul_quant: blocked must be a bool, None or 8, 16, 32, 64 rows, got {blocked!r}")
    return _silu_mul_quant(gate_up, rms, dtype=dtype, partials=bool(partials),
                           chunk=int(row_chunk if row_scale else chunk_groups),
                           num_warps=int(num_warps), blocked=int(blocked), row_scale=bool(row_scale),
                           act=act, interpret=interpret)
