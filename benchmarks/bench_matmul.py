"""Benchmark the mixed W4/W8 × A8 kernels against XLA on Llama-3-8B linear shapes, side by side, one run.

    python benchmarks/bench_matmul.py                       # full grid
    python benchmarks/bench_matmul.py --shapes 4096x14336 --ms 1,16 --variants mixed,xla_bf16
    python benchmarks/bench_matmul.py --sweep               # also time alternative kernel configs
    python benchmarks/bench_matmul.py --ms 1,16,2048 --variants xla_bf16,mixed_v4,mixed,api \
        --large-m-variants xla_bf16,mixed,xla_dequant,api   # old vs new paths, side by side

Variants: xla_bf16 / xla_int8 / xla_int4 (plain XLA dots; xla_int4: a native int4 weight, no group scales), gemv
(the M = 1 GEMV, its default), w8a8 / w4a8 / mixed (the Pallas integer kernel at 100% / 0% / 10% 8-bit
channels), the GEMV's and the kernel's default configurations with some fields changed (`GEMV_OVERRIDES`,
`MIXED_OVERRIDES`: gemv_qf, gemv_1l, gemv_xq, mixed_b8, mixed_xq, mixed_pf3, mixed_pf3s2/s4, mixed_wave),
mixed_dt (the kernel's 32-row decode tiles with split-K up to M = 256),
mixed_v4 (the kernel as configured at call 4), mixed_f32out (the kernel returning its f32 accumulator, no
convert launch), api (`pallas_kernels.mixed_matmul`, implementation="pallas": the dispatched GPU path; api_tiled: the
same on tiled codes, `format.tile_codes`, the model's order on a GPU since session 38),
dequant_dot (fake-quant activations × bf16-dequantized weight, XLA dot), xla_dequant (bf16 x ×
`reference.dequant_matmul_ref`), float_dequant (Pallas ablation), mgpu / mgpu_decode / mgpu_decode_fold (Mosaic GPU;
_fold: `DecodeConfig(fold=True)`).

Every variant is first checked against its reference on the same inputs (rel. error printed), then
timed: R copies of the weights and activations (R·weight bytes > 100 MB, beyond the 50 MB L2) are run
inside one jitted program, the median over repeats of the whole program divided by R is reported.
The weight-read floor is the bytes a variant must read (weights in their format, scales, activations,
output) over the measured device-to-device copy bandwidth.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import json
import math
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from pallas_kernels import format as fmt  # noqa: E402
from pallas_kernels import api, dequant_dot, gemv, kernels, mgpu, mgpu_decode, reference  # noqa: E402

SHAPES = ((4096, 4096), (4096, 14336), (14336, 4096))  # (K, N) of Llama-3-8B linears
MS = (1, 16, 64, 256, 1024, 4096)
VARIANTS = ("xla_bf16", "xla_int8", "xla_dequant", "w8a8", "w4a8", "mixed", "float_dequant", "api", "api_tiled")
SHARE = {"w8a8": 1.0, "w4a8": 0.0, "mixed": 0.1, "float_dequant": 0.1, "xla_ref": 0.1, "xla_dequant": 0.1,
         "mixed_v4": 0.1, "gemv": 0.1, "mixed_dt": 0.1, "mixed_f32out": 0.1, "api": 0.1, "api_tiled": 0.1,
         "dequant_dot": 0.1,
         "mgpu": 0.1, "mgpu_decode": 0.1, "mgpu_decode_fold": 0.1, "mgpu_decode64": 0.1}
ROTATE_BYTES = 100e6
GEMV_OVERRIDES = {  # variant → GemvConfig fields changed from `gemv.choose_gemv_config`'s default
    "gemv_qf": dict(quantize_first=True),  # on codes from the quantization kernel (two launches)
    "gemv_1l": dict(quantize_first=False),  # quantizing in every program (one launch)
    "gemv_xq": dict(quantize_first=True, xla_quant=True),  # on codes from XLA ops (unfused here: x is an input)
    # session 14: fed codes made outside the timed program (`QuantizedActivations`, as the model's norm and
    # SwiGLU kernels hand them over at M = 1); `programs` re-picks split-K for at most that many programs
    "gemvc": dict(),  # the default on codes
    "gemvc_wr": dict(word_rescale=True),  # every word rescaled in f32, one reduction (no layout round trips)
    "gemvc_pf": dict(prefetch=True),  # the next iteration's loads before this one's arithmetic
    "gemvc_pf2k": dict(prefetch=True, programs=2048),
    "gemvc_pf1k": dict(prefetch=True, programs=1024),
    "gemvc_wrpf2k": dict(word_rescale=True, prefetch=True, programs=2048),
    "gemvc_wrpf1k": dict(word_rescale=True, prefetch=True, programs=1024),
    "gemvc_2k": dict(programs=2048),  # fewer programs without prefetch (the loop then waits per iteration)
    # 8 warps: the [bn, gpi] scale loads have fewer elements than threads, so Triton reloads them in the
    # partials' layout instead of converting through shared memory (offline PTX: no bar.sync in the loop)
    "gemvc_w8": dict(num_warps=8),
    "gemvc_w8b64": dict(num_warps=8, block_n=64),
    "gemvc_w8pf2k": dict(num_warps=8, prefetch=True, programs=2048),
    "gemvc_w8b64pf2k": dict(num_warps=8, block_n=64, prefetch=True, programs=2048),
    "gemvc_b16": dict(block_n=16),  # 4 warps on 16-row tiles: the same effect (64 scale elements)
    "gemvc_b16pf": dict(block_n=16, prefetch=True, programs=2048),
    "gemv_1l_w8": dict(quantize_first=False, num_warps=8),  # o_proj's form (x float, quantized per program)
}
MIXED_OVERRIDES = {  # variant → GemmConfig fields changed from `kernels.choose_config`'s default
    "mixed_b8": dict(word_unpack=False),  # the 4-bit unpack as Triton's 8-bit shift (before session 9)
    "mixed_xq": dict(xla_quant=True),  # on codes from XLA ops (unfused here: x is an input)
    # (the variants of the forms removed in session 34 — mixed_pf/pf2/wm*/wpf*/fused_zero/mm/zs/mmz/sw* — are in
    # commit 302f4a7 with the kernel options they set)
    # session 33: the small operands two iterations ahead (a loop body of two iterations, each set loaded after its
    # last use); 2 and 4 stages (a stage holds one iteration's tiles)
    "mixed_pf3": dict(prefetch_meta=3),
    "mixed_pf3s2": dict(prefetch_meta=3, num_stages=2),
    "mixed_pf3s4": dict(prefetch_meta=3, num_stages=4),
    "mixed_wave": dict(split_rule="wave"),  # split-K from one wave of resident programs (`kernels._wave_split`)
}
SHARE.update({v: 0.1 for v in (*GEMV_OVERRIDES, *MIXED_OVERRIDES)})


def random_packed(rng, n: int, k: int, share8: float) -> fmt.MixedWeight:
    """Random codes/scales (content is irrelevant to speed; the references check the numbers)."""
    g = -(-k // 128)
    is_int8 = np.zeros(n, bool)
    is_int8[rng.permutation(n)[: int(round(share8 * n))]] = True
    q = np.where(is_int8[:, None], rng.integers(-127, 128, (n, g * 128)), rng.integers(0, 16, (n, g * 128)))
    scale = np.where(is_int8[:, None], 1 / 127, 1 / 7.5) * rng.uniform(0.5, 1.5, (n, g)) * 0.05
    zero = rng.integers(5, 11, (n, g))
    return fmt.pack_mixed(q.astype(np.int32), scale.astype(np.float32), zero, is_int8, k=k)


def packed_bytes(qw: fmt.MixedWeight) -> int:
    return sum(a.size * a.dtype.itemsize for a in jax.tree_util.tree_leaves(qw))


def _rows(w: fmt.MixedWeight) -> int:
    return w.q8.shape[0] + w.q4.shape[0]


def v4_config(m: int, w: fmt.MixedWeight) -> kernels.GemmConfig:
    """`kernels.choose_config` as of device call 4 (64×64 tiles from M = 17, zero fill as its own launch)."""
    if m <= 16 or m >= 256:
        return kernels.choose_config(m, w.num_groups, _rows(w))
    split = 1 if -(-m // 64) * (_rows(w) // 64) >= 132 else kernels._largest_split(w.num_groups, 2)
    return kernels.GemmConfig(64, 64, split, 4, 4, fuse_quant=False)


def make_variant(name: str, cfg: kernels.GemmConfig | None = None, interpret: bool = False):
    """→ (fn(x, w) → y, weight builder(rng, n, k) → w, reference fn or None, tolerance)."""
    if name == "xla_bf16":
        fn = lambda x, w: jnp.einsum("mk,nk->mn", x, w, preferred_element_type=jnp.float32).astype(x.dtype)
        build = lambda rng, n, k: jnp.asarray(rng.normal(size=(n, k)) * 0.02, jnp.bfloat16)
        return fn, build, None, None
    if name == "xla_int8":
        fn = lambda x, w: jax.lax.dot_general(
            x, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.int32)
        build = lambda rng, n, k: jnp.asarray(rng.integers(-127, 128, (n, k)), jnp.int8)
        return fn, build, None, None
    if name == "xla_int4":  # anchor: XLA's dot on a native int4 weight (no group scales), bf16 activations
        fn = lambda x, w: jnp.einsum("mk,nk->mn", x, w.astype(x.dtype), preferred_element_type=jnp.float32).astype(x.dtype)
        build = lambda rng, n, k: jnp.asarray(rng.integers(-8, 8, (n, k)), jnp.int4)
        return fn, build, None, None
    if name == "mgpu_core":  # the Mosaic GPU int8 GEMM alone: int8 x, int8 weight [N, K] + group scales
        def core(x, w):
            w8, sw = w
            rows = 1 if cfg is not None and cfg.act_scale == "token" else sw.shape[0]  # token: one scale a row
            sa = jnp.full((rows, x.shape[0]), 1e-3, jnp.float32)
            return mgpu.w8a8_group_matmul(x, sa, w8, sw, config=cfg or mgpu.pick_config(x.shape[0], w8.shape[0]),
                                          interpret=interpret)

        def build_core(rng, n, k):
            return (jnp.asarray(rng.integers(-15, 16, (n, k)), jnp.int8),
                    jnp.asarray(rng.uniform(1e-3, 2e-3, (k // 128, n)), jnp.float32))

        ref = lambda x, w: reference.w8a8_ref(x, jnp.full((x.shape[0], w[1].shape[0]), 1e-3, jnp.float32), *w)
        return core, build_core, ref, 5e-3
    share = SHARE[name.split("@")[0]]
    build = lambda rng, n, k: random_packed(rng, n, k, share)
    if "@" in name:  # mixed@<decode strategy>: the kernel with that launch strategy for M ≤ 32
        strategy = name.split("@")[1]
        fn = lambda x, w: kernels.mixed_matmul_pallas(x, w, decode=strategy, interpret=interpret)
        return fn, build, reference.mixed_matmul_ref, 5e-3
    if name == "xla_ref":
        return reference.mixed_matmul_ref, build, None, None
    if name in GEMV_OVERRIDES:  # the default GEMV tiling with some fields changed
        over = dict(GEMV_OVERRIDES[name])
        programs, block_n = over.pop("programs", 4096), over.pop("block_n", 32)
        codes = name.startswith("gemvc")

        def fn(x, w):
            base = cfg or gemv.choose_gemv_config(w.num_groups, _rows(w), programs=programs, m=x_rows(x),
                                                  quantize_first=codes or None, block_n=block_n)
            return gemv.mixed_gemv_pallas(x, w, config=dataclasses.replace(base, **over), interpret=interpret)

        ref = (lambda x, w: reference.mixed_matmul_ref(x.dequantize(), w)) if codes else reference.mixed_matmul_ref
        return fn, build, ref, 5e-3
    if name in MIXED_OVERRIDES:  # the kernel's default config with some fields changed
        over = dict(MIXED_OVERRIDES[name])
        rule = over.pop("split_rule", None)  # an argument of choose_config, not a GemmConfig field
        fn = lambda x, w: kernels.mixed_matmul_pallas(x, w, config=dataclasses.replace(
            cfg or kernels.choose_config(x.shape[0], w.num_groups, _rows(w), split_rule=rule), **over),
            interpret=interpret)
        return fn, build, reference.mixed_matmul_ref, 5e-3
    if name == "gemv":  # the CUDA-core dp4a decode kernel (pallas_kernels/gemv.py), one launch
        fn = lambda x, w: gemv.mixed_gemv_pallas(x, w, config=cfg, interpret=interpret)
        return fn, build, reference.mixed_matmul_ref, 5e-3
    if name == "xla_dequant":
        return reference.dequant_matmul_ref, build, None, None
    if name == "mgpu":  # prefill on Hopper: int8 weight unpack + Mosaic GPU wgmma GEMM (pallas_kernels/mgpu.py)
        fn = lambda x, w: mgpu.mixed_matmul_mgpu(x, w, config=cfg, interpret=interpret)  # None: pick_config
        return fn, build, reference.mixed_matmul_ref, 5e-3
    if name in ("mgpu_decode", "mgpu_decode_fold", "mgpu_decode64"):  # decode on Hopper: TMA-streamed packed
        # weight, swapped-operand wgmma; _fold: the 4-bit rows' zero-point terms after the kernel (two wgmmas a
        # group, not three); 64: column tiles of 64 activation rows beyond M = 64 (the default takes 128)
        default = mgpu_decode.DecodeConfig(fold=name.endswith("fold"), tile_cols=64 if name.endswith("64") else 128)
        fn = lambda x, w: mgpu_decode.mixed_matmul_mgpu_decode(x, w, config=cfg or default, interpret=interpret)
        return fn, build, reference.mixed_matmul_ref, 5e-3
    if name == "float_dequant":
        fn = lambda x, w: kernels.dequant_matmul_pallas(x, w, config=cfg, interpret=interpret)
        return fn, build, reference.dequant_matmul_ref, 1e-2
    if name == "dequant_dot":
        return dequant_dot.dequant_dot_matmul, build, reference.mixed_matmul_ref, 5e-3
    if name in ("api", "api_tiled"):  # api_tiled: on codes in (64-row tile, group) blocks, the order the model
        # keeps on a GPU since session 38 (`model.TILED_CODES`, `format.tile_codes`)
        fn = lambda x, w: api.mixed_matmul(x, w, implementation="pallas", interpret=interpret)
        tiled = lambda rng, n, k: fmt.tile_codes(build(rng, n, k))  # noqa: E731
        return fn, tiled if name == "api_tiled" else build, reference.mixed_matmul_ref, 5e-3
    if name == "mixed_dt":  # the decode tiles (32 rows, split-K partials) up to M = 256 (`decode_max_m`)
        fn = lambda x, w: kernels.mixed_matmul_pallas(x, w, config=cfg, decode_max_m=256, interpret=interpret)
        return fn, build, reference.mixed_matmul_ref, 5e-3
    if name == "mixed_v4":  # the kernel as configured at call 4
        fn = lambda x, w: kernels.mixed_matmul_pallas(x, w, config=cfg or v4_config(x.shape[0], w), interpret=interpret)
        return fn, build, reference.mixed_matmul_ref, 5e-3
    out = jnp.float32 if name == "mixed_f32out" else None
    fn = lambda x, w: kernels.mixed_matmul_pallas(x, w, config=cfg, interpret=interpret, out_dtype=out)
    return fn, build, reference.mixed_matmul_ref, 5e-3


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if not np.all(np.isfinite(a)):
        return float("nan")
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def x_rows(x) -> int:
    return x.m if isinstance(x, fmt.QuantizedActivations) else x.shape[0]


def as_codes(x: jax.Array) -> fmt.QuantizedActivations:
    """x [M, K] → its int8 codes as the model's norm / SwiGLU kernels hand them to a linear."""
    x_q, a_scale, x_sum = kernels.quantize_activations_xla(x, block_m=16)
    return fmt.QuantizedActivations(x_q, a_scale, x_sum, (x.shape[0],), x.shape[1], jnp.dtype(x.dtype).name)


