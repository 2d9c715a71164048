"""End-to-end generation speed of a Llama-3-8B-shaped model with random weights: bf16 vs W4.4A8 vs W8A8.

    python benchmarks/bench_generate.py --out benchmarks/results/generation.md        # GPU, < 8 min on an H100
    python benchmarks/bench_generate.py --full-quant --budget-s 1500 --out ...        # + mixjax.quantize timing
    python benchmarks/bench_generate.py --small --out /tmp/generate_small.md          # CPU smoke run
    python benchmarks/bench_generate.py --shape qwen3-8b ...                          # Qwen3-8B's shape instead
    python benchmarks/bench_generate.py --shape smollm3-3b ...                        # or SmolLM3-3B's
    python benchmarks/bench_generate.py --shape gemma3-4b ...                         # or Gemma-3-4B's
    python benchmarks/bench_generate.py --shape gemma2-9b ...                         # or Gemma-2-9B's

Variants (`--variants`, default bf16,w4.4a8,w8a8; every one with unstacked layers, the fast form on GPU):
- bf16: random bf16 weights (std 0.02), built layer by layer.
- w4.4a8 / w8a8: decoder linears as `pallas_kernels.MixedWeight` (int4 asym / int8 sym groups of 128,
  int8 activations per (token, group of 128)); embeddings, norms and lm_head stay bf16.
  Default (speed only): each linear type's random weight is RTN-packed once by `pallas_kernels.pack_rtn`
  with a random 8-bit channel mask of 10 % of its channels (= 10 % of its elements: W4.4) or all channels
  (W8A8), and every layer gets its own device copy (distinct buffers, so nothing stays cached in L2).
  `--full-quant`: the whole `mixjax.quantize` pipeline (salience, global allocation, GPTQ, clipping) on
  random calibration tokens (`--calib-samples` × `--calib-len`); its wall time and the peak device memory
  reached during quantization are reported (issue 4's "8B-shaped quantization ≤ 5 min on one H100";
  `benchmarks/quant_speed.py` measures that alone). Real allocations give every layer its own 8-bit
  channel count, hence more distinct kernel shapes to compile than the quick path: give it a larger budget.
- bf16-stacked: the float layers stacked for `lax.scan` (not in the default list).
- `NAME@STRATEGY`: a quantized variant with the M ≤ 32 launch strategy STRATEGY of `kernels.DECODE_STRATEGIES`,
  or `@xq` (the activations of every quantized linear quantized by XLA ops, which XLA may fuse into the
  norm or SiLU·mul before them, instead of a Pallas launch or the GEMV's in-program quantization),
  or `@gemv_2l` (the M = 1 GEMV on codes from the quantization kernel, two launches a linear: the session-6
  default; the default since session 8 is one launch), or `@normq` (the norms before mixed linears emit
  their int8 codes at decode in one launch per row, `model.NORM_QUANT = "auto"` with
  `NORM_QUANT_CHUNK_GROUPS = None`: measured 1–2 % slower in session 11; `@normq2`: the same in two launches
  over (row, 2-group chunk), `NORM_QUANT_CHUNK_GROUPS = 2`, the default since session 13) or
  `@nq` (plain norms), or `@attn` (decode steps run
  RoPE, the cache write and attention in one Pallas launch on the q/k/v projection's output,
  `model.ATTENTION = "auto"`; any variant, bf16 too) or `@attnu` (the attention-only kernel after XLA's RoPE
  and cache write, `model.ATTENTION_FUSED = False`) or `@xattn` (XLA's attention), or `@swq` (SwiGLU hands
  down_proj int8 codes, `model.SWIGLU_QUANT = "auto"`) or `@xswiglu` (XLA's fusion); strategies chain
  (`w4.4a8@xattn@nq+h4`). Since session 13 the model's defaults are `@attn@normq2@swq`; `@plain` turns all
  three off (`bf16@plain` is XLA's bf16 step: when run, the ratios are against it); `@s13`: session 13's
  attention splits (only past 4 blocks a split) and GEMV without prefetch, for attributing session 14's;
  `@nodefer`: down_proj's partials summed into the residual by XLA (`model.DEFER_DOWN = False`); `@ngemv`:
  the GEMVs after a norm normalize and quantize their own groups (`model.NORM_IN_GEMV = "auto"`); `@pdl` /
  `@pdlw`: our kernels emit programmatic-dependent-launch instructions (`pallas_kernels.pdl`; run with
  XLA_FLAGS=--xla_gpu_enable_pdl=true), `@pdlw` with the GEMV's wait after its first weight loads;
  `@magic` / `@magicfma`: the prefill GEMM's int32 partials reach f32 without the int→float conversion
  (`MgpuConfig.convert`); `@pswiglu`: at prefill SwiGLU hands down_proj int8 codes (`model.PREFILL_CODES =
  "auto"`); `@pcodes`: the norms as well (`"all"`, the default since session 21); `@nopcodes`: neither (`"never"`); `@wide`:
  the prefill GEMM's default 128 × 128 CTAs at every M (no `mgpu.pick_config`); `@swbR`: the blocked SwiGLU
  at prefill covers R rows a program (`swiglu.BLOCK_ROWS`, 8–64); `@pint8`: the quantized linears also hold
  their weights as int8 for the prefill GEMM (`model.int8_prefill`, one more byte a weight); `@qrR`: the prefill
  GEMM's activation quantization takes R rows a program (`mgpu.QUANT_ROWS`, 8–128); `@norm2l`: the decode norms
before q/k/v and gate/up in their two-launch form (`model.NORM_DEFER_RMS = "never"`, the default before session
22; since then one launch hands the codes of w·s and the attention and SwiGLU kernels apply the row's rsqrt);
`@xunpack`: the prefill GEMM's int4 → int8 unpack as one XLA pass (`mgpu.UNPACK = "xla"`, the default before
session 23; since then a Pallas kernel, `pallas_kernels/unpack.py`); `@scatterkv` / `@kvt`: a chunk's keys and values go
into the cache by XLA's scatter in the tokens' order (before session 23) or by the scatter in the store's order
(the default since; `model.CACHE_WRITE` = "scatter", "scatter_t"), any variant; `@wg3`: the prefill GEMM takes
`mgpu.THREE_WG_CONFIG`'s 192-row CTAs where `pick_config`'s estimate prefers them (`mgpu.THREE_WGS = True`);
`@ptok`: one activation scale a row in the prefill GEMMs (`mgpu.PREFILL_ACT_SCALE = "token"`; decode per group;
the norms and SwiGLU hand those GEMMs codes with one scale a row since session 28, `@ptok@nopcodes` leaves them out);
`@psel`: one activation scale a row in o_proj's and gate/up's prefill GEMMs only (`PREFILL_ACT_SCALE = "selective"`);
`@static`: static activation scales, one per input group calibrated ahead (`pallas_kernels.static`: codes by XLA ops,
at prefill the scales folded into the weight's and the GEMM's per-token rescale; the static-vs-dynamic ablation's speed);
`@short`: linears of 65–512 rows take the swapped-operand kernel in column tiles (`api.MGPU_SHORT_M = (65, 512)`,
the packed weight unpacked in registers, no int8 copy; `@shortf` with its zero-point terms folded out, `@short64` in
column tiles of 64 rows instead of 128);
`@pf3` / `@pf3s2` / `@pf3s4`: the decode tiles' small per-group operands
loaded two iterations ahead (`GemmConfig.prefetch_meta=3`), with the default 3, or 2 or 4 pipeline stages (`@pf3l`:
only where a program loops over 8 groups or more); `@wave` / `@programs`: the decode tiles' split-K from one wave of resident
programs (the default since session 33) or from about 1024 programs (before; `kernels.DECODE_SPLIT_RULE`); `@pf3down`: at M = 17–32 the linears of ≥ 64 K groups
(down_proj) with `prefetch_meta=3` and the split that fits its 3 programs an SM (session 33: −7 % on that GEMM; the
default since session 35, `kernels.PF3_MIN_GROUPS`, so `@pf3down` repeats it and `@nopf3` turns it off); `@noattcodes`:
o_proj quantizes the attention's output itself (the default since session 36 at one split: the attention kernel's
epilogue hands it the codes, `model.ATTENTION_CODES`); `@att1`: the decode attention in one split at every batch and cache length
(session 36 measured it at b8, which now takes one split on caches of ≤ 512 positions); `@attlive`: the codes
epilogue on the live rows only (measured in session 36, the default since, so it repeats the default); `@att64` / `@att64s3` / `@att128s3` / `@att128`: the fused decode attention with
64- or 128-position blocks and 2 or 3 blocks in flight (`attend_new_tokens_pallas(block_s=, num_stages=)`; default 128 × 2
on a float cache, 64 × 3 on an int8 one since session 38, `attention.fused_block_stages`);
`@tiled` / `@tiled4` / `@rowmajor`: the decoder layers' and the head's codes in blocks of 64 rows × 1 / × 4 K groups
(`fuse_projections(tile=True)`, `model.TILED_CODES`, `format.TILE_GROUPS`) or in the stored row-major order (session
38: tiled one group a block is the GPU default, so `@tiled` repeats it); `@n{32,128}w{2,4,8}x{1,2,h}m{16,32}`: the
decode tiles (M = 3–32) at 32 or 128 weight rows a program, with 2–8 warps and split-K ×1 / ×2 / ÷2 the default's, on
every decode tile (m16) or the 32-row ones only (m32; session 39); `@vrow`: an int8 cache's values position-major
(`model.INT8_V_BLOCK = False`, the order before session 42; since then in blocks of 64 positions, `KVCache.v_block`);
`NAME+h4` / `+h8`: the
  embedding table and LM head quantized too (`w4.4a8@gemv_2l+h4`).
- `A<B` (quote it in a shell): progressive precision, `mixjax.generate(A's params, prefill_params=B's)`: variant B
  runs the prompt (and the first `--switch-after` decoded tokens), A the rest, both resident; only `--request` is
  measured for it (its prefill and decode rows are B's and A's). Strategies of both names apply.

Each variant runs in its own subprocess, one after the other: the device's peak-memory counter then
belongs to that variant, an out-of-memory or a kernel failure costs only that variant (reported, then
the next one runs), and a per-variant deadline keeps the whole run within `--budget-s` (measurements
finished before a deadline are kept). Inside a variant, in this order:
- decode: `mixjax.generate`'s compiled decode loop (`lax.while_loop` of one-token steps, greedy, no EOS
  stop) for `--new-tokens` steps from a cache already holding a `--prompt-len` prompt (the cache contents do
  not change the work), batch 1, 32, then 8 → tokens/s = batch · new tokens / time;
- prefill: one `forward_step` of batch 1 × `--prefill-len` tokens into an empty cache, LM head at the last
  token only (as `generate` prefills) → tokens/s and TFLOP/s (2 · multiplied weights · tokens);
- request (`--request P:N`): one whole `mixjax.generate` call as a user makes it (random P-token prompt, batch 1,
  greedy, N new tokens, no EOS stop): prefill, first token and the decode loop in one jit, the params handed over
  once → seconds a request and new tokens per second of it. `--request-as fixed1,eos8,stream8`: one request each,
  all in the variant's one process: `fixed` with no EOS id (XLA knows the loop's trip count), `eos` with an EOS id
  the request never emits (the loop's end depends on the data, as a user's request does), `stream` the same
  streamed to the host as `mixjax generate` streams (on_token); the number is `sync_every`, the decode steps
  between host round trips (8 is the default on a GPU).
Every program is compiled and run once before timing (compile time printed); the median of `--repeats` runs
is reported (of at least 7 for prefill, whose blocked wall time varied by up to 15 % over two runs in session
20; prefill also reports the time a call when calls queue back to back, and the params' dispatch cost). Decode also reports % of the weight-read floor: batch · copy bandwidth / params bytes
tokens/s (every step reads every weight once; KV cache ignored). The device and jax version head the table.

`--tensor-parallel N` splits every variant's model over N local devices (`mixjax.shard_model`: heads and MLP
features, o_proj and down_proj outputs psum'd); decode and prefill then run under `shard_map` with each device's
share of the cache, and the floor divides the weight bytes by N (each device reads its share).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import importlib
import json
import os
import re
import statistics
import subprocess
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from mixjax import model  # noqa: E402
from mixjax.config import LlamaConfig, RopeScaling  # noqa: E402
from mixjax.generate import SamplerState, SamplingConfig, _bucket, _decode_loop, _emit  # noqa: E402

LLAMA3_8B = LlamaConfig(
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=500000.0,
    rope_scaling=RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                             original_max_position_embeddings=8192),
    max_position_embeddings=8192, tie_word_embeddings=False,
)
QWEN3_8B = LlamaConfig(  # Qwen3-8B's config.json: query/key head norms, no q/k/v biases, 36 layers
    vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
    num_attention_heads=32, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-6, rope_theta=1000000.0,
    max_position_embeddings=40960, tie_word_embeddings=False, model_type="qwen3", qk_norm=True,
)
SMOLLM3_3B = LlamaConfig(  # SmolLM3-3B's config.json: every fourth layer without RoPE, tied embeddings
    vocab_size=128256, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
    num_attention_heads=16, num_key_value_heads=4, head_dim=128, rms_norm_eps=1e-6, rope_theta=5000000.0,
    max_position_embeddings=65536, tie_word_embeddings=True, model_type="smollm3",
    nope_layers=tuple(range(3, 36, 4)),
)
GEMMA3_4B = LlamaConfig(  # gemma-3-4b's text model: heads of 256, a window of 1024 on five layers of six (RoPE base
    # 1e4 there, 1e6 × linear 8 on the global ones), sandwich norms, GeGLU, scaled embeddings, a tied 262k vocabulary
    vocab_size=262208, hidden_size=2560, intermediate_size=10240, num_hidden_layers=34,
    num_attention_heads=8, num_key_value_heads=4, head_dim=256, rms_norm_eps=1e-6, rope_theta=1000000.0,
    rope_scaling=RopeScaling(8.0, rope_type="linear"), max_position_embeddings=131072, tie_word_embeddings=True,
    model_type="gemma3_text", qk_norm=True, mlp_act="gelu_tanh", embed_scale=2560 ** 0.5, sandwich_norms=True,
    sliding_window=1024, global_layers=tuple(range(5, 34, 6)), rope_local_theta=10000.0,
)
GEMMA2_9B = LlamaConfig(  # gemma-2-9b: heads of 256, a window of 4096 on every other layer, soft-capped attention
    # scores (50) and logits (30), sandwich norms, GeGLU, scaled embeddings, a tied 256k vocabulary
    vocab_size=256000, hidden_size=3584, intermediate_size=14336, num_hidden_layers=42,
    num_attention_heads=16, num_key_value_heads=8, head_dim=256, rms_norm_eps=1e-6, rope_theta=10000.0,
    max_position_embeddings=8192, tie_word_embeddings=True, model_type="gemma2", mlp_act="gelu_tanh",
    embed_scale=3584 ** 0.5, sandwich_norms=True, sliding_window=4096, global_layers=tuple(range(1, 42, 2)),
    attn_logit_softcap=50.0, final_logit_softcap=30.0,
)
SHAPES = {"llama3-8b": LLAMA3_8B, "qwen3-8b": QWEN3_8B, "smollm3-3b": SMOLLM3_3B, "gemma3-4b": GEMMA3_4B,
          "gemma2-9b": GEMMA2_9B}
SMALL = LlamaConfig(  # K = 256 for every linear: two groups of 128 each, so a quantized model splits over 2 devices
    vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=8,
    num_key_value_heads=2, head_dim=32, max_position_embeddings=4096,
)
VARIANTS = ("bf16", "w4.4a8", "w8a8", "bf16-stacked")
QUANT_BITS = {"w4.4a8": 4.4, "w8a8": 8.0}
RESULT = "RESULT "  # prefix of the JSON lines a variant's subprocess reports on stdout


# ----------------------------------------------------------------------------------------------------
# Building the variants' params (layer by layer: the peak memory is the params, not a float copy of them)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _normal(key, shape, dtype):
    return (jax.random.normal(key, shape, jnp.float32) * 0.02).astype(dtype)


def _linear_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, int]]:
    shapes = model.param_shapes(cfg)["layers"]
    return {name: model.get_path(shapes, name)["weight"][1:] for name in model.LINEAR_NAMES}


def _layer(cfg: LlamaConfig, weights: dict) -> dict:
    """One decoder layer's dict from {linear name: weight leaf} (norms at 1, biases at 0 if any)."""
    D = cfg.hidden_size
    layer = {"input_layernorm": jnp.ones((D,), jnp.bfloat16), "post_attention_layernorm": jnp.ones((D,), jnp.bfloat16)}
    if cfg.qk_norm:
        layer.update(q_norm=jnp.ones((cfg.head_dim,), jnp.bfloat16), k_norm=jnp.ones((cfg.head_dim,), jnp.bfloat16))
    if cfg.sandwich_norms:  # Gemma 3
        layer.update(attn_output_norm=jnp.ones((D,), jnp.bfloat16), mlp_output_norm=jnp.ones((D,), jnp.bfloat16))
    for name, w in weights.items():
        group, proj = name.split(".")
        entry = {"weight": w}
        if cfg.attention_bias and name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            entry["bias"] = jnp.zeros((w.shape[0],), jnp.bfloat16)
        layer.setdefault(group, {})[proj] = entry
    return layer


