"""Decode attention over a KV cache: XLA (`attend_ref`, the model's default) against the one-launch Pallas
kernel (`pallas_kernels.decode_attention_pallas`), Llama-3-8B heads (32 query, 8 KV, Dh 128).

    python benchmarks/bench_attention.py --out /tmp/attention.md        # GPU, < 2 min
    python benchmarks/bench_attention.py --small                        # CPU smoke run (interpret mode)

For each batch B, cache size S and cache dtype: one new token per row at position S − 1 (the whole cache
visible), and at S/4 (the kernel skips the blocks past it; XLA masks them). Each variant is checked against
the reference first (max |error| / max |reference| printed), then timed as `--calls` calls on distinct
caches inside one jit (device-timer busy and span µs per call, benchmarks/devtime.py). The floor is the
visible keys and values read once at the measured copy bandwidth.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from pallas_kernels import attention  # noqa: E402

H, KVH, DH = 32, 8, 128


def _inputs(rng, B, S, calls, int8):
    qs = [jnp.asarray(rng.normal(size=(B, 1, H, DH)), jnp.bfloat16) for _ in range(calls)]
    if int8:
        caches = [(jnp.asarray(rng.integers(-127, 128, (B, KVH, S, DH)), jnp.int8),
                   jnp.asarray(rng.integers(-127, 128, (B, KVH, S, DH)), jnp.int8),
                   jnp.asarray(rng.uniform(0.002, 0.03, (B, KVH, S)), jnp.float32),
                   jnp.asarray(rng.uniform(0.002, 0.03, (B, KVH, S)), jnp.float32)) for _ in range(calls)]
    else:
        caches = [(jnp.asarray(rng.normal(size=(B, KVH, S, DH)), jnp.bfloat16),
                   jnp.asarray(rng.normal(size=(B, KVH, S, DH)), jnp.bfloat16), None, None) for _ in range(calls)]
    return qs, caches


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--lengths", default="384,2048,8192")
    p.add_argument("--calls", type=int, default=8, help="calls per jitted program, each on its own cache")
    p.add_argument("--small", action="store_true", help="tiny sizes, interpret mode (CPU smoke run)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    interpret = jax.default_backend() != "gpu"
    batches = [int(b) for b in args.batches.split(",")]
    lengths = [int(s) for s in args.lengths.split(",")]
    if args.small:
        batches, lengths, args.calls = [1, 2], [96], 2
    dev = jax.devices()[0]
    head = f"device: {dev.device_kind} ({dev.platform}), jax {jax.__version__}, {datetime.date.today()}"
    print(head, flush=True)
    bandwidth = None
    if not interpret:
        import bench_matmul

        bandwidth = bench_matmul.copy_bandwidth()
    import devtime

    variants = {
        "xla": lambda q, c, pos: attention.decode_attention_ref(q, c[0], c[1], pos, k_scale=c[2], v_scale=c[3]),
        "pallas": lambda q, c, pos: attention.decode_attention_pallas(q, c[0], c[1], pos, k_scale=c[2], v_scale=c[3],
                                                                       interpret=interpret),
        "pallas_s1": lambda q, c, pos: attention.decode_attention_pallas(q, c[0], c[1], pos, k_scale=c[2], v_scale=c[3],
                                                                          splits=1, interpret=interpret),
    }
    rows = ["| cache | B | S | position | variant | splits | rel. error | busy µs | span µs | kernels | floor µs | vs xla (span) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    rng = np.random.default_rng(0)
    for int8 in (False, True):
        for B in batches:
            for S in lengths:
                qs, caches = _inputs(rng, B, S, args.calls, int8)
                for at in (S - 1, S // 4):
                    pos = jnp.full((B, 1), at, jnp.int32)
                    ref = np.asarray(variants["xla"](qs[0], caches[0], pos), np.float32)
                    visible = (at + 1) * B * KVH * DH * 2 * (1 if int8 else 2)
                    floor_us = 1e6 * visible / bandwidth if bandwidth else float("nan")
                    base = None
                    for name, fn in variants.items():
                        got = np.asarray(fn(qs[0], caches[0], pos), np.float32)
                        err = float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-30))
                        splits = "-" if name == "xla" else 1 if name == "pallas_s1" else \
                            attention.choose_splits(B, KVH, S, 64)
                        many = jax.jit(lambda qs, cs, pos, fn=fn: [fn(q, c, pos) for q, c in zip(qs, cs)])
                        jax.block_until_ready(many(qs, caches, pos))
                        dt = devtime.device_times(lambda: many(qs, caches, pos), runs=3) if not interpret else {}
                        busy, span = dt.get("busy_us", float("nan")) / args.calls, dt.get("span_us", float("nan")) / args.calls
                        kern = dt.get("kernels", float("nan")) / args.calls
                        base = span if name == "xla" else base
                        rows.append(f"| {'int8' if int8 else 'bf16'} | {B} | {S} | {at} | {name} | {splits} | {err:.1e} "
                                    f"| {busy:.1f} | {span:.1f} | {kern:.1f} | {floor_us:.1f} | {base / span:.2f}× |")
                        print(rows[-1], flush=True)
    table = head + (f", copy bandwidth {bandwidth / 1e12:.2f} TB/s" if bandwidth else "") + "\n\n" + "\n".join(rows) + "\n"
    if args.out:
        with open(args.out, "w") as f:
            f.write(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
