"""End-to-end generation speed of a Llama-3-8B-shaped model with random weights (nothing downloaded).

    python benchmarks/bench_generate.py --out benchmarks/results/generate_bf16.md     # GPU
    python benchmarks/bench_generate.py --small --out /tmp/generate_small.md          # CPU smoke run

Measures, for each weight variant (`--variants`, default bf16 with stacked and with unstacked layers):
- prefill: one `forward_step` over a 2048-token prompt (batch 1) into an empty KV cache → tokens/s;
- decode: `mixjax.generate`'s compiled prefill + `lax.while_loop` for batch 1/8/32, 128-token prompts,
  256 greedy new tokens, no EOS stop; the prefill of the same batch is timed separately and subtracted,
  so decode tokens/s = batch · new tokens / (generate time − prefill time).
Every program is compiled and run once before timing (warm-up); the median of `--repeats` runs is
reported. The device and jax version head the table. Prefill also reports TFLOP/s (2 · matmul params ·
tokens); decode reports % of the weight-read floor: batch / (bytes of all params / measured
device-to-device copy bandwidth) tokens/s, i.e. every step reads every weight once (KV cache ignored). A variant maps the float params to the params
it runs (e.g. a quantizer); add one entry to VARIANTS.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from mixjax import model  # noqa: E402
from mixjax.config import LlamaConfig, RopeScaling  # noqa: E402
from mixjax.generate import SamplingConfig, _bucket, _generate_jit  # noqa: E402

LLAMA3_8B = LlamaConfig(
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=500000.0,
    rope_scaling=RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                             original_max_position_embeddings=8192),
    max_position_embeddings=8192, tie_word_embeddings=False,
)
SMALL = LlamaConfig(
    vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=32, max_position_embeddings=4096,
)

# name → function(float params, cfg) → params to run. Quantized variants register here.
VARIANTS: dict[str, Callable] = {
    "bf16": lambda params, cfg: params,  # stacked layers, lax.scan
    "bf16-unstacked": lambda params, cfg: model.unstack_layers(params),  # tuple of layers, Python loop
}


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of fn() (results blocked on), after one warm-up call that also compiles."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def copy_bandwidth(nbytes: int, repeats: int) -> float:
    """Bytes/s of a device-to-device copy (read + write counted) of an nbytes buffer."""
    x = jnp.zeros((nbytes // 4,), jnp.float32)
    copy = jax.jit(lambda a: a + 1.0)
    return 2 * x.nbytes / median_seconds(lambda: copy(x), repeats)


def tree_bytes(tree) -> int:
    return sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(tree))


def matmul_params(cfg: LlamaConfig) -> int:
    """Weights multiplied per token: decoder linears and the LM head (embedding lookup excluded)."""
    D, F, L, V = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    return L * (D * q + 2 * D * kv + q * D + 3 * D * F) + V * D


def prefill_seconds(params, cfg: LlamaConfig, batch: int, length: int, max_len: int, repeats: int,
                    implementation: str) -> float:
    """Median time of one forward_step of [batch, length] tokens into an empty cache of max_len positions
    (in the layers' form and dtype, as `generate` builds it)."""
    stacked = not isinstance(params["layers"], (tuple, list))
    dtype = params["embed_tokens"].dtype
    step = jax.jit(lambda p, t: model.forward_step(
        p, t, cfg, model.init_cache(cfg, batch, max_len, dtype, stacked=stacked), implementation=implementation))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, length)), jnp.int32)
    return median_seconds(lambda: step(params, tokens), repeats)


def generate_seconds(params, cfg: LlamaConfig, batch: int, prompt_len: int, new_tokens: int, repeats: int,
                     implementation: str) -> float:
    """Median time of the compiled generate (prefill + greedy decode loop of new_tokens steps)."""
    prompts = jnp.asarray(np.random.default_rng(1).integers(0, cfg.vocab_size, (batch, prompt_len)), jnp.int32)
    lengths = jnp.full((batch,), prompt_len, jnp.int32)
    dtype = params["embed_tokens"].dtype

    def run():
        out, steps = _generate_jit(params, prompts, lengths, jax.random.key(0), cfg=cfg,
                                   max_new_tokens=new_tokens, sampling=SamplingConfig(), eos=(),
                                   implementation=implementation, cache_dtype=dtype, on_token=None)
        return out

    return median_seconds(run, repeats)