def _outer(cfg: LlamaConfig, key) -> dict:
    k1, k2 = jax.random.split(key)
    out = {"embed_tokens": _normal(k1, (cfg.vocab_size, cfg.hidden_size), jnp.bfloat16),
           "norm": jnp.ones((cfg.hidden_size,), jnp.bfloat16)}
    if not cfg.tie_word_embeddings:
        out["lm_head"] = _normal(k2, (cfg.vocab_size, cfg.hidden_size), jnp.bfloat16)
    return out


def build_bf16(cfg: LlamaConfig, seed: int = 0) -> dict:
    shapes = _linear_shapes(cfg)
    layers = []
    for i in range(cfg.num_hidden_layers):
        keys = jax.random.split(jax.random.key(seed * 1000 + i + 1), len(shapes))
        layers.append(_layer(cfg, {n: _normal(k, shapes[n], jnp.bfloat16) for k, n in zip(keys, shapes)}))
    return {**_outer(cfg, jax.random.key(seed)), "layers": tuple(layers)}


def build_rtn(cfg: LlamaConfig, int8_fraction: float, seed: int = 0) -> dict:
    """Quick MixedWeight params: one pack_rtn per linear type (random 8-bit channel mask), copied per layer."""
    from pallas_kernels import pack_rtn

    rng = np.random.default_rng(seed)
    templates = {}
    for i, (name, (n, k)) in enumerate(_linear_shapes(cfg).items()):
        w = np.asarray(_normal(jax.random.key(seed * 1000 + 500 + i), (n, k), jnp.float32))
        is_int8 = np.zeros(n, bool)
        is_int8[rng.choice(n, int(round(int8_fraction * n)), replace=False)] = True
        templates[name] = pack_rtn(w, is_int8)
    layers = tuple(_layer(cfg, {n: jax.tree.map(jnp.copy, t) for n, t in templates.items()})
                   for _ in range(cfg.num_hidden_layers))
    return {**_outer(cfg, jax.random.key(seed)), "layers": layers}


