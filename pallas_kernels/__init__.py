"""Pallas GPU kernels for MixLLM mixed W4/W8 × A8 linears, with pure-JAX references.

Format: `pallas_kernels.format` (layout and nibble order documented there). References:
`pallas_kernels.reference`. Kernels: `pallas_kernels.kernels` (MMA, every M) and `pallas_kernels.gemv`
(dp4a on the CUDA cores, one activation row). Prefill: `pallas_kernels.mgpu` (Mosaic GPU int8 wgmma on
Hopper, after `pallas_kernels.unpack` builds the int8 matrix) and `pallas_kernels.dequant_dot` (XLA dot on
the bf16-dequantized weight, other GPUs). A Mosaic GPU
decode kernel (`pallas_kernels.mgpu_decode`, TMA-streamed packed weight) is an entry point of its own, not
yet dispatched (measured slower than the GEMV at M = 1). Entry points and GPU dispatch: `pallas_kernels.api`.
Beside the linears: `pallas_kernels.norm` (residual add + RMSNorm, optionally emitting int8 codes) and
`pallas_kernels.attention` (grouped-query attention over a KV cache; the decode step in one launch).
Static activation scales (the static-vs-dynamic ablation on the kernels): `pallas_kernels.static`.
"""

from pallas_kernels.api import mixed_matmul, quantize_activations
from pallas_kernels.attention import attend_ref, decode_attention_pallas, decode_attention_ref
from pallas_kernels.format import MixedWeight, dequantize, pack_mixed, pack_rtn, quantize_rtn, take_rows
from pallas_kernels.reference import dequant_matmul_ref, mixed_matmul_ref, quantize_activations_ref
from pallas_kernels.static import StaticMixedWeight, static_weight

__all__ = [
    "MixedWeight",
    "StaticMixedWeight",
    "attend_ref",
    "decode_attention_pallas",
    "decode_attention_ref",
    "dequant_matmul_ref",
    "dequantize",
    "mixed_matmul",
    "mixed_matmul_ref",
    "pack_mixed",
    "pack_rtn",
    "quantize_activations",
    "quantize_activations_ref",
    "quantize_rtn",
    "static_weight",
    "take_rows",
]
