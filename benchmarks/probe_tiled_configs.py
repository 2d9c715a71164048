"""Do the 16–32-row decode tiles want other tilings once their codes are tiled? A config sweep on tiled codes.

    python benchmarks/probe_tiled_configs.py --out /tmp/tiled_configs.md    # Hopper GPU, ≈ 2–3 min
    python benchmarks/probe_tiled_configs.py --small                        # CPU smoke run (interpret mode)

Why (NOTES-kernels.md items 113–116, 125): the decode tiles' split-K, stages and warps were picked (sessions 11–35)
on row-major codes, where every iteration of a program opened new DRAM pages for 64-byte pieces. With the codes in
(64-row tile, group) blocks (`format.tile_codes`, one group a block row) a program's K range is one contiguous run,
so the trade-offs that set the split (a wave of resident programs) and the stages may have moved. Each variant runs
the model's form (int8 codes from the producer, split-K partials unsummed, `kernels.mixed_matmul_pallas(...,
partials=True)`) in one jit over weight copies rotated past the 50 MB L2; device busy µs a call from a profiler
trace; XLA's bf16 dot for the ratio. Outputs (the partials summed) are checked against the row-major default's to
f32 rounding (the splits change the summation order).
"""

from __future__ import annotations

import dataclasses
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from devtime import trace_events, write_table  # noqa: E402
from pallas_kernels import gemv, kernels  # noqa: E402
from pallas_kernels.format import QuantizedActivations, tile_codes  # noqa: E402
from probe_tile_major import probe_setup, weight_copies  # noqa: E402