def build_full_quant(cfg: LlamaConfig, bits: float, args, log: Callable) -> dict:
    """The mixjax.quantize pipeline on random calibration tokens; logs its wall time and peak memory."""
    from mixjax.quant import QuantConfig, quantize

    params = model.init_params(cfg, jax.random.key(0), jnp.bfloat16)
    rng = np.random.default_rng(2)
    calib = [rng.integers(0, cfg.vocab_size, (1, args.calib_len)).astype(np.int32) for _ in range(args.calib_samples)]
    jax.block_until_ready(params)
    start = time.perf_counter()
    qparams = quantize(params, calib, cfg, config=QuantConfig(bits=bits))
    jax.block_until_ready(qparams)
    seconds = time.perf_counter() - start
    del params
    log(dict(kind="quantize", seconds=seconds, peak_bytes=peak_bytes(), calib=f"{args.calib_samples}x{args.calib_len}"))
    return qparams


def split_variant(name: str) -> tuple[str, str | None, int | None]:
    """"w4.4a8@fused_partials+h4" → ("w4.4a8", "fused_partials", 4): base, strategies ("a@b" when chained),
    head bits."""
    base, head = (name.split("+h") + [None])[:2]
    base, *strategies = base.split("@")
    return base, "@".join(strategies) or None, None if head is None else int(head)


def variant_parts(name: str) -> tuple[str, str | None]:
    """"w4.4a8+h4<w8a8+h8" → ("w4.4a8+h4", "w8a8+h8"): the decoding variant and the one that runs the prompt
    (None: the same)."""
    decode_name, _, prompt_name = name.partition("<")
    return decode_name, prompt_name or None


def build_variant(name: str, cfg: LlamaConfig, args, log: Callable) -> dict:
    base, _, head_bits = split_variant(name)
    params = _build_base(base, cfg, args, log)
    if head_bits:  # RTN, every row of the embedding table and the LM head at head_bits
        from mixjax.quant.api import quantize_head

        params = {**params, **quantize_head(params, cfg, bits=head_bits)}
    if "static" in (split_variant(name)[1] or "").split("@"):
        params = with_static_scales(params)
    if args.fuse and args.tensor_parallel == 1:  # layer by layer, so the unfused copy of only one layer is alive
        # at a time (tensor parallel: `shard_model` fuses each device's share)
        stacked = not isinstance(params["layers"], (tuple, list))
        if stacked:
            return model.fuse_projections(params)
        layers = list(params.pop("layers"))
        for i in range(len(layers)):
            layers[i] = model.fuse_projections({"layers": (layers[i],)})["layers"][0]
        params["layers"] = tuple(layers)
        if "lm_head" in params:  # the head as `fuse_projections(params)` leaves it (codes tiled on a GPU)
            params["lm_head"] = model.fuse_projections({"layers": (), "lm_head": params["lm_head"]})["lm_head"]
    if "pint8" in (split_variant(name)[1] or "").split("@"):  # after fusing, as `generate_text` does
        params = model.int8_prefill(params)
    return params


def with_static_scales(params: dict) -> dict:
    """`@static`: every decoder `MixedWeight` behind static activation scales (`pallas_kernels.static_weight`), one
    maximum per input group shared by the linears of one input (so q/k/v and gate/up still fuse). The value (4.0)
    does not change the work: only speed is measured."""
    from pallas_kernels import MixedWeight, static_weight

    def wrap(w):
        return static_weight(w, jnp.full((w.num_groups,), 4.0, jnp.float32)) if isinstance(w, MixedWeight) else w

    return {**params, "layers": jax.tree.map(wrap, params["layers"], is_leaf=lambda x: isinstance(x, MixedWeight))}


def _build_base(name: str, cfg: LlamaConfig, args, log: Callable) -> dict:
    if name == "bf16":
        return build_bf16(cfg)
    if name == "bf16-stacked":
        return model.init_params(cfg, jax.random.key(0), jnp.bfloat16)
    if args.full_quant:
        return build_full_quant(cfg, QUANT_BITS[name], args, log)
    return build_rtn(cfg, 0.1 if name == "w4.4a8" else 1.0)


# ----------------------------------------------------------------------------------------------------
# Measurements


def timed(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    """(median wall seconds of fn() with results blocked on, seconds of the first call incl. compile)."""
    start = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times), first


def pipelined(fn: Callable[[], object], calls: int) -> float:
    """Seconds per call of `calls` calls of fn() dispatched back to back, blocked on once at the end."""
    jax.block_until_ready(fn())
    start = time.perf_counter()
    results = [fn() for _ in range(calls)]
    jax.block_until_ready(results)
    return (time.perf_counter() - start) / calls


