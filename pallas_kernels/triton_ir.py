"""The Triton IR that Pallas hands to XLA, captured on any machine (no GPU needed).

`capture_ttir(fn, *args)` lowers `jax.jit(fn)` for CUDA (`lowering_platforms=("cuda",)`) and returns the
Triton module text of every Pallas-Triton kernel in it. Used by `benchmarks/ptx_stats.py` (instruction
counts) and by tests that check what a kernel's GPU code contains.
"""

from __future__ import annotations

import jax


def capture_ttir(fn, *args) -> list[str]:
    """The Triton IR of every pallas_call in jit(fn)(*args), lowered for CUDA."""
    from jax._src.pallas.triton import pallas_call_registration as reg

    captured, orig = [], reg.lowering.lower_jaxpr_to_triton_module

    def hook(*a, **k):
        result = orig(*a, **k)
        captured.append(result.module.operation.get_asm(enable_debug_info=False))
        return result

    reg.lowering.lower_jaxpr_to_triton_module = hook
    try:
        jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
    finally:
        reg.lowering.lower_jaxpr_to_triton_module = orig
    return captured
