"""Decode attention over a KV cache: XLA (the model's default) against the one-launch Pallas kernels,
Llama-3-8B heads (32 query, 8 KV, Dh 128), one new token per row.

    python benchmarks/bench_attention.py --out /tmp/attention.md        # GPU, ≈ 2 min
    python benchmarks/bench_attention.py --small                        # CPU smoke run (interpret mode)

Two comparisons, each at batch B and cache size S (`--int8` adds int8 caches):
- attention alone, the new token at position S − 1 (the whole cache visible) and at S/4 (the kernel skips
  the blocks past it; XLA masks them): `xla` (`attend_ref`), `pallas` (`decode_attention_pallas`, splits by
  `choose_splits`), `pallas_s1` (one program per row and KV head), `pallas_s4` (4 splits
  merged by XLA), `pallas_b64` (64-position blocks; the default is `choose_block`: 128 for bf16 at Dh 128);
- the whole step from the fused q/k/v projection's output to the attention output, at S − 1: `xla_step`
  (`attend_new_tokens_ref`: split, RoPE, cache scatter, attention — the model with `ATTENTION = "xla"`) and `fused`
  (`attend_new_tokens_pallas`; `fused_b64`: 64-position blocks), each on the bf16 output [B, 1, W] and on
  8 f32 split-K partials (`_p8`, what the GEMV hands over). The caches are donated and carried, so every
  variant updates them in place.
Every variant is checked against XLA first (max |error| / max |reference|), then timed as `--calls` calls on
distinct caches inside one jit: device-timer busy and span µs per call (benchmarks/devtime.py). The floor
is the visible keys and values read once at the measured copy bandwidth.
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

from mixjax import model  # noqa: E402
from pallas_kernels import attention  # noqa: E402

H, KVH, DH = 32, 8, 128
W = (H + 2 * KVH) * DH


def _caches(rng, B, S, calls, int8):
    if int8:
        return [(jnp.asarray(rng.integers(-127, 128, (B, KVH, S, DH)), jnp.int8),
                 jnp.asarray(rng.integers(-127, 128, (B, KVH, S, DH)), jnp.int8),
                 jnp.asarray(rng.uniform(0.002, 0.03, (B, KVH, S)), jnp.float32),
                 jnp.asarray(rng.uniform(0.002, 0.03, (B, KVH, S)), jnp.float32)) for _ in range(calls)]
    return [(jnp.asarray(rng.normal(size=(B, KVH, S, DH)), jnp.bfloat16),
             jnp.asarray(rng.normal(size=(B, KVH, S, DH)), jnp.bfloat16), None, None) for _ in range(calls)]


def _timed(many, args, calls, interpret, carry=None):
    """(busy, span, kernels) per call of many(*args) (× carry: the donated caches it returns, fed back)."""
    if interpret:
        return float("nan"), float("nan"), float("nan")
    import devtime

    state = {"c": carry}

    def run():
        if carry is None:
            return many(*args)
        outs, state["c"] = many(*args, state["c"])
        return outs

    jax.block_until_ready(run())
    dt = devtime.device_times(run, runs=3)
    return (dt.get("busy_us", float("nan")) / calls, dt.get("span_us", float("nan")) / calls,
            dt.get("kernels", float("nan")) / calls)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", default="1,32")
    p.add_argument("--lengths", default="384,4096")
    p.add_argument("--int8", action="store_true", help="int8 caches too")
    p.add_argument("--calls", type=int, default=8, help="calls per jitted program, each on its own cache")
    p.add_argument("--small", action="store_true", help="tiny sizes, interpret mode (CPU smoke run)")
    p.add_argument("--step-only", action="store_true", help="only the whole step (skip attention alone)")
    p.add_argument("--parts", default="0,8", help="the step's input: 0 = bf16 output, N = N f32 split-K partials")
    p.add_argument("--fused-splits", default="", help="extra fused variants fused_sK with K splits, e.g. 2,3,8")
    p.add_argument("--fused-stages", default="", help="extra fused variants fused_stN with N blocks in flight (default "
                   "2), and fused_b64_stN with 64-position blocks, e.g. 1,3")
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

    attend = {
        "xla": lambda q, c, pos: attention.decode_attention_ref(q, c[0], c[1], pos, k_scale=c[2], v_scale=c[3]),
        "pallas": lambda q, c, pos: attention.decode_attention_pallas(q, c[0], c[1], pos, k_scale=c[2], v_scale=c[3],
                                                                       interpret=interpret),
        "pallas_s1": lambda q, c, pos: attention.decode_attention_pallas(q, c[0], c[1], pos, k_scale=c[2], v_scale=c[3],
                                                                          splits=1, interpret=interpret),
        "pallas_b64": lambda q, c, pos: attention.decode_attention_pallas(q, c[0], c[1], pos, k_scale=c[2],
                                                                           v_scale=c[3], block_s=64, interpret=interpret),
        "pallas_s4": lambda q, c, pos: attention.decode_attention_pallas(q, c[0], c[1], pos, k_scale=c[2], v_scale=c[3],
                                                                          splits=4, interpret=interpret),
    }

    def step(fused, block_s=None, splits=None, stages=2):
        def fn(x, c, pos, rope):
            kw = dict(heads=H, kv_heads=KVH, dtype=jnp.bfloat16, k_scale_store=c[2], v_scale_store=c[3])
            if fused:
                out = attention.attend_new_tokens_pallas(x, pos, *rope, c[0], c[1], block_s=block_s, splits=splits,
                                                         num_stages=stages, interpret=interpret, **kw)
            else:
                out = attention.attend_new_tokens_ref(x, pos, *rope, c[0], c[1], **kw)
            return out[0], tuple(out[1:])
        return fn

    rows = ["| cache | B | S | position | variant | splits | rel. error | busy µs | span µs | kernels | floor µs | vs xla (span) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def row(cache, B, S, at, name, splits, err, timing, floor_us, base):
        busy, span, kern = timing
        rows.append(f"| {cache} | {B} | {S} | {at} | {name} | {splits} | {err:.1e} | {busy:.1f} | {span:.1f} | {kern:.1f} "
                    f"| {floor_us:.1f} | {base / span:.2f}× |")
        print(rows[-1], flush=True)

    rng = np.random.default_rng(0)
    for int8 in (False, True) if args.int8 else (False,):
        cache = "int8" if int8 else "bf16"
        for B in batches:
            for S in lengths:
                caches = _caches(rng, B, S, args.calls, int8)
                qs = [jnp.asarray(rng.normal(size=(B, 1, H, DH)), jnp.bfloat16) for _ in range(args.calls)]
                default_bs = attention.choose_block(DH, caches[0][0].dtype.itemsize)  # the kernels' default block
                for at in () if args.step_only else (S - 1, S // 4):
                    pos = jnp.full((B, 1), at, jnp.int32)
                    visible = (at + 1) * B * KVH * DH * 2 * (1 if int8 else 2)
                    floor_us = 1e6 * visible / bandwidth if bandwidth else float("nan")
                    ref = np.asarray(attend["xla"](qs[0], caches[0], pos), np.float32)
                    base = None
                    for name, fn in attend.items():
                        err = float(np.abs(np.asarray(fn(qs[0], caches[0], pos), np.float32) - ref).max() / np.abs(ref).max())
                        many = jax.jit(lambda qs, cs, pos, fn=fn: [fn(q, c, pos) for q, c in zip(qs, cs)])
                        timing = _timed(many, (qs, caches, pos), args.calls, interpret)
                        base = timing[1] if name == "xla" else base
                        bs = 64 if name.endswith("b64") else default_bs
                        splits = "-" if name == "xla" else 1 if name == "pallas_s1" else 4 if name == "pallas_s4" else \
                            min(attention.choose_splits(B, KVH, S, bs), -(-S // bs))
                        row(cache, B, S, at, name, splits, err, timing, floor_us, base)
                # the whole step, new token at S − 1, caches donated and carried
                at = S - 1
                pos = jnp.full((B, 1), at, jnp.int32)
                rope = model.rope_tables(pos, model.rope_inv_freq(model.LlamaConfig(
                    vocab_size=8, hidden_size=H * DH, intermediate_size=8, num_hidden_layers=1, num_attention_heads=H,
                    num_key_value_heads=KVH, head_dim=DH, rope_theta=500000.0)))
                floor_us = 1e6 * (at + 1) * B * KVH * DH * 2 * (1 if int8 else 2) / bandwidth if bandwidth else float("nan")
                for parts in [int(p) for p in args.parts.split(",")]:
                    shape = (parts, B, 1, W) if parts else (B, 1, W)
                    xs = [jnp.asarray(rng.normal(size=shape) / (parts or 1), jnp.float32 if parts else jnp.bfloat16)
                          for _ in range(args.calls)]
                    ref = np.asarray(step(False)(xs[0], caches[0], pos, rope)[0], np.float32)
                    base = None
                    extra = [(f"fused_s{k}", True, None, int(k), 2) for k in args.fused_splits.split(",") if k]
                    extra += [(f"fused{b}_st{n}", True, block, None, int(n)) for n in args.fused_stages.split(",") if n
                              for b, block in (("", None), ("_b64", 64))]
                    for name, fused, block_s, splits, stages in (("xla_step", False, None, None, 2),
                                                                 ("fused", True, None, None, 2),
                                                                 ("fused_b64", True, 64, None, 2), *extra):
                        fn = step(fused, block_s, splits, stages)
                        err = float(np.abs(np.asarray(fn(xs[0], caches[0], pos, rope)[0], np.float32) - ref).max()
                                    / np.abs(ref).max())
                        def calls(xs, pos, rope, cs, fn=fn):  # → (outputs, the updated caches, fed back)
                            outs = [fn(x, c, pos, rope) for x, c in zip(xs, cs)]
                            return [o[0] for o in outs], [o[1] for o in outs]

                        carried = [tuple(jnp.copy(a) if a is not None else None for a in c) for c in caches]
                        timing = _timed(jax.jit(calls, donate_argnums=3), (xs, pos, rope), args.calls, interpret,
                                        carry=carried)
                        base = timing[1] if not fused else base
                        bs = block_s or default_bs
                        row(cache, B, S, at, name + (f"_p{parts}" if parts else ""), "-" if not fused else
                            min(splits or attention.choose_splits(B, KVH, S, bs), -(-S // bs)), err, timing, floor_us,
                            base)
    table = head + (f", copy bandwidth {bandwidth / 1e12:.2f} TB/s" if bandwidth else "") + "\n\n" + "\n".join(rows) + "\n"
    if args.out:
        pathlib.Path(args.out).write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
