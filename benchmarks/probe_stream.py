"""How fast can a Mosaic GPU TMA pipeline stream a decode weight when the compute does nothing?

The decode kernel (`pallas_kernels/mgpu_decode.py`) reached 50 % of DRAM bandwidth at M = 1. This probe
times the same warp-specialised pipeline with an empty body, so the copy side alone sets the time, for:

- the tile a step copies: `rows` weight rows × `tile_bytes` bytes of each row;
- `layout`: "strided" — the weight as stored today, [R, Kp/2] row-major, so a tile is `rows` pieces of
  `tile_bytes` bytes, one per row, a row stride apart; "tiled" — the same bytes stored so that every tile
  is one contiguous block (a [R·Kp/2 / tile_bytes, tile_bytes] array);
- `extras`: the small per-step copies of the real kernel (weight scales, zeros, activation codes,
  scales and sums: 5 more TMA copies of 128 B – 1 KB each), or none.

If the strided probe is as slow as the kernel, the copy pattern is the bound and a tiled weight layout is
the fix; if the probe runs near the copy bandwidth, the compute warpgroups are.

    python benchmarks/probe_stream.py [--k 4096 --n 14336]     (an sm_90 GPU; prints one line a case)
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

sys.path.insert(0, os.path.dirname(__file__))
import devtime  # noqa: E402

_SWIZZLE = 64


def stream(w: jax.Array, extras: list[jax.Array], *, layout: str, rows: int, tile_bytes: int, tiles: int,
           steps: int, split: int, stages: int, wgs: int) -> jax.Array:
    """Stream one weight in steps of [rows, tile_bytes] per CTA (tiles × split CTAs, `steps` steps each),
    plus one block of each extra [steps·split, width] per step; the body reads nothing.

    strided: w [tiles·rows, split·steps·tile_bytes] (today's layout); tiled: w [tiles·split·steps·sub, 256]
    with sub = rows·tile_bytes / 256, every step's block contiguous (a TMA box is ≤ 256 per dimension).
    Returns a dummy f32 [tiles·split, 64·wgs, 8] of zeros."""
    transforms = (plgpu.TilingTransform((8, _SWIZZLE)), plgpu.SwizzleTransform(_SWIZZLE))
    sub = rows * tile_bytes // 256

    def kernel(w_gmem, *rest, out_smem):
        ex_gmem, out_gmem = rest[:-1], rest[-1]
        ti, si = lax.axis_index("tile"), lax.axis_index("split")
        wg = lax.axis_index("wg")

        def body(_, *refs):
            return refs[-1]

        def compute_context(run):
            acc = run(plgpu.layout_cast(jnp.zeros((64, 8), jnp.float32), plgpu.Layout.WGMMA))
            out_smem[wg] = acc
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(out_smem.at[wg], out_gmem.at[ti * split + si].at[pl.ds(wg * 64, 64)])
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)

        if layout == "strided":
            specs = [plgpu.BlockSpec((rows, tile_bytes), lambda k: (0, k), transforms=transforms)]
            args = [w_gmem.at[pl.ds(ti * rows, rows), pl.ds(si * steps * tile_bytes, steps * tile_bytes)]]
        else:
            specs = [plgpu.BlockSpec((sub, 256), lambda k: (k, 0))]
            args = [w_gmem.at[pl.ds((ti * split + si) * steps * sub, steps * sub)]]
        for e in ex_gmem:  # [split·steps·br, width]: br rows a step
            br = e.shape[0] // (split * steps)
            specs.append(plgpu.BlockSpec((br, e.shape[1]), lambda k: (k, 0)))
            args.append(e.at[pl.ds(si * steps * br, steps * br)])
        plgpu.emit_pipeline_warp_specialized(
            body, grid=(steps,), memory_registers=40, in_specs=specs, wg_axis="wg",
            num_compute_wgs=wgs, max_concurrent_steps=stages, compute_context=compute_context,
        )(*args)

    call = plgpu.kernel(
        kernel, out_type=jax.ShapeDtypeStruct((tiles * split, 64 * wgs, 8), jnp.float32),
        grid=(tiles, split), grid_names=("tile", "split"), num_threads=wgs + 1, thread_name="wg",
        scratch_types=dict(out_smem=plgpu.SMEM((wgs, 64, 8), jnp.float32)))
    return call(w, *extras)


def plan(k: int, n: int, rows: int, tile_bytes: int, ctas: int) -> dict:
    steps_total = (k // 2) // tile_bytes
    tiles = n // rows
    split = max(d for d in range(1, steps_total + 1) if steps_total % d == 0 and tiles * d <= max(ctas, tiles)
                and (steps_total // d >= 4 or d == 1))
    return dict(tiles=tiles, split=split, steps=steps_total // split)


def case(k: int, n: int, *, layout: str, rows: int, tile_bytes: int, extras: bool, stages: int, wgs: int,
         ctas: int, copies: int = 4):
    packed = k // 2
    pl_ = plan(k, n, rows, tile_bytes, ctas)
    shape = (n, packed) if layout == "strided" else (n * packed // 256, 256)
    w0 = jax.random.randint(jax.random.key(0), shape, -128, 127, jnp.int8)
    steps_total = pl_["split"] * pl_["steps"]
    ex0 = []
    if extras:  # per step: weight scales (f32, rows), zeros (128 B), activation codes (1 KB), scales, sums (128 B)
        ex0 = [jnp.zeros((steps_total, rows), jnp.float32), jnp.zeros((steps_total, 128), jnp.int8),
               jnp.zeros((steps_total * 8, 128), jnp.int8), jnp.zeros((steps_total, 32), jnp.float32),
               jnp.zeros((steps_total, 32), jnp.int32)]
    ws = [jnp.array(w0, copy=True) for _ in range(copies)]
    fn = jax.jit(lambda ws, ex: [stream(w, ex, layout=layout, rows=rows, tile_bytes=tile_bytes, stages=stages,
                                        wgs=wgs, **pl_) for w in ws])
    dt = devtime.device_times(lambda: fn(ws, ex0), runs=3)
    if "error" in dt:
        return {"error": dt["error"]}
    us = dt["busy_us"] / copies
    return {"us": round(us, 2), "tb_s": round(n * packed / us / 1e6, 3), **pl_}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--k", type=int, default=4096)
    p.add_argument("--n", type=int, default=14336)
    p.add_argument("--quick", action="store_true", help="6 stages, 132 CTAs, 128 rows × 64 or 128 B, no extras")
    args = p.parse_args(argv)
    dev = jax.devices()[0]
    print(f"device {dev.device_kind}, jax {jax.__version__}; stream {args.n}×{args.k // 2} B "
          f"({args.n * args.k // 2 / 1e6:.1f} MB), busy µs per stream", flush=True)
    grid = itertools.product(("strided", "tiled"), ((128, 64), (128, 128), (128, 256), (64, 256), (256, 64)),
                             (False, True), (4, 6, 8), (132, 264))
    for layout, (rows, tb), extras, stages, ctas in grid:
        if args.quick and ((stages, ctas) != (6, 132) or (rows, tb) not in ((128, 64), (128, 128)) or extras):
            continue
        if layout == "tiled" and rows * tb % 256:
            continue
        cfg = dict(layout=layout, rows=rows, tile_bytes=tb, extras=extras, stages=stages,
                   wgs=max(1, rows // 64 if rows <= 128 else 2), ctas=ctas)
        try:
            res = case(args.k, args.n, **cfg)
        except Exception as e:  # noqa: BLE001 — report and go on
            res = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
        print(json.dumps({**cfg, **res}), flush=True)


if __name__ == "__main__":
    main()