def variants(cfg: kernels.GemmConfig, groups: int) -> dict[str, kernels.GemmConfig]:
    """The tiled default and its neighbours (those the kernel can take)."""
    out = {"default": cfg}
    s = cfg.split_k
    if groups % (2 * s) == 0:
        out["split×2"] = dataclasses.replace(cfg, split_k=2 * s)
    if s % 2 == 0:
        out["split÷2"] = dataclasses.replace(cfg, split_k=s // 2)
    out["stages 2"] = dataclasses.replace(cfg, num_stages=2)
    out["stages 4"] = dataclasses.replace(cfg, num_stages=4)
    out["warps 8"] = dataclasses.replace(cfg, num_warps=8)
    if cfg.block_m == 32:
        out["block_m 16"] = dataclasses.replace(cfg, block_m=16)
        out["pf3 " + ("off" if cfg.prefetch_meta else "on")] = dataclasses.replace(cfg, prefetch_meta=0 if cfg.prefetch_meta else 3)
    # 128-row tiles, two 64-row blocks a group (session 39): a program re-reads the activation codes of its K range
    # once per weight tile, bm·128 bytes a group against the 64-row tile's 4 KB of 4-bit codes (as many at M = 32),
    # so twice the rows halve the activation traffic per weight byte; split ×2 keeps the number of programs
    for warps in (4, 8):
        for mult in (1, 2):
            if groups % (mult * s) == 0 and groups // (mult * s) >= 2:
                out[f"block_n 128, warps {warps}, split×{mult}"] = dataclasses.replace(
                    cfg, block_n=128, num_warps=warps, split_k=mult * s)
    # 32-row tiles, half a 64-row block, contiguous in it (session 39): twice the programs (more loads in flight an
    # SM where registers let more programs stay, a finer balance over the SMs); split ÷2 keeps the number of programs
    for warps in (2, 4):
        out[f"block_n 32, warps {warps}"] = dataclasses.replace(cfg, block_n=32, num_warps=warps)
        if s % 2 == 0:
            out[f"block_n 32, warps {warps}, split÷2"] = dataclasses.replace(cfg, block_n=32, num_warps=warps, split_k=s // 2)
    return out


def gemv_variants(groups: int, rows: int, m: int) -> dict[str, gemv.GemvConfig]:
    """The GEMV's default on tiled codes and its neighbours: 64-row blocks (a program reads whole 4 KB blocks),
    half / twice the programs, 8 warps (session 38's call 2 also had the group-major reading, removed since)."""
    base = gemv.choose_gemv_config(groups, rows, m=m)
    out = {"default": base}
    for label, kw in {"block_n 64": dict(block_n=64), "programs ÷2": dict(programs=2048),
                      "programs ×2": dict(programs=8192)}.items():
        out[label] = gemv.choose_gemv_config(groups, rows, m=m, **kw)
    b64 = gemv.choose_gemv_config(groups, rows, m=m, block_n=64, programs=8192)
    out["block_n 64, programs ×2"] = b64
    out["warps 8"] = dataclasses.replace(base, num_warps=8)
    return out


def main(argv=None) -> int:
    args, interpret, shapes, ms, head = probe_setup(
        argv, __doc__, "16,32", "activation rows; M ≤ 2: the GEMV (x float, the api's form)", 3,
        ({"tiny": (1024, 320)}, None),
        lambda p: p.add_argument("--only", default=None, help="comma-separated substrings: the variants whose label "
                                 "holds one of them (the default always runs)"))
    rng = np.random.default_rng(0)
    table = ["| layer | K → N | M | variant | config (block_m×block_n or GEMV rows, split, warps, stages, pf or gpi) | XLA bf16 µs | row default µs | "
             "tiled µs | tiled / row | × bf16 | max rel. diff |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    ok = True
    for name, (k, n) in shapes.items():
        base, ws, dense = weight_copies(rng, n, k, interpret)
        rows = base.q8.shape[0] + base.q4.shape[0]
        tw = [tile_codes(w, groups=1) for w in ws]
        for m in ms:
            x = jnp.asarray(rng.normal(size=(m, k)), jnp.bfloat16)
            codes = None if m <= 2 else QuantizedActivations(*kernels.quantize_activations_xla(x, block_m=64), (m,), k, "bfloat16")

            arg = x if m <= 2 else codes

            def timed(wlist, cfg):
                if m <= 2:
                    fn = lambda a, w: gemv.mixed_gemv_pallas(a, w, config=cfg, partials=True,  # noqa: E731
                                                             interpret=interpret)
                else:
                    fn = lambda a, w: kernels.mixed_matmul_pallas(a, w, config=cfg, partials=True,  # noqa: E731
                                                                  interpret=interpret)
                jitted = jax.jit(lambda a, ws: [fn(a, w) for w in ws])
                out = jax.block_until_ready(jitted(arg, wlist))
                if interpret:
                    return out, float("nan")
                traced = trace_events(lambda: jitted(arg, wlist), args.runs)
                busy = float("nan") if isinstance(traced, str) else \
                    sum(traced[0].values()) / 1e3 / args.runs / len(wlist)
                return out, busy

            cfg0 = gemv.choose_gemv_config(base.num_groups, rows, m=m) if m <= 2 else \
                kernels.choose_config(m, base.num_groups, rows)
            want, row_us = timed(ws, cfg0)
            want = [np.asarray(jnp.sum(o, axis=0)) for o in want]
            xla = float("nan")
            if not interpret:
                bf = jax.jit(lambda x, ws: [jnp.dot(x, w.T) for w in ws])
                traced = trace_events(lambda: bf(x, dense), args.runs)
                xla = float("nan") if isinstance(traced, str) else sum(traced[0].values()) / 1e3 / args.runs / len(dense)
            sweep = gemv_variants(base.num_groups, rows, m) if m <= 2 else variants(cfg0, base.num_groups)
            if args.only:
                sweep = {label: c for label, c in sweep.items()
                         if label == "default" or any(o in label for o in args.only.split(","))}
            for label, cfg in sweep.items():
                try:
                    got, us = timed(tw, cfg)
                except Exception as e:  # a config the kernel refuses or cannot compile: say so, go on
                    table.append(f"| {name} | {k} → {n} | {m} | {label} | — | | | failed: {type(e).__name__} | | | |")
                    print(table[-1], str(e)[:200], flush=True)
                    continue
                diff = max(float(np.max(np.abs(np.asarray(jnp.sum(g, axis=0)) - w)) / (np.max(np.abs(w)) + 1e-30))
                           for g, w in zip(got, want))
                ok &= diff < 1e-5
                desc = (f"{cfg.block_n} rows, {cfg.split_k}, {cfg.num_warps}, {cfg.num_stages}, gpi {cfg.groups_per_iter}"
                        if m <= 2 else f"{cfg.block_m}×{cfg.block_n}, {cfg.split_k}, {cfg.num_warps}, {cfg.num_stages}, {cfg.prefetch_meta}")
                table.append(f"| {name} | {k} → {n} | {m} | {label} | {desc} | {xla:.1f} | {row_us:.1f} | {us:.1f} | "
                             f"{us / row_us:.3f} | {xla / us:.2f} | {diff:.1e} |")
                print(table[-1], flush=True)
    write_table(head, table, args.out)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
