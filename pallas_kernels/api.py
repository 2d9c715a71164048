"""Public entry points: `mixed_matmul` and `quantize_activations`, dispatching on `implementation`.

"xla" runs the pure-JAX reference (the numerical spec, and the CPU fallback); "pallas" runs the GPU
fast path; "auto" picks it on an NVIDIA GPU, XLA elsewhere. The GPU fast path picks per call by
measured speed (`select_gpu_path`, H100 numbers in benchmarks/results/kernels.md):

- "gemv": one or two activation rows (`GEMV_MAX_M`) on a layer of at most `GEMV_MAX_ROWS` packed rows:
  the dp4a GEMV (`gemv.mixed_gemv_pallas`, 4 groups an iteration; at M = 1 one launch that quantizes in
  every program, at M = 2 on codes from the activation-quantization kernel); exact integer partials.
  H200 (session 8, device spans): 1.86–2.51× XLA's bf16 dot at M = 1 on the Llama-3-8B layers (6.7 µs
  at 4096→4096 … 23.3 µs at 4096→28672), 1.31–2.21× at M = 2, faster than the kernel on all of them;
  from M = 4 on the kernel ties or wins (the GEMV's CUDA-core work grows with M).
- "kernel": the Pallas-Triton integer kernel (`kernels.mixed_matmul_pallas`): decode and medium M,
  where the packed weight's bytes dominate; exact integer partials (rel. ≤ 1e-4 vs the reference).
- "mgpu": for 16-bit activations and M ≥ `MGPU_MIN_M` on a Hopper GPU (sm_90, wgmma): the weight
  unpacked to int8 in one pass, then a Mosaic GPU int8 wgmma GEMM with the per-group rescale
  (`mgpu.mixed_matmul_mgpu`); exact integer partials, bf16 output (rel. ≤ 1e-3 vs the reference).
  H100 (session 4, device spans, results/kernels.md): 0.80–1.03× XLA's bf16 dot at M = 2048–4096
  including the unpack (the GEMM alone 0.98–1.12×), against 0.64–0.84× for "dequant_dot"; from
  M = 256 it beats both the Triton kernel and "dequant_dot".
- "dequant_dot": the same M on other GPUs: int8-fake-quantized activations × the weight dequantized
  to bf16, one XLA dot (`dequant_dot.dequant_dot_matmul`): the same quantization, products rounded to
  bf16 (rel. ≤ 5e-3 vs the reference, the bound of every bf16-output kernel).
  f32 activations always take the exact integer kernel.

Not dispatched: `mgpu_decode.mixed_matmul_mgpu_decode` (Mosaic GPU decode, H100 session 5: 23–25 µs
against the GEMV's 21–22 µs at M = 1 on the 8B shapes; faster than "kernel" at M = 64 on 2 of 3 shapes).

The per-path entry points stay public for benchmarks and ablations.
"""

from __future__ import annotations

from typing import Literal

import jax

from pallas_kernels import reference
from pallas_kernels.dequant_dot import DEQUANT_DOT_MIN_M
from pallas_kernels.format import MixedWeight, NormedActivations, QuantizedActivations

Implementation = Literal["auto", "xla", "pallas"]  # as mixjax.linear.Implementation


def _resolve(implementation: Implementation) -> str:
    # Imported here: mixjax re-exports this package, so importing mixjax at module level would be circular.
    from mixjax.linear import resolve_implementation

    return resolve_implementation(implementation)


def _check_x(x, qw: MixedWeight) -> None:
    if isinstance(x, NormedActivations):
        if x.k != qw.k_padded or x.k != qw.k:
            raise ValueError(f"mixed_matmul: normed activations of {x.k} features for a weight of in_features "
                             f"{qw.k} ({qw.k_padded} padded)")
        return
    if isinstance(x, QuantizedActivations):
        if x.k != qw.k or x.x_q.shape[1] != qw.k_padded:
            raise ValueError(f"mixed_matmul: quantized activations of {x.k} features (codes {x.x_q.shape}) for a "
                             f"weight of in_features {qw.k} ({qw.k_padded} padded)")
        return
    if x.ndim != 2 or x.shape[1] != qw.k:
        raise ValueError(f"mixed_matmul: x must be [M, {qw.k}] (the weight's in_features), got {x.shape}")
    if not jax.numpy.issubdtype(x.dtype, jax.numpy.floating):
        raise TypeError(f"mixed_matmul: x must be floating point, got {x.dtype}")