def bench_variant(name: str, params, cfg: LlamaConfig, args, bandwidth: float) -> list[dict]:
    rows = []
    floor_s = tree_bytes(params) / bandwidth  # one decode step reads every weight once
    t = prefill_seconds(params, cfg, 1, args.prefill_len, args.prefill_len, args.repeats, args.implementation)
    rows.append(dict(variant=name, phase="prefill", batch=1, tokens=args.prefill_len, seconds=t,
                     tok_s=args.prefill_len / t, ms_per_step=float("nan"),
                     tflops=2 * matmul_params(cfg) * args.prefill_len / t / 1e12, floor=float("nan")))
    print(f"  {name} prefill {args.prefill_len}: {rows[-1]['tok_s']:.1f} tok/s", flush=True)
    for batch in args.batches:
        max_len = _bucket(args.prompt_len) + args.new_tokens  # the cache generate builds
        t_prefill = prefill_seconds(params, cfg, batch, args.prompt_len, max_len, args.repeats, args.implementation)
        t_total = generate_seconds(params, cfg, batch, args.prompt_len, args.new_tokens, args.repeats,
                                   args.implementation)
        t_decode = max(t_total - t_prefill, 1e-9)
        rows.append(dict(variant=name, phase="decode", batch=batch, tokens=batch * args.new_tokens, seconds=t_decode,
                         tok_s=batch * args.new_tokens / t_decode, ms_per_step=1e3 * t_decode / args.new_tokens,
                         tflops=float("nan"), floor=100 * floor_s * args.new_tokens / t_decode))
        print(f"  {name} decode batch {batch}: {rows[-1]['tok_s']:.1f} tok/s", flush=True)
    return rows


def _fmt(x: float, spec: str) -> str:
    return "" if np.isnan(x) else format(x, spec)


def markdown(rows: list[dict], cfg_name: str, args, bandwidth: float) -> str:
    dev = jax.devices()[0]
    lines = [
        f"# Generation speed, {cfg_name}, random weights ({datetime.date.today().isoformat()})",
        "",
        f"device: {dev.device_kind} ({dev.platform}), jax {jax.__version__}, implementation={args.implementation}; "
        f"median of {args.repeats} runs after warm-up. Prefill: batch 1 × {args.prefill_len} tokens. "
        f"Decode: {args.prompt_len}-token prompts, {args.new_tokens} greedy new tokens, prefill subtracted. "
        f"Copy bandwidth {bandwidth / 1e9:.0f} GB/s.",
        "",
        "| variant | phase | batch | tokens | seconds | tokens/s | ms/step | TFLOP/s | % of weight-read floor |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['phase']} | {r['batch']} | {r['tokens']} | {r['seconds']:.4f} | "
                     f"{r['tok_s']:.1f} | {_fmt(r['ms_per_step'], '.2f')} | {_fmt(r['tflops'], '.1f')} | "
                     f"{_fmt(r['floor'], '.0f')} |")
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", default="bf16,bf16-unstacked", help=f"comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument("--small", action="store_true", help="a tiny model and short runs (CPU smoke test)")
    p.add_argument("--out", default=None, help="write the markdown table here")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--prefill-len", type=int, default=2048)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--implementation", default="auto", choices=("auto", "xla", "pallas"))
    args = p.parse_args(argv)
    args.batches = [int(b) for b in args.batches.split(",")]
    args.variants = args.variants.split(",")
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    if args.small:
        args.prefill_len, args.prompt_len, args.new_tokens = min(args.prefill_len, 256), min(args.prompt_len, 32), min(args.new_tokens, 16)
        args.repeats = min(args.repeats, 2)
    if args.out and os.path.dirname(args.out) and not os.path.isdir(os.path.dirname(args.out)):
        p.error(f"--out {args.out}: directory {os.path.dirname(args.out)} does not exist")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg, cfg_name = (SMALL, "small test model") if args.small else (LLAMA3_8B, "Llama-3-8B shape")
    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}: building {cfg_name} in bf16", flush=True)
    params = model.init_params(cfg, jax.random.key(0), jnp.bfloat16)
    bandwidth = copy_bandwidth(16 << 20 if args.small else 1 << 30, args.repeats)
    rows = []
    for name in args.variants:
        rows += bench_variant(name, VARIANTS[name](params, cfg), cfg, args, bandwidth)
    table = markdown(rows, cfg_name, args, bandwidth)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