def copy_bandwidth(nbytes: int, repeats: int) -> float:
    """Bytes/s of a device-to-device copy (read + write counted) of an nbytes buffer."""
    x = jnp.zeros((nbytes // 4,), jnp.float32)
    copy = jax.jit(lambda a: a + 1.0)
    return 2 * x.nbytes / timed(lambda: copy(x), repeats)[0]


def tree_bytes(tree) -> int:
    return sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(tree))


def linear_bytes(params) -> int:
    """Bytes of the decoder linears' weights (fused or not)."""
    layers = params["layers"]
    layers = layers if isinstance(layers, (tuple, list)) else (layers,)
    return sum(tree_bytes(entry["weight"]) for layer in layers for group in ("self_attn", "mlp")
               for entry in layer[group].values())


def peak_bytes() -> int | None:
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def prefill_flops(cfg: LlamaConfig, tokens: int) -> float:
    """2 · multiplied weights · tokens for the decoder linears, plus the LM head at one token."""
    D, F, L, V = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    return 2.0 * (L * (D * q + 2 * D * kv + q * D + 3 * D * F) * tokens + V * D)


def prefill_step(params, cfg: LlamaConfig, args) -> tuple[Callable, jax.Array]:
    """(jitted step(params, tokens), random tokens [1, --prefill-len]): one prefill into an empty cache, the LM
    head at the last token only, as `generate` prefills."""
    stacked = not isinstance(params["layers"], (tuple, list))
    n = args.prefill_len

    def body(p, local_cfg, t):
        cache = model.init_cache(local_cfg, 1, n, args.cache_dtype, stacked=stacked)
        return model.forward_step(p, t, local_cfg, cache, logits_at="last", implementation=args.implementation)

    return _compiled(body, cfg, args), jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (1, n)),
                                                   jnp.int32)


def _compiled(body: Callable, cfg: LlamaConfig, args) -> Callable:
    """jit(body(params, cfg, *rest)) on one device, or under `shard_map` on `args.mesh` (tensor parallel: each
    device runs its `local_config` on its slice of the params)."""
    if args.mesh is None:
        return jax.jit(lambda p, *rest: body(p, cfg, *rest))
    from mixjax.parallel import local_config, tensor_parallel_jit

    local = local_config(cfg, args.mesh.size)
    return tensor_parallel_jit(lambda p, *rest: body(p, local, *rest), args.mesh, 1)


def prefill(params, cfg: LlamaConfig, args) -> dict:
    n = args.prefill_len
    step, tokens = prefill_step(params, cfg, args)
    t, first = timed(lambda: step(params, tokens), max(args.repeats, 7))  # one call is ~50 ms: a steadier median
    row = dict(kind="prefill", batch=1, tokens=n, seconds=t, compile_s=first - t, tok_s=n / t,
               tflops=prefill_flops(cfg, n) / t / 1e12, leaves=len(jax.tree.leaves(params)))
    # Where wall time beyond the device's goes: per call when calls queue back to back (host work hidden
    # behind the device), and one call of a jit that takes the same params and does nothing with them
    # (the per-argument dispatch cost of the params pytree).
    row["pipelined_s"] = pipelined(lambda: step(params, tokens), max(args.repeats, 5))
    touch = jax.jit(lambda p, t: t + 1)
    row["dispatch_s"] = timed(lambda: touch(params, tokens), max(args.repeats, 5))[0]
    if args.profile:  # busy and span against the wall time: a span well under it means host launch gaps
        row["profile"] = _profile(lambda: step(params, tokens), 1, args.profile_top)
    return row


def _profile(run: Callable, steps: int, shown: int) -> dict:
    """Device busy / span ms, kernels and the top kernels per step of `run()` (benchmarks/devtime.py)."""
    import devtime

    dt = devtime.device_times(run, runs=1, top=max(8, shown))
    if "error" in dt:
        return {"error": dt["error"]}
    return {"busy_ms": dt["busy_us"] / steps / 1e3, "span_ms": dt["span_us"] / steps / 1e3,
            "kernels": dt["kernels"] / steps, "shown": shown,
            "top": [(n, us / steps, c / steps) for (n, us), c in zip(dt["top"], dt["top_calls"])]}


def decode(params, cfg: LlamaConfig, batch: int, args, bandwidth: float) -> dict:
    stacked = not isinstance(params["layers"], (tuple, list))
    max_len = model.cache_length(_bucket(args.prompt_len) + args.new_tokens, args.cache_dtype)  # as generate builds
    emit = functools.partial(_emit, sampling=SamplingConfig(), eos=())

    def body(p, local_cfg):  # each device's cache under tensor parallelism: built inside the program
        cache = model.init_cache(local_cfg, batch, max_len, args.cache_dtype, stacked=stacked)
        cache = dataclasses.replace(cache, length=jnp.full((batch,), args.prompt_len, jnp.int32))
        state = SamplerState(step=jnp.int32(0), last=jnp.zeros((batch,), jnp.int32), done=jnp.zeros((batch,), bool),
                             tokens=jnp.zeros((batch, args.new_tokens), jnp.int32), cache=cache,
                             key=jax.random.key(0))
        return _decode_loop(p, state, cfg=local_cfg, max_new_tokens=args.new_tokens, emit=emit,
                            implementation=args.implementation).tokens

    loop = _compiled(body, cfg, args)

    def run():
        return loop(params)

    t, first = timed(run, args.repeats)
    floor_s = (tree_bytes(params) - tree_bytes(params["embed_tokens"])) / bandwidth  # a step reads every weight
    floor_s /= args.tensor_parallel  # (each device its share, at once)
    row = dict(kind="decode", batch=batch, tokens=batch * args.new_tokens, seconds=t, compile_s=first - t,
               tok_s=batch * args.new_tokens / t, ms_per_step=1e3 * t / args.new_tokens,
               floor=100 * floor_s * args.new_tokens / t)
    if args.profile:  # device busy / span per step and kernels per step
        row["profile"] = _profile(run, args.new_tokens, args.profile_top)
    return row


def request(params, cfg: LlamaConfig, args, prefill_params=None, mode: str = "fixed1") -> dict:
    """One `mixjax.generate` call as a user makes it: a random `--request` P-token prompt, batch 1, greedy, N new
    tokens (never stopping early), with `prefill_params` running the prompt and the first `--switch-after` tokens; mode: see
    `--request-as`."""
    from mixjax.generate import generate

    n_prompt, n_new = args.request
    prompt = np.random.default_rng(1).integers(0, cfg.vocab_size, n_prompt).tolist()
    switch = args.switch_after if prefill_params is not None else 0
    how, every = re.fullmatch(r"(fixed|eos|stream)(\d+)", mode).groups()
    kw = dict(max_new_tokens=n_new, cache_dtype=args.cache_dtype, implementation=args.implementation,
              prefill_params=prefill_params, switch_after=switch, sync_every=int(every))
    eos = ()
    if how != "fixed":  # an id the request never emits: it runs to n_new tokens, the loop's end unknown to XLA
        free = set(generate(params, cfg, [prompt], eos_token_ids=(), **kw)[0])
        eos = (next(i for i in range(cfg.vocab_size) if i not in free),)

    def run():
        out = generate(params, cfg, [prompt], eos_token_ids=eos, on_token=(lambda t: None) if how == "stream" else None,
                       **kw)
        if len(out[0]) != n_new:
            raise RuntimeError(f"generate returned {len(out[0])} tokens, expected {n_new}")
        return out

    t, first = timed(run, args.repeats)
    row = dict(kind="request", batch=1, prompt=n_prompt, tokens=n_new, seconds=t, compile_s=first - t,
               tok_s=n_new / t, switch_after=switch, mode=mode)
    if args.profile:  # device busy / span per new token: span − busy is the device's idle time (host stalls)
        row["profile"] = _profile(run, n_new, args.profile_top)
    return row


STRATEGIES = ("gemv_2l", "nq", "normq", "normq2", "attn", "attnu", "xattn", "swq", "xswiglu", "plain", "xq", "s13", "nodefer",
              "ngemv", "pdl", "pdlw", "magic", "magicfma",
              "pcodes", "pswiglu", "nopcodes", "wide", "swb8", "swb16", "swb32", "swb64", "pint8", "qr8", "qr16", "qr32", "qr64", "qr128",
              "norm2l", "xunpack", "scatterkv", "kvt", "wg3", "ptok", "psel", "short", "shortf", "short64", "static",
              "att64", "att64s3", "att128s3", "att128", "attw2", "attw8", "attw16", "pf3", "pf3s2", "pf3s4", "pf3l",
              "wave", "programs", "pf3down", "nopf3", "noattcodes", "att1", "attlive",
              "tiled", "tiled4", "rowmajor", "vrow", "xsandwich", "xprefill",
              "sw4", "sw8", "sw16", "wcodes", "nwcodes", "sunord")


