"""Are the decode tiles slowed by where their per-group reads land in DRAM? Row-major against tile-major codes.

    python benchmarks/probe_tile_major.py --out /tmp/tile_major.md    # Hopper GPU, ≈ 2 min
    python benchmarks/probe_tile_major.py --small                     # CPU smoke run (interpret mode)

Why (NOTES-kernels.md item 125): at 16–32 activation rows the decode tiles (`kernels._decode_config`) move
0.9–1.8 TB/s where the GEMV at one row moves ≈ 2.5 (gate/up at 84 % of its floor), and twice the programs over
the same weights (M = 64) take twice the time: a per-(tile, group) cost, which sessions 9–33 read as the latency
of the per-group small loads. Each iteration of a program reads its group's 4-bit codes as 64 rows × 64 bytes
2 KB apart (row-major [N, K/2]), its scales as 256 bytes and zeros as 64 bytes at another address, so every
iteration of every one of ≈ 450–660 programs opens new DRAM pages for 64-byte pieces. The GEMV reads 256
contiguous bytes of a row an iteration (`gemv.GemvConfig.groups_per_iter = 4`, 6–18 % faster when it came in).
Tiled codes (`format.tile_codes`, `MixedWeight.tiled`) make a (64-row tile, group) block 4 KB contiguous, and
consecutive groups of a tile adjacent. The arithmetic is untouched, so every output is checked bit for bit against
the row-major one.

Variants, each in one jit over weight copies rotated past the 50 MB L2 (the same codes XOR-ed with the copy's
index): `row` (the stored row-major codes), `Q=1` (`format.tile_codes(groups=1)`: blocks of 64 rows × 1 group, 4 KB
contiguous a decode tile's group) and `Q=4` (64 rows × 4 groups a block row: a GEMV row's 4 groups contiguous, a
decode tile's group 64 pieces of 64 bytes 256 bytes apart in one 16 KB block), through the dispatch the model uses
(`pallas_kernels.mixed_matmul(implementation="pallas")`: the GEMV at M ≤ 2, the decode tiles to M = 128), and the
prefill's int4 → int8 unpack (`unpack.int8_weight`, M = "unpack"); XLA's bf16 dot for the ratio. Device busy µs a
call of every kernel of it, from a profiler trace. Session 37's first call measured a third form, the scales and
zeros tile-major too ([tiles, G, 64]): slower than the codes alone on 9 of 12 rows (results/kernels.md), not kept.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from bench_matmul import packed_bytes, random_packed  # noqa: E402
from devtime import trace_events, write_table  # noqa: E402
from pallas_kernels import mixed_matmul, unpack  # noqa: E402
from pallas_kernels.format import tile_codes  # noqa: E402

SHAPES = {"gate+up": (4096, 28672), "q/k/v": (4096, 6144), "down": (14336, 4096), "o": (4096, 4096)}  # K, N
ROTATE_BYTES = 120e6  # weight bytes a timed program walks through (the H100's L2 is 50 MB)


def _busy(events, runs: int, calls: int, key: str) -> float:
    """µs a call of the kernels whose name contains `key` (all kernels for key "")."""
    return sum(d for (_, name), d in events.items() if key in name) / 1e3 / runs / calls


def probe_setup(argv, doc: str, ms: str, ms_help: str, runs: int, small: tuple, extra=None):
    """The probes' common command line (--ms, --layers, --runs, --small, --out, and what `extra(parser)` adds) →
    (args, interpret, {layer: (K, N)}, [M], header line); `small` = (shapes, ms) of the CPU smoke run."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    if extra:
        extra(p)
    p.add_argument("--ms", default=ms, help=ms_help)
    p.add_argument("--layers", default=",".join(SHAPES), help=f"of {', '.join(SHAPES)}")
    p.add_argument("--runs", type=int, default=runs)
    p.add_argument("--small", action="store_true", help="a tiny shape in interpret mode (CPU)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    interpret = jax.default_backend() != "gpu"
    shapes, m_list = {k: SHAPES[k] for k in args.layers.split(",")}, [int(m) for m in args.ms.split(",")]
    if args.small:  # (small's M list None: --ms as given)
        shapes, m_list, args.runs = small[0], small[1] or m_list, 1
    dev = jax.devices()[0]
    head = f"device: {dev.device_kind} ({dev.platform}), jax {jax.__version__}, {datetime.date.today()}"
    print(head, flush=True)
    return args, interpret, shapes, m_list, head


def weight_copies(rng, n: int, k: int, interpret: bool):
    """A random W4.4A8 weight [N, K] and copies of it (codes XOR-ed with the copy's index) walking past the L2, and
    bf16 copies for XLA's dot: (base, packed copies, dense copies); one of each in interpret mode."""
    base = random_packed(rng, n, k, 0.1)
    calls = 1 if interpret else max(2, int(-(-ROTATE_BYTES // packed_bytes(base))))
    ws = [base] + [dataclasses.replace(base, q4=base.q4 ^ jnp.int8(i), q8=base.q8 ^ jnp.int8(i))
                   for i in range(1, calls)]
    dense = [jnp.asarray(rng.normal(size=(n, k)) * 0.02, jnp.bfloat16)
             for _ in range(1 if interpret else max(2, int(-(-ROTATE_BYTES // (2 * n * k)))))]
    return base, ws, dense


def main(argv=None) -> int:
    args, interpret, shapes, ms, head = probe_setup(
        argv, __doc__, "1,2,16,32,0", "activation rows (0: the prefill's int4 → int8 unpack)", 5,
        ({"tiny": (640, 320)}, [1, 2, 16, 0]))
    rng = np.random.default_rng(0)
    table = ["| layer | K → N | M | copies | XLA bf16 µs | row µs | Q=1 µs | Q=4 µs | = row | Q=1 / row | Q=4 / row | "
             "row × bf16 | Q=4 × bf16 |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    impl = "xla" if interpret else "pallas"
    for name, (k, n) in shapes.items():
        base, ws, dense = weight_copies(rng, n, k, interpret)
        calls = len(ws)
        forms = {"row": ws, "t1": [tile_codes(w, groups=1) for w in ws], "t4": [tile_codes(w, groups=4) for w in ws]}
        for m in ms:
            x = jnp.asarray(rng.normal(size=(max(m, 1), k)), jnp.bfloat16)
            if m == 0:  # the prefill's unpack
                def fn(x, w):
                    return unpack.int8_weight(w, rows=-(-n // 256) * 256, implementation=impl, interpret=interpret)
            else:
                def fn(x, w):
                    return mixed_matmul(x, w, implementation="pallas", interpret=interpret)
            outs, busy = {}, {}
            for v, wv in forms.items():
                jitted = jax.jit(lambda x, ws, fn=fn: [fn(x, w) for w in ws])
                outs[v] = jax.block_until_ready(jitted(x, wv))
                if not interpret:
                    traced = trace_events(lambda: jitted(x, wv), args.runs)
                    busy[v] = float("nan") if isinstance(traced, str) else _busy(traced[0], args.runs, calls, "")
            same = all(bool(jnp.array_equal(a, b)) for v in ("t1", "t4")
                       for a, b in zip(jax.tree.leaves(outs[v]), jax.tree.leaves(outs["row"])))
            label = "unpack" if m == 0 else m
            if interpret:
                table.append(f"| {name} | {k} → {n} | {label} | {calls} | | | | | {'yes' if same else 'NO'} | | | | |")
                continue
            xla = float("nan")
            if m:
                bf = jax.jit(lambda x, ws: [jnp.dot(x, w.T) for w in ws])
                traced = trace_events(lambda: bf(x, dense), args.runs)
                xla = float("nan") if isinstance(traced, str) else _busy(traced[0], args.runs, len(dense), "")
            row = (f"| {name} | {k} → {n} | {label} | {calls} | {xla:.1f} | {busy['row']:.1f} | {busy['t1']:.1f} | "
                   f"{busy['t4']:.1f} | {'yes' if same else 'NO'} | {busy['t1'] / busy['row']:.3f} | "
                   f"{busy['t4'] / busy['row']:.3f} | {xla / busy['row']:.2f} | {xla / busy['t4']:.2f} |")
            print(row, flush=True)
            table.append(row)
    write_table(head, table, args.out)
    return 0 if all("NO" not in r for r in table) else 1


if __name__ == "__main__":
    sys.exit(main())