def time_variant(fn, ws, xs, repeats: int, device_timers: bool = False):
    """Median seconds per call: len(xs) calls in one jitted program, each on its own x and weight copy
    (a shared operand would let XLA merge the dots), median over repeats, / len(xs). With device_timers
    also (busy µs, span µs, kernels) per call from a profiler trace (benchmarks/devtime.py)."""
    many = jax.jit(lambda xs, ws: [fn(x, w) for x, w in zip(xs, ws)])
    jax.block_until_ready(many(xs, ws))
    jax.block_until_ready(many(xs, ws))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(many(xs, ws))
        times.append(time.perf_counter() - t0)
    sec = statistics.median(times) / len(xs)
    if not device_timers:
        return sec
    import devtime

    dt = devtime.device_times(lambda: many(xs, ws), runs=3)
    if "error" in dt:
        return sec, dt
    return sec, {"busy_us": dt["busy_us"] / len(xs), "span_us": dt["span_us"] / len(xs),
                 "kernels": dt["kernels"] / len(xs), "top": dt["top"][:3]}


def copy_bandwidth() -> float:
    """Device-to-device bytes/s (read + write): 8 elementwise passes over distinct 256 MiB arrays."""
    arrays = [jnp.full((1 << 26,), i, jnp.float32) for i in range(8)]
    sec = time_variant(lambda a, _: a + 1, arrays, arrays, 20)
    return 2 * arrays[0].nbytes / sec