def _check_backend(impl: str, interpret: bool) -> None:
    if impl == "pallas" and not interpret and jax.default_backend() != "gpu":
        raise ValueError(
            f"implementation='pallas' runs Triton kernels on an NVIDIA GPU, but the backend is "
            f"{jax.default_backend()!r}: use implementation='xla' (or 'auto'), or interpret=True to emulate"
        )


GEMV_MAX_ROWS = 262144  # packed rows up to which M ≤ GEMV_MAX_M takes the GEMV (H100, session 6: faster than
# the MMA kernel on every Llama-3-8B layer, 4096→28672 included: 29.6 vs 36.2 µs; H200, session 8: the int4
# LM head 4096→128256 too, 85.7 vs 128.3 µs at M = 1 and 100.1 vs 129.1 at M = 2). Beyond, the kernel.
GEMV_MAX_M = 2  # H200 (session 8): at M = 2 the GEMV beat the kernel on all four 8B layers (1.31–2.21× XLA
# bf16 against 1.14–1.69×), at M = 4 they tie (±7 %), at M = 8 the kernel wins (0.84–0.97× vs 1.11–1.69×)


MGPU_MIN_M = 256  # rows from which 16-bit activations take the wgmma path on a Hopper (H100 crossover)
MGPU_SHORT_M: tuple[int, int] | None = None  # (lo, hi): on a Hopper, 16-bit activations of lo..hi rows take
# the swapped-operand kernel in column tiles (`mgpu_decode`, the packed weight unpacked in registers, no int8
# copy of it). None (default) until measured: `bash benchmarks/device_session.sh s24c`, NOTES-kernels.md item 88


def has_wgmma(device=None) -> bool:
    """True on a Hopper GPU (compute capability 9.x), where the Mosaic GPU wgmma kernel runs."""
    device = device or jax.devices()[0]
    return device.platform == "gpu" and str(getattr(device, "compute_capability", "")).startswith("9.")


def select_gpu_path(m: int, dtype, *, dequant_dot_min_m: int | None = DEQUANT_DOT_MIN_M,
                    rows: int | None = None, wgmma: bool = False, mgpu_min_m: int = MGPU_MIN_M,
                    short_m: tuple[int, int] | None = None) -> str:
    """"gemv", "kernel", "mgpu_short", "mgpu" or "dequant_dot" for M rows of `dtype` activations on a weight of
    `rows` packed rows (None: not the GEMV); `wgmma`: the GPU is a Hopper (`has_wgmma`), where M within
    `short_m` (lo, hi) takes "mgpu_short" and other M ≥ `mgpu_min_m` "mgpu"; elsewhere M ≥
    `dequant_dot_min_m` takes "dequant_dot"; dequant_dot_min_m None: no prefill path at all (the integer
    kernel for every M > 1)."""
    if m <= GEMV_MAX_M and rows is not None and rows <= GEMV_MAX_ROWS:
        return "gemv"
    wide = jax.numpy.dtype(dtype).itemsize > 2  # f32 callers keep the exact integer kernel
    if dequant_dot_min_m is None or wide:
        return "kernel"
    if wgmma:
        if short_m is not None and short_m[0] <= m <= short_m[1]:
            return "mgpu_short"
        return "mgpu" if m >= mgpu_min_m else "kernel"
    return "dequant_dot" if m >= dequant_dot_min_m else "kernel"


