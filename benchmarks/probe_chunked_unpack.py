"""Does the prefill's int4 → int8 unpack cost less when the int8 matrix is built in L2-sized chunks of output
channels, each consumed by its GEMM before the next chunk is unpacked?

    python benchmarks/probe_chunked_unpack.py --out /tmp/chunked.md     # Hopper GPU, ≈ 1 min
    python benchmarks/probe_chunked_unpack.py --small                   # CPU smoke run (interpret mode)

Why (NOTES-kernels.md item 121): a W4.4A8 prefill unpacks every linear into a fresh int8 matrix [N, K]
(`unpack.int8_weight_pallas`) and then runs the Mosaic GPU GEMM on it. The pass reads ≈ 0.55 byte a weight and
writes 1; at Llama-3-8B's gate/up the 117 MB it writes exceed the H100's 50 MB L2, so they go to HBM, and the
GEMM reads them back. Session 34's 256-token prefill spent ≈ 3.7 ms of 11.3 in the unpack. Built in chunks of
≤ ≈ 16 MB, one chunk's int8 rows could live in L2 from its unpack to its GEMM, and the next chunk's unpack
overwrite the same lines before they are written back, so the pass would cost its reads only.

Outcome (H100, 2026-12-06, results/kernels.md Session 35): no. The chunks' unpacks took as long as the whole
matrix's (gate/up 68–88 µs against 67 a linear), the concatenation cost 16–290 µs more, and small chunks' GEMMs lost
whole waves: every chunked variant was 1.07–2.00× slower. The library option it was built to decide was removed.

Variants, each in one jit over `--calls` weight copies (distinct bytes, beyond the L2): `full` (today's unpack +
GEMM), `chunkR` (chunks of R output channels: unpack rows [c, c + R) through the same kernel on a slice of
`row_of_channel`, its GEMM, the next chunk's unpack ordered after that GEMM by an optimization barrier, outputs
concatenated). Every variant's output is checked against `full`'s bit for bit first. Device busy µs a linear,
split into unpack, GEMM and the rest (the concatenation), from a profiler trace (benchmarks/devtime.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from bench_matmul import random_packed  # noqa: E402
from devtime import trace_events, write_table  # noqa: E402
from pallas_kernels import mgpu, unpack  # noqa: E402
from pallas_kernels.format import GROUP_SIZE, _round_up  # noqa: E402

SHAPES = {"gate+up": (4096, 28672), "q/k/v": (4096, 6144), "down": (14336, 4096), "o": (4096, 4096)}  # K, N
CHUNK_MB = (8, 16, 32)  # int8 bytes a chunk, in MB (rows = bytes / K, a multiple of 256)


def _chunk(qw, c0: int, c1: int):
    """The weight's output channels [c0, c1) as a MixedWeight the unpack kernel reads (the same packed arrays,
    a slice of the channel → packed-row map)."""
    return dataclasses.replace(qw, row_of_channel=qw.row_of_channel[c0:c1], n=c1 - c0)


def linear_full(x_q, sa, qw, *, interpret: bool):
    m = x_q.shape[0]
    cfg = mgpu.pick_config(m, qw.n, three_wgs=False)
    w, s = unpack.int8_weight(qw, rows=_round_up(qw.n, cfg.cta_n), implementation="xla" if interpret else "pallas")
    return mgpu.w8a8_group_matmul(x_q, sa, w, s, config=cfg, interpret=interpret)[:, : qw.n]


def linear_chunked(x_q, sa, qw, *, rows: int, interpret: bool):
    m = x_q.shape[0]
    ys, dep = [], None
    for c0 in range(0, qw.n, rows):
        c1 = min(qw.n, c0 + rows)
        part = _chunk(qw, c0, c1)
        if dep is not None:  # this chunk's unpack after the previous chunk's GEMM: one chunk's int8 rows live at once
            part, _ = lax.optimization_barrier((part, dep))
        cfg = mgpu.pick_config(m, c1 - c0, three_wgs=False)
        w, s = unpack.int8_weight(part, rows=_round_up(c1 - c0, cfg.cta_n),
                                  implementation="xla" if interpret else "pallas")
        dep = mgpu.w8a8_group_matmul(x_q, sa, w, s, config=cfg, interpret=interpret)
        ys.append(dep[:, : c1 - c0])
    return jnp.concatenate(ys, axis=1)


def _split(events, runs: int) -> dict:
    out = {"unpack": 0.0, "gemm": 0.0, "other": 0.0}
    for (_, name), dur in events.items():
        key = "unpack" if "unpack" in name else "gemm" if "mosaic" in name else "other"
        out[key] += dur / 1e3 / runs
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ms", default="2048,256", help="activation rows (prompt tokens)")
    p.add_argument("--layers", default=",".join(SHAPES), help=f"of {', '.join(SHAPES)}")
    p.add_argument("--calls", type=int, default=3, help="distinct weight copies a timed program")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--small", action="store_true", help="a tiny shape in interpret mode (CPU)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    interpret = jax.default_backend() != "gpu"
    shapes, ms, chunk_rows = {k: SHAPES[k] for k in args.layers.split(",")}, [int(m) for m in args.ms.split(",")], None
    if args.small:
        shapes, ms, chunk_rows, args.calls, args.runs = {"tiny": (256, 640)}, [128], [256], 1, 1
    dev = jax.devices()[0]
    head = f"device: {dev.device_kind} ({dev.platform}), jax {jax.__version__}, {datetime.date.today()}"
    print(head, flush=True)
    rng = np.random.default_rng(0)
    table = ["| layer | K → N | M | variant | chunks | = full | busy µs a linear | unpack | GEMM | other | vs full |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, (k, n) in shapes.items():
        base = random_packed(rng, n, k, 0.1)
        # distinct copies: the same codes shifted by one byte value, so no copy's bytes are cached for another
        ws = [base] + [dataclasses.replace(base, q4=base.q4 ^ jnp.int8(i), q8=base.q8 ^ jnp.int8(i))
                       for i in range(1, args.calls)]
        g = base.num_groups
        for m in ms:
            x_q = jnp.asarray(rng.integers(-127, 128, (m, g * GROUP_SIZE)), jnp.int8)
            sa = jnp.asarray(rng.uniform(0.5, 1.5, (g, m)) * 1e-2, jnp.float32)
            variants = {"full": functools.partial(linear_full, interpret=interpret)}
            for rows in chunk_rows or sorted({max(256, (mb << 20) // k // 256 * 256) for mb in CHUNK_MB}):
                if rows < n:
                    variants[f"chunk{rows}"] = functools.partial(linear_chunked, rows=rows, interpret=interpret)
            ref, full_busy = None, None
            for vname, fn in variants.items():
                jitted = jax.jit(lambda x_q, sa, ws, fn=fn: [fn(x_q, sa, w) for w in ws])
                out = jax.block_until_ready(jitted(x_q, sa, ws))
                same = "–" if ref is None else ("yes" if all(bool(jnp.array_equal(a, b)) for a, b in zip(out, ref))
                                                else "NO")
                ref = out if ref is None else ref
                chunks = 1 if vname == "full" else -(-n // int(vname[5:]))
                if interpret:
                    table.append(f"| {name} | {k} → {n} | {m} | {vname} | {chunks} | {same} | | | | | |")
                    continue
                traced = trace_events(lambda: jitted(x_q, sa, ws), args.runs)
                if isinstance(traced, str):
                    print(f"{name} M={m} {vname}: {traced}", flush=True)
                    continue
                parts = {key: v / args.calls for key, v in _split(traced[0], args.runs).items()}
                busy = sum(parts.values())
                full_busy = busy if vname == "full" else full_busy
                ratio = f"{busy / full_busy:.2f}×" if full_busy else ""
                row = (f"| {name} | {k} → {n} | {m} | {vname} | {chunks} | {same} | {busy:.1f} | {parts['unpack']:.1f} | "
                       f"{parts['gemm']:.1f} | {parts['other']:.1f} | {ratio} |")
                print(row, flush=True)
                table.append(row)
    write_table(head, table, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