def floor_bytes(name: str, w, m: int, k: int, n: int) -> int:
    if name == "xla_int4":
        return n * k // 2 + 2 * (m * k + m * n)
    if name in ("xla_bf16",):
        return 2 * (n * k + m * k + m * n)
    if name == "xla_int8":
        return n * k + m * k + 4 * m * n
    if name == "mgpu_core":
        return n * k + m * k + 2 * m * n
    return packed_bytes(w) + 2 * (m * k + m * n)


_WEIGHTS: dict = {}


def bench_one(name, k, n, m, args, bandwidth, cfg=None):
    rng = np.random.default_rng(m * 7 + n)
    fn, build, ref_fn, tol = make_variant(name, cfg, args.interpret)
    key = (SHARE.get(name.split("@")[0], name), name == "api_tiled", n, k)
    if key not in _WEIGHTS:  # packing 58M codes takes seconds: reuse across M and configs
        if any(kk[2:4] != (n, k) for kk in _WEIGHTS):
            _WEIGHTS.clear()
        _WEIGHTS[key] = build(rng, n, k)
    w0 = _WEIGHTS[key]
    if name in ("xla_int8", "mgpu_core"):
        x0 = jnp.asarray(rng.integers(-127, 128, (m, k)), jnp.int8)
    else:
        x0 = jnp.asarray(rng.normal(size=(m, k)), jnp.bfloat16)
    if name.startswith("gemvc"):  # codes made here, outside the timed program
        x0 = as_codes(x0)
    row = {"variant": name, "m": m, "k": k, "n": n, "config": dataclasses.asdict(cfg) if cfg else None}
    if ref_fn is not None:
        y = jax.jit(fn)(x0, w0)
        row["rel_err"] = rel_err(y, jax.jit(ref_fn)(x0, w0))
        row["ok"] = bool(row["rel_err"] < tol)
    wbytes = sum(a.nbytes for a in jax.tree_util.tree_leaves(w0))
    r = int(min(args.max_rotate, max(args.min_rotate, math.ceil(ROTATE_BYTES / wbytes))))
    calls = max(r, args.min_calls) if m <= 256 else r  # amortize the program's dispatch over many calls
    ws = [jax.tree_util.tree_map(lambda a: jnp.array(a, copy=True), w0) for _ in range(calls)]
    xs = [jax.tree_util.tree_map(lambda a: jnp.array(a, copy=True), x0) for _ in range(calls)]
    sec = time_variant(fn, ws, xs, args.repeats, args.device_timers)
    if args.device_timers:
        sec, dt = sec
        row["device"] = dt
    fb = floor_bytes(name, w0, m, k, n)
    row.update(us=sec * 1e6, floor_us=fb / bandwidth * 1e6, rotate=r, calls=calls, tops=2 * m * n * k / sec / 1e12)
    row["pct_floor"] = 100 * row["floor_us"] / row["us"]
    return row


