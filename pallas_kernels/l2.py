"""Reading arrays into the GPU's L2 cache ahead of the kernel that needs them: a probe kernel.

The question it answered (benchmarks/NOTES-kernels.md item 57): at decode the small kernels between the
GEMVs leave DRAM idle; would a GEMV whose weight is already in L2 lose its ≈ 4 µs fixed cost? Measured on
the H200 (2026-12-03, `benchmarks/probe_l2.py`): no. A weight read twice in a row gains at most 1.5 µs
(o_proj), one read into L2 by this kernel first gains nothing measurable, and the kernel itself streams at
only 0.6–1.2 TB/s. It is not used by the model.

Pallas-Triton has no prefetch instruction and drops loads whose values go unused, so each program folds the
words it reads into one int32 that it stores: the store keeps the loads alive. `prefetch_words` is that
loop (for a kernel's extra programs), `l2_prefetch_pallas` a kernel of its own, `l2_prefetch_ref` what it
returns, and `as_rows` the [R, ROW_WORDS] int32 view of any array these read.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

ROW_WORDS = 256  # int32 words a row: 1 KiB
TILE_ROWS = 16  # rows one iteration loads: 16 KiB, 32 words a thread at 4 warps


def as_rows(a: jax.Array) -> jax.Array:
    """a (any shape, any dtype) → int32 [R, ROW_WORDS], its bytes in order, zero-padded to whole rows.
    For arrays whose bytes are a whole number of rows this is a bitcast (no copy)."""
    flat = a.reshape(-1)
    if flat.dtype.itemsize != 4:
        per = 4 // flat.dtype.itemsize
        if flat.size % per:
            flat = jnp.pad(flat, (0, per - flat.size % per))
        flat = lax.bitcast_convert_type(flat.reshape(-1, per), jnp.int32)
    else:
        flat = lax.bitcast_convert_type(flat, jnp.int32)
    if flat.size % ROW_WORDS:
        flat = jnp.pad(flat, (0, ROW_WORDS - flat.size % ROW_WORDS))
    return flat.reshape(-1, ROW_WORDS)


def _limit(total: int, share: float) -> int:  # rows in the first `share` of `total`, at least one
    return min(total, max(1, math.ceil(total * share)))


def prefetch_words(rows_ref, program, programs: int, share: float = 1.0) -> jax.Array:
    """Inside a kernel: program `program` of `programs` reads its part of the first `share` of rows_ref's
    rows (int32 [R, ROW_WORDS]) with L2 retention; returns the int32 sum of the words read (store it
    somewhere so that the loads stay)."""
    total = _limit(rows_ref.shape[0], share)
    per = -(-total // programs)
    per = -(-per // TILE_ROWS) * TILE_ROWS
    start = program * per
    r = lax.broadcasted_iota(jnp.int32, (TILE_ROWS, ROW_WORDS), 0)
    cols = pl.ds(0, ROW_WORDS)

    def body(i, acc):
        rows = start + i * TILE_ROWS + r
        tile = plgpu.load(rows_ref.at[pl.ds(start + i * TILE_ROWS, TILE_ROWS), cols],
                          mask=(rows < total) & (rows < start + per), other=0, eviction_policy="evict_last")
        return acc + tile

    acc = lax.fori_loop(0, per // TILE_ROWS, body, jnp.zeros((TILE_ROWS, ROW_WORDS), jnp.int32))
    return jnp.sum(acc)


def _kernel(*refs, programs: int, n: int, share: float):
    ins, out_ref = refs[:n], refs[n]
    p = pl.program_id(0)
    acc = jnp.int32(0)
    for ref in ins:
        acc = acc + prefetch_words(ref, p, programs, share)
    plgpu.store(out_ref.at[pl.ds(p, 1)], jnp.full((1,), acc, jnp.int32))


@functools.partial(jax.jit, static_argnames=("programs", "share", "num_warps", "interpret"))
def l2_prefetch_pallas(arrays, *, programs: int = 132, share: float = 1.0, num_warps: int = 4,
                       interpret: bool = False) -> jax.Array:
    """Reads the first `share` of every array in `arrays` (each through `as_rows`, in whole rows) with L2
    retention, split over `programs` programs; returns the per-program int32 sums [programs] (wrapping),
    which `l2_prefetch_ref` equals."""
    rows = [as_rows(a) for a in arrays]
    return pl.pallas_call(
        functools.partial(_kernel, programs=programs, n=len(rows), share=share),
        out_shape=jax.ShapeDtypeStruct((programs,), jnp.int32),
        grid=(programs,),
        interpret=interpret,
        name="l2_prefetch",
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
    )(*rows)


def l2_prefetch_ref(arrays, *, programs: int = 132, share: float = 1.0) -> jax.Array:
    """What `l2_prefetch_pallas` returns: per program, the wrapping int32 sum of its rows' words."""
    out = jnp.zeros((programs,), jnp.int32)
    for a in arrays:
        rows = as_rows(a)
        rows = rows[: _limit(rows.shape[0], share)]
        per = -(-rows.shape[0] // programs)
        per = -(-per // TILE_ROWS) * TILE_ROWS
        sums = jnp.sum(rows, axis=1, dtype=jnp.int32)  # [R]
        sums = jnp.pad(sums, (0, per * programs - sums.shape[0])) if per * programs > sums.shape[0] else sums
        out = out + jnp.sum(sums[: per * programs].reshape(programs, per), axis=1, dtype=jnp.int32)
    return out
