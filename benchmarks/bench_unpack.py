"""The int4 → int8 unpack before the prefill GEMM: XLA's pass (`unpack.int8_weight_ref`) against the Pallas-Triton
kernel (`unpack.int8_weight_pallas`) over its block sizes, on Llama-3-8B's fused linears (10 % 8-bit rows).

    python benchmarks/bench_unpack.py --out /tmp/unpack.md     # GPU, < 1 min
    python benchmarks/bench_unpack.py --small                  # CPU smoke run (interpret mode)

Why (NOTES-kernels.md items 65, 80, 82): a W4.4A8 prefill builds every linear's int8 matrix at every call; XLA's
pass took ≈ 3.6 of 44 ms at 2048 tokens on an H200. The pass reads the packed bytes and writes one byte a
weight, so its floor is those bytes at the copy rate. Each variant is checked bit for bit against the reference,
then timed as `--calls` calls on distinct weight copies in one jit (device busy µs a call, benchmarks/devtime.py):
µs, GB/s of bytes read + written, and the speedup over XLA's pass.
"""

from __future__ import annotations

import argparse
import datetime
import os
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import pallas_kernels as pk  # noqa: E402
from pallas_kernels import unpack  # noqa: E402

SHAPES = {"q/k/v": (4096, 6144), "o": (4096, 4096), "gate+up": (4096, 28672), "down": (14336, 4096)}  # K, N
BLOCKS = [(16, 4, 4), (32, 2, 4), (32, 4, 8), (16, 2, 4), (8, 4, 4), (8, 8, 4), (16, 4, 2), (16, 2, 2), (8, 4, 2),
          (16, 8, 8), (32, 4, 4)]  # (rows, groups, warps); session 23's first sweep also had 64 and 128 rows: slower


def _bytes(qw, rows: int) -> int:
    moved = sum(a.size * a.dtype.itemsize for a in (qw.q8, qw.q4, qw.scale8, qw.scale4, qw.zero4, qw.row_of_channel))
    return moved + rows * qw.k_padded + qw.num_groups * rows * 4  # + the int8 matrix and its scales


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=6, help="distinct weight copies a timed program (beyond the L2)")
    p.add_argument("--share8", type=float, default=0.1)
    p.add_argument("--small", action="store_true")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    interpret = jax.default_backend() != "gpu"
    shapes, blocks = SHAPES, BLOCKS
    if args.small:
        shapes, blocks, args.calls = {"tiny": (256, 384)}, BLOCKS[:2], 2
    dev = jax.devices()[0]
    head = f"device: {dev.device_kind} ({dev.platform}), jax {jax.__version__}, {datetime.date.today()}"
    print(head, flush=True)
    variants = {"xla": lambda qw, rows: unpack.int8_weight_ref(qw, rows=rows)}
    for br, bg, nw in blocks:
        variants[f"pallas_r{br}g{bg}w{nw}"] = lambda qw, rows, br=br, bg=bg, nw=nw: unpack.int8_weight_pallas(
            qw, rows=rows, block_rows=br, block_groups=bg, num_warps=nw, interpret=interpret)
    rows_out = ["| layer | K × N | MB moved | variant | = reference | busy µs | GB/s | vs xla |",
                "|---|---|---|---|---|---|---|---|"]
    rng = np.random.default_rng(0)
    for name, (k, n) in shapes.items():
        is8 = jnp.asarray(rng.random(n) < args.share8)
        base_w = rng.normal(size=(n, k)).astype(np.float32) * 0.02
        qws = []
        for _ in range(args.calls):  # distinct copies: the same channel split, different codes
            w = base_w * rng.uniform(0.5, 2.0, size=(n, 1)).astype(np.float32)
            qws.append(pk.pack_rtn(jnp.asarray(w), is8))
        rows = -(-n // 256) * 256
        mb = _bytes(qws[0], rows) / 1e6
        ref = unpack.int8_weight_ref(qws[0], rows=rows)
        base = None
        for vname, fn in variants.items():
            got = fn(qws[0], rows)
            same = all(np.array_equal(a, b) for a, b in zip(got, ref))
            many = jax.jit(lambda qws, fn=fn: [fn(q, rows) for q in qws])
            jax.block_until_ready(many(qws))
            if interpret:
                busy = float("nan")
            else:
                import devtime

                busy = devtime.device_times(lambda: many(qws), runs=3).get("busy_us", float("nan")) / args.calls
            base = busy if vname == "xla" else base
            rows_out.append(f"| {name} | {k} × {n} | {mb:.1f} | {vname} | {same} | {busy:.2f} | "
                            f"{mb * 1e3 / busy:.0f} | {base / busy:.2f}× |")
            print(rows_out[-1], flush=True)
    table = head + "\n\n" + "\n".join(rows_out) + "\n"
    if args.out:
        pathlib.Path(args.out).write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
