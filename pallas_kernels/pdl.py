"""Programmatic dependent launch (PDL) inside our Pallas-Triton kernels (Hopper, sm_90+).

With XLA's `--xla_gpu_enable_pdl=true` every kernel is launched with CUDA's programmatic stream
serialization: a kernel may start once the previous one has *triggered* (`griddepcontrol.launch_dependents`
in each of its CTAs, or their exit), and must execute `griddepcontrol.wait` before it reads anything the
previous kernel wrote. XLA places the wait at the start of the kernels it generates (openxla/xla #38544)
but not in ours; measured on the H200 (2026-12-03, `benchmarks/probe_pdl.py`): with the flag alone a chain
of GEMVs overlapped by only 0.1 µs a launch (implicit trigger at exit) and the chain's span doubled.

What the decode step wants (benchmarks/NOTES-kernels.md item 58): the small kernels between GEMVs (norms,
attention, SwiGLU) trigger at their start, so the next GEMV's programs can start during them, issue their
weight loads (which do not depend on the previous kernel) and then wait before reading activations. Every
kernel that reads another kernel's output waits first, so enabling this is safe whatever is triggered.

Measured end to end (H200, b1, 2026-12-03): 2.03 → 1.98 ms a decode step with the flag and these
instructions, 488 → 499 tok/s (results/generation.md, session 15): within reach of noise, so off by default.
Session 22, once the norms ran in one launch (`norm.rms_norm_codes_pallas`): no gain left (1.96 ms span with and
without, 510 → 502 tok/s); the overlap it found had been with the norms' second launches.

Both instructions are no-ops when the kernel was not launched with the attribute. `ENABLED` (default off,
or `MIXJAX_PDL=1`) makes the kernels emit them; they are left out in interpret mode. Pallas's inline asm
is pure, so each instruction is tied to a value it passes through (`mov`): the wait to the index every
activation address is computed from, the trigger to the program id.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

_MODE = os.environ.get("MIXJAX_PDL", "0")  # "0" off; "1" kernels wait at their start; "2" the GEMV waits after
# issuing its first weight loads (the other kernels still at their start)
ENABLED = _MODE in ("1", "2")
WEIGHTS_FIRST = _MODE == "2"


def active(interpret: bool) -> bool:
    """Whether a kernel traced now emits the instructions: `ENABLED` is read when a kernel is traced (jitted
    kernels are cached: set it before their first call, or clear jax's caches)."""
    return ENABLED and not interpret


def _through(asm: str, value: jax.Array) -> jax.Array:
    """`value` (int32 scalar) back, computed by inline asm that runs `asm` first (one result: Pallas lowers
    no multi-result inline asm)."""
    v = jnp.full((1,), value, jnp.int32)
    (out,) = plgpu.elementwise_inline_asm(f"{asm}\n\tmov.b32 $0, $1;", args=[v], constraints="=r,r", pack=1,
                                          result_shape_dtypes=[jax.ShapeDtypeStruct((1,), jnp.int32)])
    return jnp.sum(out)


def wait_then(value: jax.Array, on: bool) -> jax.Array:
    """`value`, available only after `griddepcontrol.wait` (the previous kernel done and its writes visible):
    derive every address of the previous kernel's outputs from it."""
    return _through("griddepcontrol.wait;", value) if on else value


def trigger_then(value: jax.Array, on: bool) -> jax.Array:
    """`value` after `griddepcontrol.launch_dependents` (this CTA lets the next kernel start): use the
    result, so that the instruction stays."""
    return _through("griddepcontrol.launch_dependents;", value) if on else value


def program_ids(n: int, on: bool, *, trigger: bool = False) -> list[jax.Array]:
    """pl.program_id(0..n-1), each available only after `griddepcontrol.wait` (and, with `trigger`, after
    `griddepcontrol.launch_dependents` first): for kernels that wait at their start, every address derived
    from the program ids."""
    ids = [pl.program_id(i) for i in range(n)]
    if not on:
        return ids
    first = wait_then(trigger_then(ids[0], trigger), True)
    zero = first - ids[0]  # 0, but only after the wait: the compiler cannot fold it
    return [first, *(i + zero for i in ids[1:])]
