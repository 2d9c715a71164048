"""The ceiling of the M = 1 decode GEMV's structure: its copy-only twin (benchmarks/NOTES-kernels.md item 73).

    python benchmarks/probe_twin.py [--layers o,qkv,down,gate_up] [--programs 4096,2048,1024] [--block-n 32,64]

The b1 goal (2.5× XLA's bf16 step) needs the 128 decoder GEMVs of a step in ≈ 1.3 ms; they take 1.49. This
probe times, per Llama-3-8B decode linear at M = 1 on int8 codes (each call on its own weight copy, > 150 MB
in all, device-timer µs a call, median of 3 runs):

- `gemv`: `gemv.mixed_gemv_pallas` with the model's config, returning its split-K partials as the model
  takes them;
- `twin{P}b{B}`: a Pallas-Triton kernel with the GEMV's grid for `block_n` B and at most P programs, the
  same weight, scale and zero loads (same blocks, same eviction hint) and the same partials store, but no
  activation loads and no arithmetic beyond a sum of the loaded words: what the loads and the grid cost
  alone;
- `xla_bf16`: XLA's dot of a bf16 weight of the same shape.

If the default twin's sum over a step's GEMVs is near 1.3 ms or above, the goal is out of reach of this grid
whatever the arithmetic; a twin structure far below it says which structure the GEMV should take. `--mb 4000`
spreads each layer's copies over as many bytes as the model's step reads: in the model the GEMVs take 5–15 %
longer than here (session 21), and the page footprint is one candidate cause.
Needs a GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import devtime  # noqa: E402
from probe_l2 import LAYERS, rotated_copies  # noqa: E402
from pallas_kernels import gemv  # noqa: E402

_WORDS = gemv._WORDS


def _twin_kernel(q8_ref, s8_ref, q4_ref, s4_ref, z4_ref, chan_ref, o_ref, *, bn, gpi, n8_tiles, n4_tiles,
                 groups_per_split, n_out):
    tile, split = pl.program_id(0), pl.program_id(1)
    g0 = split * groups_per_split
    cols = chan_ref[pl.ds(tile * bn, bn)]
    first = dict(eviction_policy="evict_first")

    def run(load, n0):
        rows = pl.ds(n0, bn)

        def body(i, acc):
            gs = pl.ds(g0 + i * gpi, gpi)
            words, metas = load(gs, rows)
            s = sum(jnp.sum(jnp.sum(w, axis=-1), axis=-1) for w in words)  # [bn] int32
            m = sum(jnp.sum(v.astype(jnp.float32), axis=0) for v in metas)  # [bn]
            return acc + s.astype(jnp.float32) + m

        acc = jax.lax.fori_loop(0, groups_per_split // gpi, body, jnp.zeros((bn,), jnp.float32))
        plgpu.store(o_ref.at[split, cols], acc, mask=cols < n_out)

    def w8(gs, rows):
        half = lambda h: plgpu.load(q8_ref.at[rows, gs, pl.ds(h, 1), :], **first).reshape(-1, gpi, _WORDS)  # noqa: E731
        return (half(0), half(1)), (plgpu.load(s8_ref.at[gs, rows]),)

    def w4(gs, rows):
        return (plgpu.load(q4_ref.at[rows, gs, :], **first),), (plgpu.load(s4_ref.at[gs, rows]),
                                                                 plgpu.load(z4_ref.at[gs, rows]))

    gemv._by_channel_set(tile, bn, n8_tiles, n4_tiles, lambda n0: run(w8, n0), lambda n0: run(w4, n0))


@functools.partial(jax.jit, static_argnames=("cfg",))
def twin(qw, *, cfg: gemv.GemvConfig):
    g = qw.num_groups
    n8_tiles, n4_tiles = qw.q8.shape[0] // cfg.block_n, qw.q4.shape[0] // cfg.block_n
    q8 = gemv._words(qw.q8).reshape(qw.q8.shape[0], g, 2, _WORDS)
    q4 = gemv._words(qw.q4).reshape(qw.q4.shape[0], g, _WORDS)
    kernel = functools.partial(_twin_kernel, bn=cfg.block_n, gpi=cfg.groups_per_iter, n8_tiles=n8_tiles,
                               n4_tiles=n4_tiles, groups_per_split=g // cfg.split_k, n_out=qw.n)
    return pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct((cfg.split_k, qw.n), jnp.float32),
        grid=(n8_tiles + n4_tiles, cfg.split_k), name="gemv_twin",
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
    )(q8, qw.scale8, q4, qw.scale4, qw.zero4, qw.channel)


def _per_call(fn, copies: int, key: str) -> tuple[float, float]:
    t = devtime.device_times(fn, runs=3, top=4)
    if "error" in t:
        raise RuntimeError(t["error"])
    kernel = sum(us for name, us in t["top"] if key in name) / copies
    return kernel, t["span_us"] / copies


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", default="o,qkv,down,gate_up")
    ap.add_argument("--programs", default="4096,2048,1024")
    ap.add_argument("--block-n", default="32,64")
    ap.add_argument("--mb", type=int, default=150,
                    help="MB of weight copies a layer's calls rotate over (the model's b1 step reads 4 210 MB; "
                         "more spreads the reads over more pages, as the model does)")
    args = ap.parse_args(argv)
    if jax.default_backend() != "gpu":
        print("probe_twin: needs a GPU")
        return 2
    print(jax.devices()[0].device_kind, "jax", jax.__version__)
    rng = np.random.default_rng(0)
    totals: dict[str, float] = {}
    print("| layer | MB | xla_bf16 µs | gemv µs | " + " | ".join(
        f"twin{p}b{b} µs" for b in args.block_n.split(",") for p in args.programs.split(",")) + " |")
    for layer in args.layers.split(","):
        n, k = LAYERS[layer]
        wbytes, ws, xs = rotated_copies(rng, n, k, args.mb)
        copies, w0 = len(ws), ws[0]
        bf = [jnp.asarray(rng.normal(size=(n, k)), jnp.bfloat16) for _ in range(max(2, -(-150_000_000 // (2 * n * k))))]
        xb = jnp.asarray(rng.normal(size=(1, k)), jnp.bfloat16)
        row = {}
        fn = jax.jit(lambda ws: [xb @ w.T for w in ws])
        row["xla_bf16"] = _per_call(lambda: fn(bf), len(bf), "")[1]
        real = jax.jit(lambda xs, ws: [gemv.mixed_gemv_pallas(x, w, partials=True) for x, w in zip(xs, ws)])
        row["gemv"] = _per_call(lambda: real(xs, ws), copies, "gemv")[0]
        # the GEMV's own config: the same split-K and groups an iteration for the twin
        base = gemv.choose_gemv_config(w0.num_groups, w0.q8.shape[0] + w0.q4.shape[0], m=1, quantize_first=True)
        for b in (int(v) for v in args.block_n.split(",")):
            for p in (int(v) for v in args.programs.split(",")):
                cfg = gemv.choose_gemv_config(w0.num_groups, w0.q8.shape[0] + w0.q4.shape[0], programs=p, m=1,
                                              quantize_first=True, block_n=b)
                cfg = dataclasses.replace(cfg, num_warps=base.num_warps)
                t = jax.jit(lambda ws, cfg=cfg: [twin(w, cfg=cfg) for w in ws])
                row[f"twin{p}b{b}"] = _per_call(lambda: t(ws), copies, "twin")[0]
        for key, us in row.items():
            totals[key] = totals.get(key, 0.0) + us * 32  # 32 layers a step
        print(f"| {layer} | {wbytes / 1e6:.1f} | " + " | ".join(f"{us:.2f}" for us in row.values()) + " |",
              flush=True)
    print("| a b1 step's 128 linears, ms | | " + " | ".join(f"{v / 1000:.3f}" for v in totals.values()) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