_FUSED_ATTENTION = {  # strategy → `attend_new_tokens_pallas` keywords
    "att64": dict(block_s=64, num_stages=2), "att64s3": dict(block_s=64, num_stages=3),
    "att128s3": dict(block_s=128, num_stages=3), "att128": dict(block_s=128, num_stages=2),
    "attw2": dict(num_warps=2), "attw8": dict(num_warps=8), "attw16": dict(num_warps=16),
}


_DECODE_TILE_CHANGES = {  # strategy → (decode config, M, K groups, rows) → the config to run
    "pf3": lambda cfg, *_: dataclasses.replace(cfg, prefetch_meta=3),  # small operands two iterations ahead
    "pf3s2": lambda cfg, *_: dataclasses.replace(cfg, prefetch_meta=3, num_stages=2),
    "pf3s4": lambda cfg, *_: dataclasses.replace(cfg, prefetch_meta=3, num_stages=4),
    # only where a program loops over 8 groups or more (s33k: gate/up at M = 32)
    "pf3l": lambda cfg, m, g, rows: dataclasses.replace(cfg, prefetch_meta=3) if g // cfg.split_k >= 8 else cfg,
    # session 33's down_proj form, `kernels._decode_config`'s default since session 35 (`PF3_MIN_GROUPS`): unchanged
    "pf3down": lambda cfg, *_: cfg,
}


_WIDTH_STRATEGY = re.compile(r"n(32|128)w([248])x([12h])m(16|32)")  # `@n32w4x1m32`: rows a program, warps, split-K
# ×1 / ×2 / ÷2 the default's, on the decode tiles of block_m ≥ 16 (all) or 32 (M = 17–32)