def mixed_matmul(
    x,  # [M, K] float, or QuantizedActivations / NormedActivations of such an x
    qw: MixedWeight,
    *,
    implementation: Implementation = "auto",
    interpret: bool = False,
    dequant_dot_min_m: int | None = DEQUANT_DOT_MIN_M,
    partials: bool = False,
) -> jax.Array:  # [M, N] x.dtype, channel order; partials: f32 [S, M, N]
    """y = x @ W.T with W8A8/W4A8 per-group quantization (see `pallas_kernels.reference`).

    On GPU the path is picked by `select_gpu_path`; `interpret=True` always emulates the Pallas kernel.
    `QuantizedActivations` (codes from the producer of x) go to the integer kernels without their
    quantization step (the Mosaic GPU prefill GEMM too); the XLA path and "dequant_dot" take the codes as
    they are.
    `NormedActivations` (a norm's first launch only)
    go to the GEMV, which normalizes and quantizes its own groups; other paths make the codes first
    (`norm.normed_codes`, the reference on XLA). `partials=True` returns the split-K kernels'
    unsummed f32 partials [S, M, N] (S = 1 on the other paths)."""
    _check_x(x, qw)
    impl = "pallas" if interpret else _resolve(implementation)
    _check_backend(impl, interpret)
    if isinstance(x, NormedActivations):  # the GEMV normalizes and quantizes in its programs; else the codes
        from pallas_kernels import norm

        if impl == "xla":
            x = norm.normed_codes_ref(x)
        elif select_gpu_path(x.m, x.s.dtype, rows=qw.q8.shape[0] + qw.q4.shape[0]) != "gemv":
            x = norm.normed_codes(x, interpret=interpret)
    pre = isinstance(x, (QuantizedActivations, NormedActivations))
    m = x.m if pre else x.shape[0]
    dtype = jax.numpy.dtype(x.dtype)
    if m == 0:
        return jax.numpy.zeros((1, 0, qw.n), jax.numpy.float32) if partials else jax.numpy.zeros((0, qw.n), dtype)

    def whole(y):
        return y.astype(jax.numpy.float32)[None] if partials else y

    if impl == "xla":
        if pre:  # the producer's codes as they are (re-quantizing their values per group would change codes
            # with one scale a row, `QuantizedActivations.row_scale`)
            return whole(reference.mixed_codes_matmul_ref(x.x_q[:m], x.a_scale[:, :m].T, qw).astype(dtype))
        return whole(reference.mixed_matmul_ref(x, qw))
    path = select_gpu_path(m, dtype, dequant_dot_min_m=dequant_dot_min_m,
                           rows=qw.q8.shape[0] + qw.q4.shape[0], wgmma=not interpret and has_wgmma(),
                           short_m=MGPU_SHORT_M)
    if path == "gemv":
        from pallas_kernels import gemv

        return gemv.mixed_gemv_pallas(x, qw, interpret=interpret, partials=partials)
    if path == "mgpu":
        from pallas_kernels.mgpu import mixed_matmul_mgpu

        return whole(mixed_matmul_mgpu(x, qw))
    if path == "mgpu_short":
        from pallas_kernels.mgpu_decode import mixed_matmul_mgpu_decode

        return whole(mixed_matmul_mgpu_decode(x, qw))
    if not interpret and path == "dequant_dot":
        from pallas_kernels.dequant_dot import dequant_dot_matmul

        return whole(dequant_dot_matmul(x, qw))
    from pallas_kernels import kernels

    return kernels.mixed_matmul_pallas(x, qw, interpret=interpret, partials=partials)


def quantize_activations(
    x: jax.Array, *, implementation: Implementation = "auto", interpret: bool = False
) -> tuple[jax.Array, jax.Array]:
    """x [M, K] float → (x_q int8 [M, Kp], a_scale f32 [M, G]): int8 sym per (token, group of 128)."""
    impl = "pallas" if interpret else _resolve(implementation)
    _check_backend(impl, interpret)
    if impl == "xla":
        return reference.quantize_activations_ref(x)
    from pallas_kernels import kernels

    x_q, a_scale_t, _ = kernels.quantize_activations_pallas(x, interpret=interpret)
    return x_q[: x.shape[0]], a_scale_t[:, : x.shape[0]].T
