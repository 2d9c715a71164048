"""One decode GEMM (mixed W4.4A8, M rows) for Nsight Compute to profile.

    ncu --kernel-name regex:mixed_gemm --launch-skip 2 --launch-count 1 --section SpeedOfLight \
        --section MemoryWorkloadAnalysis --section WarpStateStats --section Occupancy --section LaunchStats \
        python3 benchmarks/ncu_decode.py --m 1 --k 4096 --n 14336

Per-instruction stall samples (where a kernel waits): `--set full --export R` then
`ncu --import R.ncu-rep --page source --csv --print-source sass`. `--kernel gemv` profiles mixed_gemv.

Runs the default decode configuration three times on one packed weight (random codes, 10 % 8-bit rows)
so that ncu can skip the compile-time launches and profile a warm one.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from bench_matmul import random_packed  # noqa: E402
from pallas_kernels import gemv, kernels, mgpu, mgpu_decode  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--m", type=int, default=1)
    p.add_argument("--k", type=int, default=4096)
    p.add_argument("--n", type=int, default=14336)
    p.add_argument("--decode", default=kernels.DEFAULT_DECODE, choices=kernels.DECODE_STRATEGIES)
    p.add_argument("--kernel", default="mma", choices=("mma", "gemv", "mgpu", "mgpu_decode"),
                   help="mixed_gemm, mixed_gemv, the Mosaic GPU prefill GEMM on int8 operands, or the Mosaic "
                        "GPU decode path (two kernels a call: 8-bit rows, then 4-bit rows)")
    p.add_argument("--set", default="", help="GemmConfig / GemvConfig overrides for --kernel mma / gemv, "
                                             "e.g. prefetch_meta=3")
    p.add_argument("--mgpu", default="", help="MgpuConfig overrides for --kernel mgpu, e.g. seed=0,overlap=1")
    args = p.parse_args(argv)
    if args.kernel == "mgpu":
        over = dict(kv.split("=") for kv in args.mgpu.split(",") if kv)
        fields = {f.name: f.type for f in __import__("dataclasses").fields(mgpu.MgpuConfig)}
        cfg = mgpu.MgpuConfig(**{k: (v if "str" in str(fields[k]) else int(v)) for k, v in over.items()})
        rng = np.random.default_rng(0)
        x = jnp.asarray(rng.integers(-127, 128, (args.m, args.k)), jnp.int8)
        w = jnp.asarray(rng.integers(-15, 16, (args.n, args.k)), jnp.int8)
        sa = jnp.full((args.k // 128, args.m), 1e-3, jnp.float32)
        sw = jnp.full((args.k // 128, args.n), 1e-3, jnp.float32)
        fn = jax.jit(lambda *a: mgpu.w8a8_group_matmul(*a, config=cfg))
        for _ in range(3):
            jax.block_until_ready(fn(x, sa, w, sw))
        print("config", cfg)
        return
    w = random_packed(np.random.default_rng(0), args.n, args.k, 0.1)
    x = jnp.asarray(np.random.default_rng(1).normal(size=(args.m, args.k)), jnp.bfloat16)
    from ptx_stats import config_overrides

    rows = w.q8.shape[0] + w.q4.shape[0]
    if args.kernel == "gemv":
        cfg = config_overrides(gemv.choose_gemv_config(w.num_groups, rows, m=args.m), args.set)
        fn = jax.jit(lambda x, w: gemv.mixed_gemv_pallas(x, w, config=cfg))
    else:
        cfg = config_overrides(kernels.choose_config(args.m, w.num_groups, rows, decode=args.decode), args.set)
        fn = jax.jit(lambda x, w: kernels.mixed_matmul_pallas(x, w, config=cfg))
    if args.kernel == "mgpu_decode":
        fn = jax.jit(lambda x, w: mgpu_decode.mixed_matmul_mgpu_decode(x, w))
    for _ in range(3):
        jax.block_until_ready(fn(x, w))
    if args.kernel == "mgpu_decode":
        print("config", mgpu_decode.DEFAULT_DECODE_CONFIG)
        return
    print("config", cfg)


if __name__ == "__main__":
    main()
