"""The prefill fast path: fake-quantize the activations, dequantize the packed weight to bf16, one XLA dot.

Why: on the H100 our Pallas int8 prefill kernel is limited by its per-group rescale (see
benchmarks/NOTES-kernels.md) and ran 1612 µs at M=4096, K=4096, N=14336, where XLA's bf16 dot took
822 µs and "dequantize to bf16, then dot" 920 µs. Above a few hundred tokens the weight is read once for
many rows, so materializing it in bf16 (≈2× its packed bytes written, once per call) is cheaper than
the kernel's epilogue. `pallas_kernels.api.mixed_matmul` routes M ≥ `DEQUANT_DOT_MIN_M` here on GPU.

Numerics: the same W4A8/W8A8 quantization as `reference.mixed_matmul_ref` — activations are quantized to
int8 per (token, group of 128) with the reference formula — but the products are formed in bf16:
x̂ = bf16(x_q · s_a), ŵ = bf16(w_q · s_w) (the codes are exact in bf16; each scaled value is rounded
once, rel. 2⁻⁹), f32 accumulation. Against the reference this adds ≈ 1–2e-3 relative error on the
output, the size of one bf16 rounding of the output itself: tests hold it to the 5e-3 bound used for
every bf16-output kernel (`tests/test_kernels.py`). The api uses it only for 16-bit activations, so an
f32 caller keeps the exact integer kernel.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.format import GROUP_SIZE, HALF_GROUP, MixedWeight, QuantizedActivations
from pallas_kernels.reference import quantize_activations_ref

DEQUANT_DOT_MIN_M = 512  # tokens from which the api prefers this path (crossover of the H100 tables)


def dequantize_bf16(qw: MixedWeight) -> jax.Array:  # bf16 [N, Kp], channel order
    """Packed weight → bf16 in channel order, written as one elementwise pass (XLA fuses the gather)."""
    qw = qw.untiled()
    g = qw.num_groups
    rows = []
    if qw.q8.shape[0]:
        q8 = qw.q8.reshape(-1, g, GROUP_SIZE).astype(jnp.float32)  # [N8p, G, 128]
        rows.append(q8 * qw.scale8.T[..., None])
    if qw.q4.shape[0]:
        b = qw.q4.reshape(-1, g, 1, HALF_GROUP)  # [N4p, G, 1, 64] signed nibbles u − 8
        u8 = jnp.concatenate([jnp.left_shift(b, 4) >> 4, b >> 4], axis=2).reshape(-1, g, GROUP_SIZE)
        zero_off = 8.0 - qw.zero4.T.astype(jnp.float32)  # [N4p, G] 8 − z
        rows.append((u8.astype(jnp.float32) + zero_off[..., None]) * qw.scale4.T[..., None])
    w = jnp.concatenate(rows).reshape(-1, g * GROUP_SIZE)  # [N8p + N4p, Kp] packed order
    return w[qw.row_of_channel].astype(jnp.bfloat16)


@jax.jit
def dequant_dot_matmul(x, qw: MixedWeight) -> jax.Array:
    """x [M, K] float → [M, N] x.dtype: int8-fake-quantized activations × bf16-dequantized weight (XLA dot).
    x may be `QuantizedActivations` (a producer's codes, static or one-a-row scales): their codes and scales as they
    are, x̂ = bf16(x_q · s_a), where dequantizing and quantizing them again would move codes whose group
    maximum is not 127."""
    if isinstance(x, QuantizedActivations):
        m, dtype = x.m, jnp.dtype(x.dtype)
        x_q, a_scale = x.x_q[:m], x.a_scale[:, :m].T
    else:
        (x_q, a_scale), dtype = quantize_activations_ref(x), x.dtype  # [M, Kp] int8, [M, G]
    m, kp = x_q.shape
    x_hat = (x_q.reshape(m, -1, GROUP_SIZE).astype(jnp.float32) * a_scale[..., None]).reshape(m, kp)
    y = lax.dot_general(x_hat.astype(jnp.bfloat16), dequantize_bf16(qw), (((1,), (1,)), ((), ())),
                        preferred_element_type=jnp.float32)  # [M, N]
    return y.astype(dtype)