def _width_change(strategy: str):
    """The `_DECODE_TILE_CHANGES` entry of a `_WIDTH_STRATEGY` name (session 39): M = 3–32 only."""
    rows_n, warps, split, min_bm = _WIDTH_STRATEGY.fullmatch(strategy).groups()

    def change(cfg, m, num_groups, rows):
        if not 3 <= m <= 32 or cfg.block_m < int(min_bm):
            return cfg
        s = {"1": cfg.split_k, "2": 2 * cfg.split_k, "h": max(1, cfg.split_k // 2)}[split]
        s = s if num_groups % s == 0 else cfg.split_k
        return dataclasses.replace(cfg, block_n=int(rows_n), num_warps=int(warps), split_k=s)

    return change


def _apply_strategy(strategy: str) -> None:
    """Sets one `@STRATEGY` of a variant name for this (child) process; several may be chained (`@attn@normq2`)."""
    from mixjax import model as model_module
    from pallas_kernels import gemv, kernels

    if strategy == "gemv_2l":  # the M = 1 GEMV on codes from the quantization kernel (two launches a linear)
        gemv.choose_gemv_config = functools.partial(gemv.choose_gemv_config, quantize_first=True)
    elif strategy in ("nq", "normq", "normq2"):  # plain norms (the default) / norms emitting codes
        model_module.NORM_QUANT = "never" if strategy == "nq" else "auto"
        model_module.NORM_QUANT_CHUNK_GROUPS = 2 if strategy == "normq2" else None
    elif strategy in ("attn", "attnu"):  # the one-launch decode attention (pallas_kernels/attention.py)
        model_module.ATTENTION = "auto"
        model_module.ATTENTION_FUSED = strategy == "attn"
    elif strategy == "xattn":  # XLA's attention (RoPE, cache scatter, dots, softmax)
        model_module.ATTENTION = "xla"
    elif strategy == "swq":  # SwiGLU emits down_proj's int8 codes (pallas_kernels/swiglu.py)
        model_module.SWIGLU_QUANT = "auto"
    elif strategy == "xswiglu":  # XLA's SiLU·mul fusion, down_proj quantizes its input
        model_module.SWIGLU_QUANT = "never"
    elif strategy == "xsandwich":  # Gemma 3: XLA sums and normalizes o_proj's output (model.SANDWICH_FUSED never)
        model_module.SANDWICH_FUSED = "never"
    elif strategy in ("sw4", "sw8", "sw16"):  # Gemma: the one-program-a-row sandwich norm's warps
        # (model.SANDWICH_NORM_WARPS)
        model_module.SANDWICH_NORM_WARPS = int(strategy[2:])
    elif strategy == "sunord":  # --request-as streamK: the streaming callback unordered (generate.STREAM_ORDERED)
        importlib.import_module("mixjax.generate").STREAM_ORDERED = False  # the module (the package exports the function)
    elif strategy in ("wcodes", "nwcodes"):  # heads of 256: o_proj's codes from the fused attention's epilogue (two
        # groups a head; the default since session 49), or (`@nwcodes`) from XLA after the kernel
        from pallas_kernels import attention

        attention.WIDE_HEAD_CODES = strategy == "wcodes"
    elif strategy == "xprefill":  # prompts attend through XLA (the scores materialised), not cuDNN's flash attention
        model_module.PREFILL_ATTENTION = "xla"
    elif strategy == "plain":  # none of the decode kernels beside the linears (the session-11 default): the
        # pure-XLA step for bf16, the ratio base when run
        model_module.ATTENTION, model_module.NORM_QUANT, model_module.SWIGLU_QUANT = "xla", "never", "never"
    elif strategy == "xq":  # activations quantized by XLA ops (fusable into their producers), every path
        gemv.choose_gemv_config = functools.partial(gemv.choose_gemv_config, xla_quant=True)
        choose = kernels.choose_config
        kernels.choose_config = lambda *a, **k: dataclasses.replace(choose(*a, **k), xla_quant=True)
    elif strategy == "s13":  # session 13's choices: attention splits only past 4 blocks each, no GEMV prefetch
        from pallas_kernels import attention

        attention.choose_splits = lambda b, kvh, positions, block_s: max(
            1, min(-(-128 // (b * kvh)), -(-positions // block_s) // 4))
        choose_gemv = gemv.choose_gemv_config
        gemv.choose_gemv_config = lambda *a, **k: dataclasses.replace(choose_gemv(*a, **k), prefetch=False)
    elif strategy == "ngemv":  # the norms leave their second launch to the M ≤ 2 GEMVs (model.NORM_IN_GEMV)
        model_module.NORM_IN_GEMV = "auto"
    elif strategy == "norm2l":  # the decode norms before q/k/v and gate/up normalize in their second launch
        # (before session 22), instead of handing w·s and leaving the row's rsqrt to the consumer kernels
        model_module.NORM_DEFER_RMS = "never"
    elif strategy == "xunpack":  # the prefill GEMM's int4 → int8 unpack as XLA's pass (before session 23), not
        # the Pallas kernel (pallas_kernels/unpack.py)
        from pallas_kernels import mgpu

        mgpu.UNPACK = "xla"
    elif strategy in ("scatterkv", "kvt"):  # how a chunk's keys and values go into the cache (model.CACHE_WRITE):
        # XLA's scatter in the tokens' order, or the scatter in the store's order (the default); bf16 too
        model_module.CACHE_WRITE = {"scatterkv": "scatter", "kvt": "scatter_t"}[strategy]
    elif strategy in ("tiled", "tiled4"):  # the decoder layers' codes in blocks of 64 rows × 1 (× 4) groups
        # (`fuse_projections(tile=True)`, `format.TILE_GROUPS`), not in the stored row-major order
        from pallas_kernels import format as fmt

        model_module.TILED_CODES, fmt.TILE_GROUPS = True, 4 if strategy == "tiled4" else 1
    elif strategy == "rowmajor":  # the stored row-major codes (the default before session 38)
        model_module.TILED_CODES = False
    elif strategy == "vrow":  # an int8 cache's values position-major (the order before session 42)
        model_module.INT8_V_BLOCK = False
    elif strategy == "nodefer":  # down_proj's partials summed into x by XLA (before session 14), not by the
        # next layer's input norm kernel
        model_module.DEFER_DOWN = False
    elif strategy in ("pdl", "pdlw"):  # our kernels emit griddepcontrol (pallas_kernels/pdl.py; needs XLA's
        # --xla_gpu_enable_pdl=true): the small kernels trigger at their start, every kernel waits before
        # reading its inputs; pdlw: the GEMV issues its first weight loads before its wait
        from pallas_kernels import pdl

        pdl.ENABLED, pdl.WEIGHTS_FIRST = True, strategy == "pdlw"
    elif strategy in ("pcodes", "pswiglu", "nopcodes"):  # prefill GEMMs on codes from SwiGLU (and the norms)
        model_module.PREFILL_CODES = {"pcodes": "all", "pswiglu": "auto", "nopcodes": "never"}[strategy]
    elif strategy.startswith("qr"):  # rows a program of the prefill GEMM's activation quantization (mgpu.QUANT_ROWS)
        from pallas_kernels import mgpu

        mgpu.QUANT_ROWS = int(strategy[2:])
    elif strategy == "pint8":  # params-level: `build_variant` adds the int8 prefill matrices (model.int8_prefill)
        pass
    elif strategy.startswith("swb"):  # the blocked SwiGLU's rows a program at prefill
        from pallas_kernels import swiglu

        swiglu.BLOCK_ROWS = int(strategy[3:])
    elif strategy == "wide":  # session 18's tiles: 128 × 128 CTAs for every prefill GEMM
        from pallas_kernels import mgpu

        mgpu.pick_config = lambda m, n, sms=None: mgpu.DEFAULT_CONFIG
    elif strategy in ("short", "shortf", "short64"):  # short prompts without the unpack pass (session 24, item 88)
        from pallas_kernels import api, mgpu_decode

        api.MGPU_SHORT_M = (65, 512)
        if strategy != "short":
            config = mgpu_decode.DecodeConfig(fold=strategy == "shortf", tile_cols=64 if strategy == "short64" else 128)
            mgpu_decode.mixed_matmul_mgpu_decode = functools.partial(mgpu_decode.mixed_matmul_mgpu_decode, config=config)
    elif strategy == "att1":  # the decode attention in one split whatever the batch and cache (b1, and b8 on caches
        # past 512 positions, split the positions by default; before session 36's `attention.CODES_ONE_SPLIT` b8 did)
        from pallas_kernels import attention

        attention.choose_splits = lambda *args, **kwargs: 1
    elif strategy == "attlive":  # session 36's codes epilogue on the live rows only (out of the MMA's repeats): the
        # default since that session (`attention._store_head_codes`), so unchanged
        pass
    elif strategy == "noattcodes":  # o_proj quantizes the attention's bf16 output itself (before session 36: the
        # fused attention kernel hands it the codes at one split of 128-wide heads, `model.ATTENTION_CODES`)
        model_module.ATTENTION_CODES = False
    elif strategy == "nopf3":  # the 32-row decode tiles without session 35's default small operands two iterations
        # ahead on long K loops (down_proj at M = 17–32)
        kernels.PF3_MIN_GROUPS = None
    elif strategy in ("ptok", "psel"):  # one activation scale a row in the prefill GEMMs (all, or o_proj and
        # gate/up), decode per group (sessions 27–28)
        from pallas_kernels import mgpu

        mgpu.PREFILL_ACT_SCALE = "token" if strategy == "ptok" else "selective"
    elif strategy == "wg3":  # three compute warpgroups where pick_config's estimate prefers them (session 24)
        from pallas_kernels import mgpu

        mgpu.THREE_WGS = True
    elif strategy in ("magic", "magicfma"):  # the Mosaic GPU prefill GEMM's conversion (MgpuConfig.convert)
        from pallas_kernels import mgpu

        cfg = dataclasses.replace(mgpu.DEFAULT_CONFIG, convert="magic" if strategy == "magic" else "magic_fma")
        mgpu.mixed_matmul_mgpu = functools.partial(mgpu.mixed_matmul_mgpu, config=cfg)
    elif strategy in ("wave", "programs"):  # how the decode tiles pick split-K (`kernels.DECODE_SPLIT_RULE`): one
        # wave of resident programs (the default since session 33), or about 1024 programs (before)
        kernels.DECODE_SPLIT_RULE = strategy
    elif strategy in _DECODE_TILE_CHANGES or _WIDTH_STRATEGY.fullmatch(strategy):  # the decode tiles' GemmConfig
        # (int mode, M ≤ `kernels.DECODE_MAX_M`)
        choose = kernels.choose_config
        change = _DECODE_TILE_CHANGES.get(strategy) or _width_change(strategy)

        def changed(m, num_groups, rows, **k):
            cfg = choose(m, num_groups, rows, **k)
            decode = k.get("mode", "int") == "int" and m <= k.get("decode_max_m", kernels.DECODE_MAX_M)
            return change(cfg, m, num_groups, rows) if decode else cfg

        kernels.choose_config = changed
    elif strategy in _FUSED_ATTENTION:  # the fused decode attention's cache block and stages, or warps a program
        # (on top of what an earlier strategy of the variant set)
        model_module.attend_new_tokens_pallas = functools.partial(model_module.attend_new_tokens_pallas,
                                                                  **_FUSED_ATTENTION[strategy])
    elif strategy in kernels.DECODE_STRATEGIES:  # the M ≤ 32 launch strategy, for every quantized linear
        kernels.mixed_matmul_pallas = functools.partial(kernels.mixed_matmul_pallas, decode=strategy)
    elif strategy == "static":  # the params themselves change (`build_variant`: `with_static_scales`)
        pass
    else:
        raise ValueError(f"unknown strategy @{strategy}")


def run_variant(name: str, args) -> int:
    """The subprocess body: build one variant, measure, print RESULT lines as they come."""

    def log(row):
        print(RESULT + json.dumps({"variant": name, **row}), flush=True)

    dev = jax.devices()[0]
    cfg = SHAPES[args.shape]
    if args.small:  # the small model, with the shape's departures from a Llama (one layer of each kind)
        gemma = dict(mlp_act=cfg.mlp_act, embed_scale=SMALL.hidden_size ** 0.5, sandwich_norms=True, sliding_window=64,
                     global_layers=(1,), rope_local_theta=cfg.rope_local_theta, attn_logit_softcap=cfg.attn_logit_softcap,
                     final_logit_softcap=cfg.final_logit_softcap) if cfg.sandwich_norms else {}
        cfg = dataclasses.replace(SMALL, model_type=cfg.model_type, qk_norm=cfg.qk_norm,
                                  nope_layers=(1,) if cfg.nope_layers else (), **gemma)
    decode_name, prompt_name = variant_parts(name)
    for part in filter(None, (decode_name, prompt_name)):
        for strategy in (split_variant(part)[1] or "").split("@"):
            if strategy:
                _apply_strategy(strategy)
    log(dict(kind="device", device=f"{dev.device_kind} ({dev.platform})"
             + (f" × {args.tensor_parallel}, tensor parallel" if args.tensor_parallel > 1 else ""), jax=jax.__version__))
    start = time.perf_counter()
    params = build_variant(decode_name, cfg, args, log)
    prompt_params = None if prompt_name is None else build_variant(prompt_name, cfg, args, log)
    args.mesh = None
    if args.tensor_parallel > 1:
        from mixjax.parallel import model_mesh, shard_model

        args.mesh = model_mesh(args.tensor_parallel)
        params = shard_model(params, cfg, args.mesh)  # each device's q/k/v and gate/up fused
        if prompt_params is not None:
            prompt_params = shard_model(prompt_params, cfg, args.mesh)
    jax.block_until_ready((params, prompt_params))
    log(dict(kind="weights", total_bytes=tree_bytes((params, prompt_params)),  # both resident (None: no leaves)
             linear_bytes=sum(linear_bytes(p) for p in (params, prompt_params) if p is not None),
             build_s=time.perf_counter() - start))
    bandwidth = copy_bandwidth(16 << 20 if args.small else 1 << 30, args.repeats)
    log(dict(kind="bandwidth", bytes_s=bandwidth))
    order = sorted(args.batches, key=lambda b: (b != min(args.batches), -b))  # 1, 32, then 8
    jobs = [(f"decode batch {b}", functools.partial(decode, params, cfg, b, args, bandwidth)) for b in order[:2]]
    jobs += [(f"prefill {args.prefill_len}", functools.partial(prefill, params, cfg, args))]
    jobs += [(f"decode batch {b}", functools.partial(decode, params, cfg, b, args, bandwidth)) for b in order[2:]]
    if prompt_params is not None:  # its prefill and decode rows are its two parts' rows
        jobs = []
    if args.request:
        jobs += [(f"request ({mode})", functools.partial(request, params, cfg, args, prompt_params, mode))
                 for mode in args.request_as]
    failed = 0
    for what, job in jobs:
        try:
            row = job()
        except Exception as e:  # report and go on with the next measurement
            failed += 1
            log(dict(kind="error", what=what, error=f"{type(e).__name__}: {str(e)[:300]}"))
            continue
        log({**row, "peak_bytes": peak_bytes()})
    return 1 if failed else 0


# ----------------------------------------------------------------------------------------------------
# The parent: one subprocess per variant, then the table


def run_children(args, argv: list[str]) -> tuple[list[dict], list[str]]:
    rows, failures = [], []
    deadline = time.monotonic() + args.budget_s
    env = {**os.environ}
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")
    for i, name in enumerate(args.variants):
        reserve = 90.0 * (len(args.variants) - i - 1)  # keep some time for the variants after this one
        timeout = max(60.0, deadline - time.monotonic() - reserve)
        print(f"== {name} (deadline {timeout:.0f} s)", flush=True)
        cmd = [sys.executable, os.path.abspath(__file__), *argv, "--child", name]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        got, tail = [], []
        start = time.monotonic()
        try:
            for line in _lines_until(proc, start + timeout):
                if line.startswith(RESULT):
                    got.append(json.loads(line[len(RESULT):]))
                    print(f"  {_describe(got[-1])}", flush=True)
                else:
                    tail = (tail + [line.rstrip()])[-20:]
            proc.wait(timeout=max(1.0, start + timeout - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            failures.append(f"{name}: stopped after {timeout:.0f} s (budget); measurements before that are kept")
        rows += got
        errors = [r for r in got if r["kind"] == "error"]
        failures += [f"{name}: {r['what']} failed: {r['error']}" for r in errors]
        if proc.returncode not in (0, None) and not errors and not any(f.startswith(name + ":") for f in failures):
            failures.append(f"{name}: exited with status {proc.returncode}: " + " | ".join(tail[-5:]))
        if proc.returncode not in (0, None):
            print("\n".join("    " + t for t in tail[-12:]), flush=True)
    return rows, failures


def _lines_until(proc, deadline: float):
    """Lines of proc's stdout (read by a thread, so nothing buffered is lost); raises TimeoutExpired once
    the deadline has passed."""
    import queue
    import threading

    lines: queue.Queue = queue.Queue()

    def pump():
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise subprocess.TimeoutExpired(proc.args, 0)
        try:
            line = lines.get(timeout=min(left, 5.0))
        except queue.Empty:
            continue
        if line is None:
            return
        yield line


def _describe(r: dict) -> str:
    prof = r.get("profile")
    per = {"decode": "per step", "prefill": "per prefill", "request": "per new token"}.get(r["kind"])
    prof = "" if not prof else (f"; device {prof['busy_ms']:.2f} busy / {prof['span_ms']:.2f} span ms, "
                                f"{prof['kernels']:.0f} kernels {per}; top (µs, launches): "
                                + ", ".join(f"{n} {us:.1f} µs ×{c:g}" for n, us, c in prof["top"][:prof["shown"]])
                                if "busy_ms" in prof else f"; profile: {prof['error']}")
    if r["kind"] in ("prefill", "decode"):
        host = "" if "pipelined_s" not in r else (
            f"; {1e3 * r['seconds']:.2f} ms wall, {1e3 * r['pipelined_s']:.2f} pipelined, dispatch of its "
            f"{r['leaves']} param leaves {1e3 * r['dispatch_s']:.2f} ms")
        return (f"{r['variant']} {r['kind']} batch {r['batch']}: {r['tok_s']:.1f} tok/s (compile {r['compile_s']:.1f} s, "
                f"peak {_gb(r.get('peak_bytes')) or '?'} GB){host}{prof}")
    if r["kind"] == "request":
        return (f"{r['variant']} request ({r['mode']}): {r['prompt']}-token prompt + {r['tokens']} new tokens in "
                f"{r['seconds']:.3f} s, {r['tok_s']:.1f} new tok/s (compile {r['compile_s']:.1f} s, peak "
                f"{_gb(r.get('peak_bytes')) or '?'} GB){prof}")
    if r["kind"] == "error":
        return f"{r['variant']} {r['what']} FAILED: {r['error']}"
    return f"{r['variant']} {r['kind']}: " + ", ".join(f"{k}={v}" for k, v in r.items() if k not in ("variant", "kind"))


def _gb(x) -> str:
    return "" if x is None else f"{x / 1e9:.3g}"


def _ratio(a, b) -> str:
    return "" if a is None or b is None or not b else f"{a / b:.2f}×"


def markdown(rows: list[dict], failures: list[str], args) -> str:
    by = {}  # variant → {"weights": row, ("decode", b): row, ...}
    for r in rows:
        key = {"prefill": ("prefill", r.get("batch")), "decode": ("decode", r.get("batch")),
               "request": ("request", r.get("mode"))}.get(r["kind"], r["kind"])
        by.setdefault(r["variant"], {})[key] = r
        if r.get("peak_bytes") is not None:
            by[r["variant"]]["peak"] = r["peak_bytes"]
    info = next((r for r in rows if r["kind"] == "device"), {"device": "?", "jax": jax.__version__})
    # XLA's bf16 step when it was run, else plain bf16, else the first bf16 variant run (e.g. `bf16@plain@kvt`)
    first_bf16 = next((v for v in by if v.startswith("bf16")), "bf16")
    base_name = next((v for v in ("bf16@plain", "bf16") if v in by), first_bf16)
    base = by.get(base_name, {})
    cfg_name = "small test model" if args.small else {"llama3-8b": "Llama-3-8B", "qwen3-8b": "Qwen3-8B",
                                                       "smollm3-3b": "SmolLM3-3B", "gemma3-4b": "Gemma-3-4B",
                                                       "gemma2-9b": "Gemma-2-9B"}[args.shape] \
        + " shape"
    lines = [
        f"# Generation speed, {cfg_name}, random weights ({datetime.date.today().isoformat()})",
        "",
        f"device: {info['device']}, jax {info['jax']}, implementation={args.implementation}, KV cache "
        f"{jnp.dtype(args.cache_dtype).name}; median of {args.repeats} runs after warm-up "
        f"({max(args.repeats, 7)} for prefill). "
        f"Prefill: batch 1 × {args.prefill_len} tokens. Decode: {args.new_tokens} greedy steps after a "
        f"{args.prompt_len}-token prompt. Quantized weights: "
        + (f"`mixjax.quantize` on {args.calib_samples}×{args.calib_len} random calibration tokens."
           if args.full_quant else "RTN (`pallas_kernels.pack_rtn`), random 8-bit channels (10 % for W4.4A8).")
        + f" Ratios are against {base_name} (unstacked layers). Peak GB: the device's peak_bytes_in_use in the "
        "variant's own process (blank where the backend does not report it, e.g. CPU).",
        "",
    ]
    batches = sorted(args.batches)
    head = ["variant", "weight GB", "× bf16", "peak GB", f"prefill {args.prefill_len} tok/s", "× bf16"]
    for b in batches:
        head += [f"decode b{b} tok/s", "× bf16"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for v, d in by.items():
        w = d.get("weights", {}).get("total_bytes")
        cells = [v, _gb(w), _ratio(w, base.get("weights", {}).get("total_bytes")), _gb(d.get("peak"))]
        for key in [("prefill", 1)] + [("decode", b) for b in batches]:
            tok = d.get(key, {}).get("tok_s")
            cells += ["" if tok is None else f"{tok:.1f}", _ratio(tok, base.get(key, {}).get("tok_s"))]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| variant | phase | batch | seconds | tokens/s | ms/step | TFLOP/s | % of weight-read floor | compile s |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["kind"] in ("prefill", "decode"):
            lines.append(f"| {r['variant']} | {r['kind']} | {r['batch']} | {r['seconds']:.4f} | {r['tok_s']:.1f} | "
                         f"{r.get('ms_per_step', float('nan')):.2f} | {r.get('tflops', float('nan')):.1f} | "
                         f"{r.get('floor', float('nan')):.0f} | {r['compile_s']:.1f} |".replace("nan", ""))
    asked = [r for r in rows if r["kind"] == "request"]
    if asked:
        switch = f" and the first {args.switch_after} new tokens" if args.switch_after else ""
        lines += ["", f"Whole requests (`--request`): one `mixjax.generate` call, batch 1, a random "
                  f"{asked[0]['prompt']}-token prompt, {asked[0]['tokens']} greedy new tokens"
                  + f"; `A<B`: B runs the prompt{switch}, A the rest."
                  + " Request as: fixedK no EOS id, eosK an EOS id it never emits, streamK that and on_token; K: "
                  "decode steps between host round trips (`sync_every`). × bf16 against bf16's request of that form.",
                  "", "| variant | request as | weight GB resident | seconds a request | new tok/s | × bf16 |",
                  "|---|---|---|---|---|---|"]
        for r in asked:
            w = by[r["variant"]].get("weights", {}).get("total_bytes")
            base_s = base.get(("request", r["mode"]), {}).get("seconds")
            lines.append(f"| {r['variant']} | {r['mode']} | {_gb(w)} | {r['seconds']:.3f} | "
                         f"{r['tok_s']:.1f} | {_ratio(base_s, r['seconds'])} |")
    extra = [r for r in rows if r["kind"] in ("weights", "quantize", "bandwidth")]
    if extra:
        lines += [""]
        for r in extra:
            if r["kind"] == "weights":
                lines.append(f"- {r['variant']}: decoder linears {_gb(r['linear_bytes'])} GB of {_gb(r['total_bytes'])} GB "
                             f"(built in {r['build_s']:.1f} s)")
            elif r["kind"] == "quantize":
                lines.append(f"- {r['variant']}: `mixjax.quantize` took {r['seconds']:.1f} s on {r['calib']} calibration "
                             f"tokens, peak device memory {_gb(r['peak_bytes'])} GB (the peak GB above includes it)")
            elif r["kind"] == "bandwidth":
                lines.append(f"- {r['variant']}: measured copy bandwidth {r['bytes_s'] / 1e9:.0f} GB/s")
    if failures:
        lines += ["", "Failures:"] + [f"- {f}" for f in failures]
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", default="bf16,w4.4a8,w8a8", help=f"comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument("--small", action="store_true", help="a tiny model and short runs (CPU smoke test)")
    p.add_argument("--shape", default="llama3-8b", choices=tuple(SHAPES),
                   help="the model's shape (random weights): Llama-3-8B (default), Qwen3-8B (query/key head norms) "
                        "or SmolLM3-3B (every fourth layer without RoPE)")
    p.add_argument("--full-quant", action="store_true", help="quantize with the full mixjax.quantize pipeline")
    p.add_argument("--calib-samples", type=int, default=16, help="--full-quant: random calibration sequences")
    p.add_argument("--calib-len", type=int, default=2048, help="--full-quant: tokens per calibration sequence")
    p.add_argument("--kv-int8", action="store_true", help="decode and prefill with an int8 KV cache")
    p.add_argument("--out", default=None, help="write the markdown table here")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--prefill-len", type=int, default=2048)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--request", default=None, metavar="P:N",
                   help="also time one whole mixjax.generate call: a P-token prompt and N new tokens, batch 1")
    p.add_argument("--switch-after", type=int, default=0, metavar="N",
                   help="`A<B` variants: B also decodes the first N new tokens (generate's switch_after)")
    p.add_argument("--request-as", default="fixed1", metavar="MODE,...",
                   help="--request: one request per mode: fixedK (no EOS id), eosK (an EOS id never emitted), streamK "
                        "(that, streamed to the host as the CLI does); K: sync_every (default fixed1)")
    p.add_argument("--implementation", default="auto", choices=("auto", "xla", "pallas"))
    p.add_argument("--budget-s", type=float, default=450.0, help="wall-clock budget of all variants together")
    p.add_argument("--no-fuse", dest="fuse", action="store_false",
                   help="keep q/k/v and gate/up as separate linears (default: model.fuse_projections)")
    p.add_argument("--profile", action="store_true",
                   help="device busy/span ms and kernels per decode step, per prefill and per request's new token")
    p.add_argument("--profile-top", type=int, default=4, help="--profile: list this many kernels by time per step")
    p.add_argument("--tensor-parallel", type=int, default=1, metavar="N",
                   help="split each model over N local devices (mixjax.shard_model; default 1)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: run one variant
    args = p.parse_args(argv)
    try:
        args.batches = [int(b) for b in args.batches.split(",") if b.strip()]  # "" = prefill only
    except ValueError:
        p.error(f"--batches {args.batches!r}: expected comma-separated integers such as 1,8,32")
    args.request_as = args.request_as.split(",")
    bad = [m for m in args.request_as if not re.fullmatch(r"(fixed|eos|stream)[1-9]\d*", m)]
    if bad:
        p.error(f"--request-as {bad}: expected fixedK, eosK or streamK with K ≥ 1, such as fixed1,eos8,stream8")
    if args.request is not None:
        try:
            args.request = tuple(int(x) for x in args.request.split(":"))
            assert len(args.request) == 2 and min(args.request) >= 1
        except (ValueError, AssertionError):
            p.error(f"--request {args.request!r}: expected PROMPT:NEW, two positive token counts such as 2048:256")
    args.variants = args.variants.split(",")
    progressive = [v for v in args.variants if variant_parts(v)[1] is not None]
    if progressive and not args.request:
        p.error(f"{progressive}: an `A<B` variant is measured by --request only; add --request P:N")
    if args.switch_after < 0:
        p.error(f"--switch-after {args.switch_after} must be ≥ 0")
    parts = [part for v in args.variants for part in variant_parts(v) if part]
    unknown = [v for v in parts if split_variant(v)[0] not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    from pallas_kernels.kernels import DECODE_STRATEGIES

    known = STRATEGIES + DECODE_STRATEGIES
    bad = [st for v in parts for st in (split_variant(v)[1] or "").split("@")
           if st and st not in known and not _WIDTH_STRATEGY.fullmatch(st)]
    if bad:
        p.error(f"unknown strategies {bad}; known: {', '.join(known)}")
    if args.small:
        args.prefill_len, args.prompt_len, args.new_tokens = min(args.prefill_len, 256), min(args.prompt_len, 32), min(args.new_tokens, 16)
        args.calib_samples, args.calib_len = min(args.calib_samples, 2), min(args.calib_len, 64)
        args.repeats = min(args.repeats, 2)
        args.request = args.request and (min(args.request[0], 64), min(args.request[1], 16))
    args.cache_dtype = jnp.int8 if args.kv_int8 else jnp.bfloat16
    if args.tensor_parallel < 1:
        p.error(f"--tensor-parallel {args.tensor_parallel} must be ≥ 1")
    if args.tensor_parallel > 1 and any("pint8" in (split_variant(v)[1] or "").split("@") for v in parts):
        p.error("@pint8 is not built for a model split over several devices (mixjax.generate refuses it too)")
    if args.out and os.path.dirname(args.out) and not os.path.isdir(os.path.dirname(args.out)):
        p.error(f"--out {args.out}: directory {os.path.dirname(args.out)} does not exist")
    return args


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.child:
        return run_variant(args.child, args)
    start = time.monotonic()
    print(f"jax {jax.__version__}; variants {', '.join(args.variants)}, one subprocess each", flush=True)
    rows, failures = run_children(args, argv)
    table = markdown(rows, failures, args)
    print(table)
    print(f"total wall {time.monotonic() - start:.0f} s", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