def default_sweep(m: int, g: int, rows: int):
    """Alternative configurations tried with --sweep for the mixed kernel (calls 1–4 swept tile shapes,
    stages and groups per iteration; this sweep asks whether decode needs split-K at all, and whether
    M = 32 is better served by the decode tiles)."""
    C = kernels.GemmConfig
    decode = kernels.choose_config(1, g, rows)
    if m <= 16:  # no split-K: no zero fill, no atomics, no convert; 1 program per 64 or 32 columns
        cands = [C(16, 64, 1, 4, 4, False), C(16, 32, 1, 4, 4, False)]
    elif m <= 64:  # decode tiles (16 rows, split-K) for a few rows more
        cands = [dataclasses.replace(decode), C(32, 64, decode.split_k, 4, 4, False)]
    else:
        cands = [C(128, 128, 1, 8, 3, False)]
    return [c for c in cands if g % c.split_k == 0 and (g // c.split_k) % c.groups_per_iter == 0]


DECODE_SWEEP = {"block_n": (64, 128), "stages": (4, 6), "warps": (4, 8), "programs": (512, 1024, 2048)}  # call 8
DECODE_SWEEP_SMALL = {"block_n": (64,), "stages": (2, 3, 4), "warps": (2, 4), "programs": (1024, 2048)}  # call 11
DECODE_SWEEP_WORDS = {"block_n": (32, 64), "stages": (3, 4), "warps": (4,), "programs": (1024, 4096)}
# session 9: tiles again once the 4-bit unpack runs on 32-bit words (fewer instructions per group)
DECODE_SWEEP_TALL = {"block_m": (32, 64), "block_n": (64,), "stages": (3,), "warps": (4, 8), "programs": (512, 1024)}
# session 10 (not yet run): at M = 64–128 the 32-row tiles read each weight tile once per 32 rows; 64-row
# tiles with split-K read it once (offline: 128 registers with 4 warps, 108 with 8; Triton takes wgmma there)
DECODE_SWEEP_PF3 = {"block_n": (64,), "stages": (2, 3), "warps": (4,), "programs": (256, 512, 1024),
                    "prefetch_meta": (0, 3)}  # session 33: the small operands two iterations ahead pay off on long
# loops (gate/up at M = 32: 16 groups a program); fewer programs make every loop longer

DECODE_SWEEP_WAVE = {"block_n": (64, 128), "stages": (3, 4), "warps": (4, 8), "programs": (256, 512),
                     "prefetch_meta": (0, 3)}  # session 33: around one wave of programs, wider tiles and 8 warps

DECODE_GRIDS = {  # --sweep-decode-NAME: (grid, help text)
    "small": (DECODE_SWEEP_SMALL, " (shallow pipelines)"),
    "words": (DECODE_SWEEP_WORDS, ""), "tall": (DECODE_SWEEP_TALL, " (block_m 32 / 64)"),
    "pf3": (DECODE_SWEEP_PF3, " (prefetch_meta 0 / 3)"), "wave": (DECODE_SWEEP_WAVE, ""),
}


def decode_sweep(m: int, g: int, rows: int, grid=DECODE_SWEEP):
    """--sweep-decode: the quantize_partials decode kernel over tile width, pipeline depth, warps and the
    number of programs that split-K aims for."""
    C = kernels.GemmConfig
    cands = []
    for block_m, block_n, stages, warps, programs, prefetch in itertools.product(
            grid.get("block_m", (16 if m <= 16 else 32,)), grid["block_n"], grid["stages"], grid["warps"],
            grid["programs"], grid.get("prefetch_meta", (0,))):
        split = kernels._decode_split(g, -(-m // block_m) * (rows // block_n), programs)
        cands.append(C(block_m, block_n, split, warps, stages, fuse_quant=False,
                       split_partials=split > 1, prefetch_meta=prefetch))
    return list(dict.fromkeys(cands))


def unrolled_sweep(m: int, g: int, rows: int):
    """--sweep-decode-unrolled: the small per-group loads (scales, zeros, activation scales) are plain loads
    that Triton does not pipeline (ncu, session 3: 54 % of stall samples wait on the zeros every group).
    Here every program issues all its groups at once (groups_per_iter = groups per split, one loop
    iteration): one memory latency per program instead of one per group, more programs."""
    C = kernels.GemmConfig
    cands = []
    for programs, stages, warps in itertools.product((1024, 2048, 4096, 8192), (1,), (4, 8)):
        split = kernels._largest_split(g, max(1, -(-programs // (rows // 64))))
        cands.append(C(16 if m <= 16 else 32, 64, split, warps, stages, fuse_quant=False,
                       split_partials=split > 1, groups_per_iter=g // split))
    for programs in (1024, 2048):  # two groups per pipelined iteration
        split = kernels._decode_split(g, rows // 64, programs)
        if (g // split) % 2 == 0:
            cands.append(C(16 if m <= 16 else 32, 64, split, 4, 3, fuse_quant=False,
                           split_partials=split > 1, groups_per_iter=2))
    return list(dict.fromkeys(cands))


GEMV_SWEEP = {"block_n": (32, 64, 128), "programs": (512, 1024, 2048), "warps": (4, 8), "stages": (3,)}


def gemv_sweep(m: int, g: int, rows: int, grid=GEMV_SWEEP):
    """--sweep-gemv: the dp4a GEMV over tile height, program count and warps."""
    cands = []
    for block_n, programs, warps, stages in itertools.product(
            grid["block_n"], grid["programs"], grid["warps"], grid["stages"]):
        split = kernels._decode_split(g, rows // block_n, programs)
        cands.append(gemv.GemvConfig(block_n, split, warps, stages))
    return list(dict.fromkeys(cands))


GEMV_GROUPED_SWEEP = {"block_n": (32, 64), "programs": (1024, 2048, 4096), "gpi": (2, 4, 8), "stages": (3,),
                      "quantize_first": (True,)}  # session 6, call 8
GEMV_ONE_LAUNCH_SWEEP = {"block_n": (32, 64), "programs": (2048, 4096), "gpi": (2, 4), "stages": (3,),
                         "quantize_first": (True, False)}  # in-kernel quantization against the two-launch form


def gemv_grouped_sweep(m: int, g: int, rows: int, grid=GEMV_GROUPED_SWEEP):
    """--sweep-gemv-grouped: the GEMV with `groups_per_iter` groups an iteration (on pre-quantized codes,
    or, --sweep-gemv-one-launch, also quantizing in every program)."""
    cands = []
    for block_n, programs, gpi, stages, qf in itertools.product(
            grid["block_n"], grid["programs"], grid["gpi"], grid["stages"], grid["quantize_first"]):
        tiles = rows // block_n
        split = max(d for d in range(1, g + 1) if g % d == 0 and (g // d) % gpi == 0
                    and tiles * d <= max(programs, tiles) and g // d >= gpi)
        cands.append(gemv.GemvConfig(block_n, split, 4, stages, quantize_first=qf, groups_per_iter=gpi))
    return list(dict.fromkeys(cands))


# session 4's sweep (pingpong, overlap, stages, snake: results/kernels.md Session 4) gave way to
# session 17: two groups a pipeline step, the first rescaled while the second multiplies (MgpuConfig.gps);
# 3 stages of two groups fit in shared memory only along M with the smaller epilogue buffer (epi_n 32)
MGPU_SWEEP = [dict(tile_m=64, tile_n=128, wg_along="m", gps=1, stages=4)] + [
    dict(tile_m=64, tile_n=128, wg_along="m", gps=2, stages=st, epi_n=ep, pingpong=pp)
    for pp in (False, True) for st, ep in ((2, 64), (3, 32))]


# session 18: the rescale without the int→float conversion (MgpuConfig.convert), with the default tiles and
# with one group a step, where the conversion was a larger share
MGPU_SWEEP_CONVERT = [dict(tile_m=64, tile_n=128, wg_along="m", gps=g, stages=st, convert=c)
                      for g, st in ((2, 2), (1, 4)) for c in ("i2f", "magic", "magic_fma")]
# session 18: CTA tiles for short prompts (M = 256–512), where the default 128×128 CTA leaves SMs idle (64 CTAs
# for 256×4096 on 132 SMs): along N, and with 64-wide warpgroup tiles, up to 128–256 CTAs
MGPU_SWEEP_MEDIUM = [dict(tile_m=64, tile_n=tn, wg_along=wg, epi_n=min(64, tn)) for wg in ("m", "n") for tn in (128, 64)]
# session 23 (prepared): three compute warpgroups along M, so each scheduler has a third compute warp to issue while
# the others rescale (NOTES item 86); 152 registers a thread then: 64×64 tiles with two groups a step, or 64×128
# with one. CTAs of 192 rows: M = 2048 and 4096 are padded by 3 %
MGPU_SWEEP_WGS = [dict()] + [dict(tile_n=tn, epi_n=32, wgs=3, gps=g, stages=st)
                             for tn, g, st in ((64, 2, 2), (64, 2, 3), (128, 1, 3), (128, 1, 4))]
# session 24: the default against the chosen three-warpgroup tile (mgpu.THREE_WG_CONFIG) where pick_config decides
MGPU_SWEEP_PICK = [dict(), {f.name: getattr(mgpu.THREE_WG_CONFIG, f.name) for f in dataclasses.fields(mgpu.MgpuConfig)}]
# session 26 (prepared): one activation scale a row instead of a row and group (MgpuConfig.act_scale; not MixLLM's
# format, 30.12 against 29.28 perplexity on the embedded model): the rescale without its s_a ⊗ s_w product, on the
# default and the three-warpgroup tiles
MGPU_SWEEP_TOKEN = [{**c, "act_scale": a} for c in MGPU_SWEEP_PICK for a in ("group", "token")]
MGPU_GRIDS = {"tiles": MGPU_SWEEP, "convert": MGPU_SWEEP_CONVERT, "medium": MGPU_SWEEP_MEDIUM, "wgs": MGPU_SWEEP_WGS,
              "pick": MGPU_SWEEP_PICK, "token": MGPU_SWEEP_TOKEN}


def mgpu_sweep(m: int, g: int, rows: int, grid: str = "tiles"):
    return [mgpu.MgpuConfig(**c) for c in MGPU_GRIDS[grid]]


MGPU_DECODE_SWEEP = {"stages": (4, 6), "ctas": (132, 264), "wgs": (2,), "gps": (1, 2, 4)}  # session 6, call 1


# session 24 (prepared): short prompts in column tiles (M > mgpu_decode.MAX_COLS): the packed weight unpacked in
# registers by each tile of 64 or 128 activation rows, no int8 copy (stages beyond what fits are cut by the kernel)
MGPU_SHORT_SWEEP = {"tile_cols": (64, 128), "stages": (3, 6), "fold": (False, True)}


def mgpu_decode_sweep(m: int, g: int, rows: int):
    """--sweep-mgpu-decode: pipeline depth × the CTA count that picks split-K × compute warpgroups; for
    M > MAX_COLS (column tiles) the tile width × pipeline depth × the zero-point fold."""
    if m > mgpu_decode.MAX_COLS:
        grid = MGPU_SHORT_SWEEP
        return [mgpu_decode.DecodeConfig(tile_cols=c, stages=s, fold=f)
                for c, s, f in itertools.product(grid["tile_cols"], grid["stages"], grid["fold"])]
    grid = MGPU_DECODE_SWEEP
    return [mgpu_decode.DecodeConfig(stages=s, ctas=c, wgs=w, gps=q)
            for s, c, w, q in itertools.product(grid["stages"], grid["ctas"], grid["wgs"], grid["gps"])]


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default=",".join(f"{k}x{n}" for k, n in SHAPES), help="KxN,KxN,...")
    p.add_argument("--ms", default=",".join(map(str, MS)))
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--large-m-variants", default=None, help="variants for M >= 256 (default: --variants)")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--min-rotate", type=int, default=4)
    p.add_argument("--max-rotate", type=int, default=16)
    p.add_argument("--min-calls", type=int, default=32, help="calls per timed program for M <= 256")
    p.add_argument("--sweep", action="store_true", help="also time alternative configs of 'mixed'")
    p.add_argument("--sweep-decode", action="store_true", help="sweep the decode kernel's tiles (decode_sweep)")
    for name, (_, about) in DECODE_GRIDS.items():
        p.add_argument(f"--sweep-decode-{name}", action="store_true", help=f"the grid DECODE_SWEEP_{name.upper()}{about}")
    p.add_argument("--sweep-gemv", action="store_true", help="sweep the GEMV kernel (gemv_sweep)")
    p.add_argument("--sweep-gemv-grouped", action="store_true", help="GEMV, groups per iteration (gemv_grouped_sweep)")
    p.add_argument("--sweep-gemv-one-launch", action="store_true",
                   help="GEMV, in-kernel quantization vs pre-quantized codes (GEMV_ONE_LAUNCH_SWEEP)")
    p.add_argument("--sweep-decode-unrolled", action="store_true", help="all groups of a split at once (unrolled_sweep)")
    p.add_argument("--sweep-mgpu", action="store_true", help="sweep the Mosaic GPU prefill kernel (mgpu_sweep)")
    p.add_argument("--sweep-mgpu-decode", action="store_true", help="sweep the Mosaic GPU decode kernel")
    p.add_argument("--sweep-mgpu-variant", default="mgpu", help="mgpu or mgpu_core for --sweep-mgpu")
    p.add_argument("--sweep-mgpu-grid", default="tiles", choices=tuple(MGPU_GRIDS),
                   help="--sweep-mgpu's configs: MGPU_SWEEP (tiles, stages, turns), MGPU_SWEEP_CONVERT, "
                        "MGPU_SWEEP_MEDIUM (CTA tiles for short prompts), MGPU_SWEEP_WGS (three compute warpgroups) or "
                        "MGPU_SWEEP_PICK (the default against THREE_WG_CONFIG)")
    p.add_argument("--sweep-shapes", default="4096x14336")
    p.add_argument("--sweep-ms", default="1,32")
    p.add_argument("--interpret", action="store_true", help="Pallas interpret mode (CPU smoke test)")
    p.add_argument("--device-timers", action="store_true",
                   help="also report device busy/span µs per call from a profiler trace (GPU)")
    p.add_argument("--out", default=os.environ.get("OUT", "out"), help="folder for bench.jsonl and summary.md "
                   "(default $OUT, else ./out, which git ignores)")
    return p.parse_args(argv)


def emit(row, log):
    log.write(json.dumps(row) + "\n")
    log.flush()
    cfg = row.get("config")
    if not cfg:
        cfg_s = ""
    elif "wg_along" in cfg:  # MgpuConfig
        cfg_s = "mgpu {tile_m}x{tile_n} wg-{wg_along} st{stages} snake{snake} epi{epi_n}{s}{o}{p}{q}".format(
            s=" seed" if cfg.get("seed") else "", o=" overlap" if cfg.get("overlap") else "",
            p=" pingpong" if cfg.get("pingpong") else "",
            q=(f" gps{cfg['gps']}" if cfg.get("gps", 1) > 1 else "")
            + (f" {cfg['convert']}" if cfg.get("convert", "i2f") != "i2f" else "")
            + (f" wgs{cfg['wgs']}" if cfg.get("wgs", 2) != 2 else "")
            + (" token" if cfg.get("act_scale", "group") != "group" else ""),
            **cfg)
    elif "ctas" in cfg:  # mgpu_decode.DecodeConfig
        cfg_s = "mgpu_decode st{stages} split{split} ctas{ctas} wgs{wgs} gps{gps} cols{tile_cols} fold{fold:d}".format(
            **cfg)
    elif "block_m" not in cfg:  # GemvConfig
        cfg_s = "gemv {block_n} s{split_k} w{num_warps} st{num_stages} gpi{groups_per_iter}{q}".format(
            q=" qf" if cfg.get("quantize_first") else "", **cfg)
    else:
        cfg_s = "{block_m}x{block_n} s{split_k} w{num_warps} st{num_stages} u{groups_per_iter}{f}{pf}".format(
            f=" fused" if cfg["fuse_quant"] else "",
            pf=f" pf{int(cfg['prefetch_meta'])}" if cfg.get("prefetch_meta") else "", **cfg)
    err = f"err {row['rel_err']:.1e}{'' if row['ok'] else ' FAIL'}" if "rel_err" in row else ""
    dev = row.get("device")
    if dev:
        err += (f" | device busy {dev['busy_us']:.1f} span {dev['span_us']:.1f} us, {dev['kernels']:.1f} kernels"
                if "busy_us" in dev else f" | device timers: {dev.get('error')}")
    print(f"{row['variant']:>13} M={row['m']:<5} K={row['k']:<6} N={row['n']:<6} {row.get('us', 0):9.1f} us "
          f"floor {row.get('floor_us', 0):7.1f} ({row.get('pct_floor', 0):5.1f}%) {cfg_s} {err} {row.get('error', '')}",
          flush=True)


def run_row(name, k, n, m, args, bandwidth, log, cfg=None):
    try:
        row = bench_one(name, k, n, m, args, bandwidth, cfg)
    except Exception as e:  # a variant that fails to compile is reported, the run goes on
        row = {"variant": name, "m": m, "k": k, "n": n, "error": f"{type(e).__name__}: {str(e)[:300]}",
               "config": dataclasses.asdict(cfg) if cfg else None}
    emit(row, log)
    return row


SUMMARY_COLS = ("xla_bf16", "xla_int8", "xla_dequant", "mixed_v4", "mixed", "mixed_f32out", "dequant_dot", "api", "mgpu", "mgpu_core")


def summary(rows):
    """One line per shape: µs of every default-config variant run, and bf16 / µs of the kernel and the api."""
    by = {(r["variant"], r["m"], r["k"], r["n"]): r["us"] for r in rows if "us" in r and r.get("config") is None}
    cols = [c for c in SUMMARY_COLS if any(v == c for v, *_ in by)]
    lines = ["| M | K | N | " + " | ".join(f"{c} µs" for c in cols) + " | mixed_v4 ×bf16 | api ×bf16 | api × mixed_v4 |",
             "|---" * (3 + len(cols) + 3) + "|"]
    for m, k, n in sorted({key[1:] for key in by}, key=lambda t: (t[1], t[2], t[0])):
        get = lambda name: by.get((name, m, k, n), float("nan"))
        vals = " | ".join(f"{get(c):.1f}" for c in cols)
        bf, old, new = get("xla_bf16"), get("mixed_v4"), get("api")
        lines.append(f"| {m} | {k} | {n} | {vals} | {bf / old:.2f} | {bf / new:.2f} | {old / new:.2f} |")
    return "\n".join(lines)


def device_summary(rows):
    """Device-timer table: per (M, K, N), span µs per call of every variant, and bf16 span / variant span."""
    by = {(r["variant"], r["m"], r["k"], r["n"]): r["device"] for r in rows
          if "busy_us" in r.get("device", {}) and r.get("config") is None}
    cols = list(dict.fromkeys(v for v, *_ in by))
    lines = ["| M | K | N | " + " | ".join(f"{c} span (busy) µs" for c in cols) + " | "
             + " | ".join(f"{c} ×bf16" for c in cols if c != "xla_bf16") + " |",
             "|---" * (3 + 2 * len(cols) - ("xla_bf16" in cols)) + "|"]
    for m, k, n in sorted({key[1:] for key in by}, key=lambda t: (t[1], t[2], t[0])):
        get = lambda c: by.get((c, m, k, n))  # noqa: E731
        cells = [f"{d['span_us']:.1f} ({d['busy_us']:.1f})" if d else "" for d in map(get, cols)]
        bf = get("xla_bf16")
        ratios = [f"{bf['span_us'] / get(c)['span_us']:.2f}" if bf and get(c) else "" for c in cols if c != "xla_bf16"]
        lines.append(f"| {m} | {k} | {n} | " + " | ".join(cells + ratios) + " |")
    return "\n".join(lines)


def main(argv=None):
    args = parse(argv)
    os.makedirs(args.out, exist_ok=True)
    dev = jax.devices()[0]
    print(f"device {dev.device_kind} ({dev.platform}), jax {jax.__version__}", flush=True)
    bandwidth = copy_bandwidth()
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s (read + write)", flush=True)
    shapes = [tuple(map(int, s.split("x"))) for s in args.shapes.split(",") if s]
    ms = [int(m) for m in args.ms.split(",") if m]
    variants = [v for v in args.variants.split(",") if v]
    large_variants = [v for v in (args.large_m_variants or args.variants).split(",") if v]
    rows = []
    with open(os.path.join(args.out, "bench.jsonl"), "a") as log:
        log.write(json.dumps({"device": dev.device_kind, "jax": jax.__version__, "bandwidth": bandwidth}) + "\n")
        for k, n in shapes:
            for m in ms:
                for v in (large_variants if m >= 256 else variants):
                    rows.append(run_row(v, k, n, m, args, bandwidth, log))
        decode_grid = next((grid for name, (grid, _) in DECODE_GRIDS.items() if getattr(args, f"sweep_decode_{name}")),
                           None)
        if args.sweep or args.sweep_decode or decode_grid or args.sweep_gemv \
                or args.sweep_gemv_grouped or args.sweep_gemv_one_launch \
                or args.sweep_decode_unrolled or args.sweep_mgpu or args.sweep_mgpu_decode:
            sweep = decode_sweep if args.sweep_decode else default_sweep
            if decode_grid:
                sweep = lambda m, g, rows: decode_sweep(m, g, rows, decode_grid)  # noqa: E731
            if args.sweep_decode_unrolled:
                sweep = unrolled_sweep
            if args.sweep_mgpu:
                sweep = functools.partial(mgpu_sweep, grid=args.sweep_mgpu_grid)
            if args.sweep_mgpu_decode:
                sweep = mgpu_decode_sweep
            for s in args.sweep_shapes.split(","):
                k, n = map(int, s.split("x"))
                for m in (int(v) for v in args.sweep_ms.split(",")):
                    gem = args.sweep_gemv or args.sweep_gemv_grouped or args.sweep_gemv_one_launch
                    if args.sweep_gemv_one_launch:
                        sweep = lambda m, g, rows: gemv_grouped_sweep(m, g, rows, GEMV_ONE_LAUNCH_SWEEP)  # noqa: E731
                    elif args.sweep_gemv_grouped:
                        sweep = gemv_grouped_sweep
                    elif args.sweep_gemv:
                        sweep = gemv_sweep
                    for cfg in sweep(m, -(-k // 128), n + 256):
                        name = ("gemv" if gem else args.sweep_mgpu_variant if args.sweep_mgpu
                                else "mgpu_decode" if args.sweep_mgpu_decode else "mixed")
                        rows.append(run_row(name, k, n, m, args, bandwidth, log, cfg=cfg))
    bandwidth_end = copy_bandwidth()
    print(f"copy bandwidth at the end {bandwidth_end / 1e12:.2f} TB/s", flush=True)
    table = summary(rows)
    if args.device_timers:
        table += "\n\nDevice timers (profiler): span = first kernel start to last kernel end per call, busy = " \
                 "summed kernel time per call\n\n" + device_summary(rows)
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write(f"device {dev.device_kind}, jax {jax.__version__}, copy {bandwidth / 1e12:.2f} TB/s\n\n{table}\n")
    print(table)


if __name__ == "__main__":
    main()
