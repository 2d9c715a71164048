"""The fused decode attention step (`attend_new_tokens_pallas`) at the model's b32 shapes, for Nsight Compute.

    ncu --kernel-name regex:attend_new --launch-skip 2 --launch-count 1 --set full \
        python3 benchmarks/ncu_attention.py --batch 32 --int8

Llama-3-8B heads (32 query, 8 KV, head dim 128), one new token a row at position --pos of a --cache-positions
cache, the q/k/v projection's --parts split-K partials as input and o_proj's codes as output (`codes=True`), as
the decode step runs it. Three launches, so ncu can skip the compiling ones and profile a warm one.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from mixjax import model  # noqa: E402
from pallas_kernels import attention  # noqa: E402
from pallas_kernels.format import RowRms  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--cache-positions", type=int, default=384)
    p.add_argument("--pos", type=int, default=256, help="the new token's position (the cache holds pos + 1)")
    p.add_argument("--parts", type=int, default=4, help="split-K partials of the q/k/v projection")
    p.add_argument("--int8", action="store_true", help="an int8 KV cache (per-position scales)")
    p.add_argument("--set", default="", help="attend_new_tokens_pallas overrides, e.g. block_s=64,num_stages=3")
    p.add_argument("--launches", type=int, default=3)
    args = p.parse_args(argv)

    B, H, KVH, Dh, S = args.batch, 32, 8, 128, args.cache_positions
    rng = np.random.default_rng(0)
    W = (H + 2 * KVH) * Dh
    qkv = jnp.asarray(rng.normal(size=(args.parts, B, 1, W)), jnp.float32)
    if args.int8:
        k, v = (jnp.asarray(rng.integers(-127, 128, (B, KVH, S, Dh)), jnp.int8) for _ in range(2))
        ks, vs = (jnp.asarray(rng.uniform(0.002, 0.03, (B, KVH, S)), jnp.float32) for _ in range(2))
    else:
        k, v = (jnp.asarray(rng.normal(size=(B, KVH, S, Dh)), jnp.bfloat16) for _ in range(2))
        ks = vs = None
    pos = jnp.full((B, 1), args.pos, jnp.int32)
    cos, sin = model.rope_tables(pos, (1.0 / 500000 ** (np.arange(0, Dh, 2) / Dh)).astype(np.float32))
    rms = RowRms(jnp.asarray(rng.uniform(50, 400, size=(B, 3)), jnp.float32), 4096, 1e-5)
    over = {}
    for kv in filter(None, args.set.split(",")):
        key, value = kv.split("=")
        over[key] = int(value)

    step = jax.jit(lambda qkv, k, v, ks, vs: attention.attend_new_tokens_pallas(
        qkv, pos, cos, sin, k, v, heads=H, kv_heads=KVH, dtype=jnp.bfloat16, k_scale_store=ks, v_scale_store=vs,
        rms=rms, codes=True, interpret=jax.default_backend() == "cpu", **over))  # (CPU: a smoke run)
    for _ in range(args.launches):
        out = step(qkv, k, v, ks, vs)
    jax.block_until_ready(out)
    print(f"attend_new_tokens: B {B}, cache {S} ({'int8' if args.int8 else 'bf16'}), position {args.pos}, "
          f"{args.parts} partials, {args.launches} launches")


if __name__ == "__main__":
    main()
