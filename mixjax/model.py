"""The Llama-family decoder (Llama 2/3/3.x, Mistral, Qwen2, Qwen3, SmolLM2/3) as pure functions over a params pytree.

Dimension legend: B batch, T new tokens, S key positions (cache length), D hidden size, H query heads,
KVH key/value heads, G = H // KVH query heads per key/value head, Dh head dim, F feed-forward size,
V vocabulary, L layers.

Params follow DESIGN.md: a nested dict with Hugging Face-derived names. Float layers are stacked on a
leading L axis and run under `lax.scan`; quantized layers are a tuple of per-layer dicts run by a Python
loop. Both paths share one layer body, `_decoder_layer`. Every projection goes through
`mixjax.linear.linear`, so a weight leaf may be any `QuantizedLinear`.

Numerics: matmuls run in the params' dtype (f32 or bf16); RMSNorm, RoPE angles and softmax run in f32;
logits are returned in f32. RoPE uses Hugging Face's rotate-half layout (the first Dh/2 features of a
head pair with the last Dh/2).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mixjax.config import LlamaConfig
from mixjax.linear import Implementation, QuantizedLinear, linear, resolve_implementation
from pallas_kernels.attention import (V_BLOCK, attend_new_tokens_pallas, attend_ref, cudnn_head_dim_limit,
                                      decode_attention_pallas, prefill_attention, unblock_values)

LINEAR_NAMES = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)
_BIASED = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")  # when cfg.attention_bias


# ----------------------------------------------------------------------------------------------------
# Parameter layout


def param_shapes(cfg: LlamaConfig) -> dict[str, Any]:
    """The float params tree of `cfg` with shape tuples as leaves (stacked layers: leading L)."""
    L, D, F, V = cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    q_dim = cfg.num_attention_heads * cfg.head_dim
    kv_dim = cfg.num_key_value_heads * cfg.head_dim
    linear_nk = {
        "self_attn.q_proj": (q_dim, D),
        "self_attn.k_proj": (kv_dim, D),
        "self_attn.v_proj": (kv_dim, D),
        "self_attn.o_proj": (D, q_dim),
        "mlp.gate_proj": (F, D),
        "mlp.up_proj": (F, D),
        "mlp.down_proj": (D, F),
    }
    layers: dict[str, Any] = {"input_layernorm": (L, D), "post_attention_layernorm": (L, D)}
    if cfg.qk_norm:  # Qwen3, Gemma 3: one RMSNorm weight over Dh, shared by the heads
        layers.update(q_norm=(L, cfg.head_dim), k_norm=(L, cfg.head_dim))
    if cfg.sandwich_norms:  # Gemma 3: the attention's and the MLP's outputs normalized before the residual adds
        layers.update(attn_output_norm=(L, D), mlp_output_norm=(L, D))
    for name in LINEAR_NAMES:
        group, proj = name.split(".")
        n, k = linear_nk[name]
        entry = {"weight": (L, n, k)}
        if cfg.attention_bias and name in _BIASED:
            entry["bias"] = (L, n)
        layers.setdefault(group, {})[proj] = entry
    shapes = {"embed_tokens": (V, D), "layers": layers, "norm": (D,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head"] = (V, D)
    return shapes


def _is_shape(x) -> bool:
    return isinstance(x, tuple) and all(isinstance(i, int) for i in x)


def init_params(cfg: LlamaConfig, key: jax.Array, dtype=jnp.bfloat16) -> dict[str, Any]:
    """Random params of `cfg` (normal, std 0.02; norms at 1) in `dtype`, for tests and benchmarks.

    Each leaf is created by its own jitted call, so peak memory is the params plus one leaf's f32
    temporaries (measured on an H100: a Llama-3-8B shape in bf16 peaks at 16.06 GB, the params' size).
    """
    shapes = param_shapes(cfg)
    leaves, treedef = jax.tree.flatten(shapes, is_leaf=_is_shape)
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(shapes, is_leaf=_is_shape)[0]]
    keys = jax.random.split(key, len(leaves))
    out = []
    for path, shape, k in zip(paths, leaves, keys):
        if "norm" in path:
            out.append(jnp.ones(shape, dtype))
        else:
            out.append(_normal(k, shape, jnp.dtype(dtype)))
    return jax.tree.unflatten(treedef, out)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _normal(key, shape, dtype):
    return (jax.random.normal(key, shape, jnp.float32) * 0.02).astype(dtype)


def unstack_layers(params: dict[str, Any]) -> dict[str, Any]:
    """Stacked float layers ([L, ...] leaves) → a tuple of L per-layer dicts (the quantized layout).

    The per-layer arrays are copies: drop the stacked params afterwards (`layer_views` reads them a layer at a
    time without the copy). On GPU the tuple layout also
    decodes faster, because XLA copies each layer's weight slice out of a stacked array (H100, Llama-3-8B
    shape, bf16, 2048-position cache: 9.3 ms per decode step at batch 1 unstacked against 17.3 ms stacked).
    """
    layers = params["layers"]
    if isinstance(layers, (tuple, list)):
        return params
    n = jax.tree.leaves(layers)[0].shape[0]
    return {**params, "layers": tuple(jax.tree.map(lambda a, i=i: a[i], layers) for i in range(n))}


class LayerViews(Sequence):
    """Stacked layers ([L, ...] leaves) read as a sequence of per-layer dicts, each sliced when it is asked for:
    code written for a tuple of layers walks stacked params without a whole unstacked copy (the quantizer)."""

    def __init__(self, stacked: dict[str, Any]):
        self.stacked = stacked
        self._n = jax.tree.leaves(stacked)[0].shape[0]

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i: int):
        if not -self._n <= i < self._n:
            raise IndexError(f"layer {i} of {self._n}")
        return jax.tree.map(lambda a: a[i], self.stacked)


def layer_views(layers) -> Sequence:
    """A tuple of layers as it is; stacked layers as `LayerViews` (sliced one layer at a time, on demand)."""
    return layers if isinstance(layers, (tuple, list)) else LayerViews(layers)


def stack_layers(params: dict[str, Any]) -> dict[str, Any]:
    """A tuple of per-layer float dicts → stacked [L, ...] leaves (inverse of `unstack_layers`)."""
    layers = params["layers"]
    if not isinstance(layers, (tuple, list)):
        return params
    for i, layer in enumerate(layers):
        leaves = jax.tree.leaves(layer, is_leaf=lambda x: isinstance(x, QuantizedLinear))
        bad = [leaf for leaf in leaves if isinstance(leaf, QuantizedLinear) or not hasattr(leaf, "dtype")]
        if bad:
            raise TypeError(f"stack_layers: layer {i} holds a {type(bad[0]).__name__}; only float layers stack")
    return {**params, "layers": jax.tree.map(lambda *xs: jnp.stack(xs), *layers)}


# Linears that share their input: {group: (member projections, name of their fused weight)}.
_FUSED = {"self_attn": (("q_proj", "k_proj", "v_proj"), "qkv_proj"), "mlp": (("gate_proj", "up_proj"), "gate_up_proj")}


def _out_features(proj: str, cfg: LlamaConfig) -> int:
    heads = {"q_proj": cfg.num_attention_heads, "k_proj": cfg.num_key_value_heads, "v_proj": cfg.num_key_value_heads}
    return heads[proj] * cfg.head_dim if proj in heads else cfg.intermediate_size


def int8_prefill(params: dict[str, Any]) -> dict[str, Any]:
    """Every decoder-layer `MixedWeight` holding its weight as one int8 matrix (`mgpu.with_int8_prefill`), so
    prefill on a Hopper GPU skips unpacking the 4-bit rows at every call: one more byte a weight of memory for
    shorter prompts' time to first token (H200, Llama-3-8B: W4.4A8 4.8 → ≈ 12 GB; the unpack,
    `pallas_kernels.unpack`, takes ≈ 3.1 ms of every prefill, 2048 tokens or 256). Decode does not read the matrices; a weight's
    `.without_int8_prefill()` drops them. Runtime only: call it after `fuse_projections`; `save_quantized`
    never writes the matrices. Other leaves (the embedding table, the LM head, float weights) are returned as
    they are."""
    from pallas_kernels import MixedWeight
    from pallas_kernels.mgpu import with_int8_prefill

    def convert(leaf):
        return with_int8_prefill(leaf) if isinstance(leaf, MixedWeight) else leaf

    layers = jax.tree.map(convert, params["layers"], is_leaf=lambda x: isinstance(x, MixedWeight))
    return {**params, "layers": layers}


TILED_CODES: bool | None = None  # what `fuse_projections(tile=None)` does: put the decoder layers' and the LM head's
# codes in blocks of 64 rows × 1 K group (`tile_codes`, `format.TILE_GROUPS`), the order the Pallas decode tiles read
# fastest; None: on a GPU backend (where the Pallas kernels run), not on CPU (the XLA reference would restore the
# stored order every call). H100 (session 38, results/generation.md): decode b8 +12 %, b32 +6 % tokens/s, b1 −2.5 %
# (the one-row GEMV reads a row's 4 groups from 4 blocks; −5 % before it read them through computed offsets), so
# mixjax's one-sequence paths (`generate_text`, the CLI's demo) and `perplexity`'s loader pass tile=False


def tile_codes(params: dict[str, Any]) -> dict[str, Any]:
    """Every decoder-layer `MixedWeight` and a quantized LM head (and embedding table) with their codes in (64-row
    tile, K group) order (`format.tile_codes`, a runtime layout: the Pallas decode tiles read a group of a tile as
    one 4 KB block instead of 64 rows' 64-byte pieces 2 KB apart). Same numbers from every path; the XLA reference
    and the other readers restore the row-major order first (a copy a call), so it is for the Pallas kernels on a
    GPU (the one-row GEMV is 1–6 % slower on it, the batched decode tiles up to 21 % faster). `save_quantized`
    writes the stored order. Other leaves are returned as they are."""
    from pallas_kernels import MixedWeight, StaticMixedWeight
    from pallas_kernels.format import tile_codes as tile

    def convert(leaf):
        if isinstance(leaf, StaticMixedWeight):
            return dataclasses.replace(leaf, qw=tile(leaf.qw))
        return tile(leaf) if isinstance(leaf, MixedWeight) else leaf

    layers = jax.tree.map(convert, params["layers"], is_leaf=lambda x: isinstance(x, (MixedWeight, StaticMixedWeight)))
    heads = {name: convert(params[name]) for name in ("embed_tokens", "lm_head") if name in params}  # quantized
    # tables (`quantize_head`): the embedding's row gather reads either order; a tied table is the head too
    return {**params, "layers": layers, **heads}


def fuse_projections(params: dict[str, Any], *, tile: bool | None = None) -> dict[str, Any]:
    """q/k/v → one `self_attn.qkv_proj`, gate/up → one `mlp.gate_up_proj` (weights concatenated along N).

    Same outputs, fewer and larger matmuls: each fused linear quantizes its input once and runs as one
    kernel launch, which is what decode time is made of (benchmarks/results/generation.md). Float weights
    (stacked or per layer) are concatenated along N; `MixedWeight`s through `pallas_kernels.concat_mixed`
    (exact), `StaticMixedWeight`s too when their calibrated input maxima are equal (as `quantize` makes them).
    Groups mixing weight kinds (e.g. fake-quant simulation) stay unfused. Do it once after
    loading, for inference; checkpoints, salience and quantization use the unfused names. Idempotent.

    tile: then `tile_codes`, the codes in the order the Pallas decode tiles read fastest (H100: +6–12 % tokens/s at
    8–32 sequences, −2.5 % at one); None: `TILED_CODES` (None: on a GPU backend).
    """
    from pallas_kernels import MixedWeight, StaticMixedWeight
    from pallas_kernels.fuse import concat_mixed

    stacked = not isinstance(params["layers"], (tuple, list))

    def fuse_group(entries: dict, members: tuple[str, ...]) -> dict | None:
        ws = [entries[name]["weight"] for name in members]
        if all(isinstance(w, MixedWeight) for w in ws):
            fused = {"weight": concat_mixed(ws)}
        elif all(isinstance(w, StaticMixedWeight) for w in ws) and _same_maxima(ws):
            fused = {"weight": StaticMixedWeight(concat_mixed([w.qw for w in ws]), ws[0].a_absmax)}
        elif all(hasattr(w, "dtype") and not isinstance(w, QuantizedLinear) for w in ws):
            fused = {"weight": jnp.concatenate(ws, axis=1 if stacked else 0)}
        else:
            return None
        if any("bias" in entries[name] for name in members):  # a part without one contributes zeros
            fused["bias"] = jnp.concatenate([entries[name].get("bias", jnp.zeros(w.shape[:-1]))
                                             for name, w in zip(members, ws)], axis=-1)
        return fused

    def fuse_layer(layer):
        layer = {**layer}
        for group, (members, fused_name) in _FUSED.items():
            if not all(name in layer[group] for name in members):
                continue  # already fused
            fused = fuse_group(layer[group], members)
            if fused is not None:
                rest = {key: val for key, val in layer[group].items() if key not in members}
                layer[group] = {**rest, fused_name: fused}
        return layer

    layers = fuse_layer(params["layers"]) if stacked else tuple(fuse_layer(layer) for layer in params["layers"])
    if tile is None:
        tile = jax.default_backend() == "gpu" if TILED_CODES is None else TILED_CODES
    return tile_codes({**params, "layers": layers}) if tile else {**params, "layers": layers}


def _same_maxima(ws) -> bool:
    """Whether static-scale weights share their calibrated input maxima (linears of one input do: `quantize` takes
    them from that input), so one quantization of the input serves their fused weight. False under tracing."""
    arrays = [w.a_absmax for w in ws]
    if any(isinstance(a, jax.core.Tracer) for a in arrays):
        return False
    return all(a.shape == arrays[0].shape and bool(jnp.array_equal(a, arrays[0])) for a in arrays[1:])


def get_path(tree: dict, dotted: str):
    """tree["self_attn"]["q_proj"] for dotted = "self_attn.q_proj"."""
    for part in dotted.split("."):
        tree = tree[part]
    return tree


# ----------------------------------------------------------------------------------------------------
# Building blocks


def rms_norm(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
    """x [..., D] normalized in f32, cast back to x's dtype, then scaled by w [D] (Hugging Face order)."""
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return w.astype(x.dtype) * y.astype(x.dtype)


NORM_QUANT = "auto"  # "auto" (default): norms feeding mixed linears quantize their output
# (`pallas_kernels.rms_norm_quant`) on the Pallas path at ≤ MAX_QUANT_ROWS tokens (decode); "always": also
# on the XLA path, through its reference (tests); "never": plain `rms_norm`, each linear quantizes itself.
# One launch per row measured 1–2 % slower end to end (session 11); two launches (chunks of 2 groups) with
# the attention and SwiGLU kernels: +1.2 % at b1, +2.7 % at b32 (H200, 2026-12-03, NOTES-kernels.md item 52)


NORM_QUANT_CHUNK_GROUPS = 2  # with NORM_QUANT on the Pallas path: None — one program per row (one launch);
# an int — `rms_norm_quant_pallas(chunk_groups=...)`, two launches over (row, chunk of that many groups)
PREFILL_NORM_CHUNK_GROUPS = None  # the same choice for prefill rows, where `PREFILL_CODES = "all"` has the norms
# emit codes: one program per row (session 19 measured the two-launch form there: 0.91×)


def _norm_quant_on(weights, x: jax.Array, implementation: Implementation) -> bool:
    """Whether the norm before `weights` (the linears sharing its output) should hand them int8 codes."""
    from pallas_kernels.format import MixedWeight
    from pallas_kernels.norm import MAX_QUANT_ROWS

    if NORM_QUANT == "never" or not weights or not all(isinstance(w, MixedWeight) for w in weights):
        return False
    if math.prod(x.shape[:-1]) > MAX_QUANT_ROWS and not _prefill_codes_on(x, implementation, "norm"):
        return False
    return NORM_QUANT == "always" or resolve_implementation(implementation) == "pallas"


PREFILL_CODES = "all"  # at prefill (≥ api.MGPU_MIN_M tokens on a Hopper GPU, the Mosaic GPU GEMM's rows):
# "all" (default): the norms (NORM_QUANT, one program a row: PREFILL_NORM_CHUNK_GROUPS) and SwiGLU (SWIGLU_QUANT,
# its blocked form) hand their mixed linears int8 codes, so those GEMMs skip their own quantization pass;
# "auto": SwiGLU only; "always": both, at any row count, on the XLA path through the references (tests);
# "never": prefill linears quantize their inputs. Measured (H200, 2026-12-04, Llama-3-8B shape, prefill 2048):
# "auto" 57 µs a layer for SiLU·mul and the codes against 72 for XLA's fusion and the quantization launch,
# +1.1 % tokens/s over "never"; "all" with the norms' two-launch form 0.91× "never" (session 19), with the
# one-launch form (session 21) 20.3 µs a norm against 30.3 for XLA's residual add and norm plus the
# quantization launch, −0.65 ms busy a 2048-token prefill against "auto" (−0.1 ms at 256 tokens)


def _prefill_codes_on(x: jax.Array, implementation: Implementation, producer: str) -> bool:
    """Whether more rows than the decode kernels' limit still get codes from their producer ("norm" or
    "swiglu")."""
    if PREFILL_CODES not in ("never", "auto", "all", "always"):
        raise ValueError(f"mixjax.model.PREFILL_CODES = {PREFILL_CODES!r}; expected 'never', 'auto', 'all' or "
                         "'always'")
    if PREFILL_CODES in ("never", "always"):
        return PREFILL_CODES == "always"
    if PREFILL_CODES == "auto" and producer != "swiglu":
        return False
    from pallas_kernels.api import MGPU_MIN_M, has_wgmma

    return resolve_implementation(implementation) == "pallas" and math.prod(x.shape[:-1]) >= MGPU_MIN_M and has_wgmma()


def _row_scale_codes(x: jax.Array, consumer: str) -> bool:
    """Whether the codes of these rows for `consumer` ("qkv", "o", "gate_up", "down" or "head") get one scale a
    row: prefill rows (past the decode kernels' limit) with `mgpu.PREFILL_ACT_SCALE` "token" (every consumer) or
    "selective" (o_proj and gate/up only: per token there, the per-token prompt cost no accuracy on the embedded
    model, results/accuracy.md). The norm then takes its one-program-a-row form whatever
    `PREFILL_NORM_CHUNK_GROUPS` says (a chunk's program cannot see its row)."""
    from pallas_kernels import mgpu
    from pallas_kernels.norm import MAX_QUANT_ROWS

    mode = mgpu.check_prefill_act_scale()
    if mode == "group" or math.prod(x.shape[:-1]) <= MAX_QUANT_ROWS:
        return False
    return mode == "token" or consumer in mgpu.SELECTIVE_CONSUMERS


def _o_proj_input(attn: jax.Array, implementation: Implementation):
    """o_proj's input at prefill: the attention output as it is, or in "selective" mode (where the producers' codes
    run, `_prefill_codes_on`) its codes with one scale a row, which the Mosaic GPU GEMM rescales per token ("token"
    mode quantizes the float input per row inside the GEMM call, `mgpu.ROW_QUANT`)."""
    from pallas_kernels import mgpu

    if mgpu.check_prefill_act_scale() != "selective" or not _row_scale_codes(attn, "o") or \
            not _prefill_codes_on(attn, implementation, "norm"):
        return attn
    from pallas_kernels.format import QuantizedActivations
    from pallas_kernels.kernels import quantize_activations_xla, quantize_rows_pallas

    rows = attn.reshape(-1, attn.shape[-1])
    if resolve_implementation(implementation) == "pallas":
        codes = quantize_rows_pallas(rows, block_m=mgpu.M_ALIGN)
    else:
        codes = quantize_activations_xla(rows, block_m=mgpu.M_ALIGN, row_scale=True)
    return QuantizedActivations(*codes, tuple(attn.shape[:-1]), attn.shape[-1], jnp.dtype(attn.dtype).name, True)


SWIGLU_QUANT = "auto"  # "auto" (default): at ≤ swiglu.MAX_ROWS tokens on the Pallas path, a fused gate/up and
# a down projection that are both mixed weights exchange int8 codes: `pallas_kernels.swiglu.silu_mul_quant_pallas`
# sums the gate/up partials, applies SiLU(gate)·up and quantizes in one launch, and down_proj skips its own
# quantization; "always": also on the XLA path through the reference (tests); "never": XLA's fusion,
# down_proj quantizes (benchmarks/NOTES-kernels.md items 51–52)


def _swiglu_quant_on(gate_up: dict, down: dict, x: jax.Array, implementation: Implementation) -> bool:
    from pallas_kernels.format import MixedWeight
    from pallas_kernels.swiglu import MAX_ROWS

    if SWIGLU_QUANT not in ("never", "auto", "always"):
        raise ValueError(f"mixjax.model.SWIGLU_QUANT = {SWIGLU_QUANT!r}; expected 'never', 'auto' or 'always'")
    if SWIGLU_QUANT == "never" or (math.prod(x.shape[:-1]) > MAX_ROWS and not _prefill_codes_on(x, implementation, "swiglu")):
        return False
    if not (isinstance(gate_up["weight"], MixedWeight) and isinstance(down["weight"], MixedWeight)):
        return False
    if gate_up.get("bias") is not None:
        return False
    return SWIGLU_QUANT == "always" or resolve_implementation(implementation) == "pallas"


NORM_IN_GEMV = "never"  # "auto": with the two-launch norm (NORM_QUANT_CHUNK_GROUPS) on the Pallas path and
# ≤ api.GEMV_MAX_M rows, the norm's second launch is left out: it hands the linears `NormedActivations` and
# every GEMV program normalizes and quantizes its own groups (other paths make the codes first); "always":
# also on the XLA path (kernels in interpret mode; tests); "never": the norm makes the codes. Measured (H200,
# 2026-12-03, b1, Llama-3-8B shape): the 65 second launches (133 µs a step) go, but the GEMVs after the norms
# slow by as much (gate/up 659 → 757, q/k/v 230 → 263 µs a step): 491.0 vs 490.5 tok/s, so off


def _norm_in_gemv(x, implementation: Implementation) -> bool:
    from pallas_kernels.api import GEMV_MAX_M

    if NORM_IN_GEMV not in ("never", "auto", "always"):
        raise ValueError(f"mixjax.model.NORM_IN_GEMV = {NORM_IN_GEMV!r}; expected 'never', 'auto' or 'always'")
    if NORM_IN_GEMV == "never" or NORM_QUANT_CHUNK_GROUPS is None or x.shape[-1] % 128:
        return False
    if math.prod(x.shape[:-1]) > GEMV_MAX_M:
        return False
    return NORM_IN_GEMV == "always" or resolve_implementation(implementation) == "pallas"


NORM_DEFER_RMS = "auto"  # "auto" (default): at decode (≤ norm.MAX_QUANT_ROWS tokens) on the Pallas path with the
# two-launch norm (NORM_QUANT_CHUNK_GROUPS), a norm whose linear's output goes to the fused attention kernel
# (q/k/v) or the SwiGLU kernel (gate/up) runs in one launch: it hands the codes of w·s and the chunks' sums of
# squares (`norm.rms_norm_codes_pallas`), and that consumer multiplies the linear's output by the row's
# rsqrt(mean(s²) + eps) (`format.RowRms`); "always": also on the XLA path, through the references (tests);
# "never": the norm's second launch normalizes first. Measured (H200, 2026-12-04, Llama-3-8B shape, W4.4A8 +
# int4 head): b1 492.8 → 509.0 tok/s (2.03 → 1.96 ms a step, 369 → 305 launches), b8 +1.1 %, b32 +1.9 %


SANDWICH_FUSED = "auto"  # "auto" (default): at decode (≤ norm.MAX_QUANT_ROWS tokens) on the Pallas path, a Gemma 3
# layer's mixed o_proj (no bias) hands its split-K partials to the post-attention norm kernel, which normalizes their
# sum with `attn_output_norm` before the residual add (`rms_norm_quant_pallas(delta_w=...)`, one program a row);
# "always": also on the XLA path, through the reference (tests); "never": XLA sums and normalizes o_proj's output
# and the norm kernel takes it as an x-shaped delta. Measured +0.7–1.5 % on an H100 (NOTES-kernels.md item 149)
SANDWICH_NORM_WARPS = 16  # warps of that one-program-a-row norm (None: the kernel's choice, 4 up to 4096 features): at
# b1 one program reads every partial of the row. H100, against 4 (bench `@sw4`): Gemma-3-4B b1 +1.8 %, b32 +1.0 %;
# Gemma-2-9B b1 +2.4 %, b32 +1.7 %; 8 warps in between (NOTES-kernels.md item 153)


def _sandwich_fused(o_proj: dict, x, implementation: Implementation) -> bool:
    from pallas_kernels.format import MixedWeight
    from pallas_kernels.norm import MAX_QUANT_ROWS

    if SANDWICH_FUSED not in ("never", "auto", "always"):
        raise ValueError(f"mixjax.model.SANDWICH_FUSED = {SANDWICH_FUSED!r}; expected 'never', 'auto' or 'always'")
    if (SANDWICH_FUSED == "never" or not isinstance(o_proj["weight"], MixedWeight) or o_proj.get("bias") is not None
            or math.prod(x.shape[:-1]) > MAX_QUANT_ROWS or _norm_in_gemv(x, implementation)):
        return False
    return SANDWICH_FUSED == "always" or resolve_implementation(implementation) == "pallas"


def _defer_rms(x, implementation: Implementation) -> bool:
    from pallas_kernels.norm import MAX_QUANT_ROWS

    if NORM_DEFER_RMS not in ("never", "auto", "always"):
        raise ValueError(f"mixjax.model.NORM_DEFER_RMS = {NORM_DEFER_RMS!r}; expected 'never', 'auto' or 'always'")
    if NORM_DEFER_RMS == "never" or _norm_in_gemv(x, implementation) or math.prod(x.shape[:-1]) > MAX_QUANT_ROWS:
        return False
    if NORM_DEFER_RMS == "always":
        return True
    return NORM_QUANT_CHUNK_GROUPS is not None and resolve_implementation(implementation) == "pallas"


def norm_codes(x, delta, w, eps: float, implementation: Implementation):
    """(x + Σ delta, QuantizedActivations of w·(x + Σ delta), RowRms): `norm_quant` with the row's rsqrt left
    to the consumer of the linear's output (`NORM_DEFER_RMS`)."""
    from pallas_kernels import norm

    chunk = NORM_QUANT_CHUNK_GROUPS or 2
    if resolve_implementation(implementation) == "pallas":
        return norm.rms_norm_codes_pallas(x, delta, w, eps, chunk_groups=chunk)
    return norm.rms_norm_codes_ref(x, delta, w, eps, chunk_groups=chunk)


def norm_quant(x, delta, w, eps: float, implementation: Implementation, consumer: str = "qkv", delta_w=None):
    """(x + Σ delta, QuantizedActivations of rms_norm(x + Σ delta, w)): delta None, x-shaped, or a mixed
    linear's f32 split-K partials [S, *x.shape] (`MixedWeight.matmul(..., partials=True)`). With
    `NORM_IN_GEMV` on, `NormedActivations` instead (the linears' GEMV normalizes its own groups). delta_w: Σ delta
    is rms_norm'ed with it before the add (Gemma 3's sandwich norm, `SANDWICH_FUSED`), in one program a row."""
    from pallas_kernels import norm

    pallas = resolve_implementation(implementation) == "pallas"
    if delta_w is not None:
        if pallas:
            return norm.rms_norm_quant_pallas(x, delta, w, eps, delta_w=delta_w, num_warps=SANDWICH_NORM_WARPS)
        return norm.rms_norm_quant_ref(x, delta, w, eps, delta_w=delta_w)
    if _norm_in_gemv(x, implementation):
        return norm.rms_norm_defer_pallas(x, delta, w, eps, chunk_groups=NORM_QUANT_CHUNK_GROUPS,
                                          interpret=not pallas)
    row_scale = _row_scale_codes(x, consumer)
    if pallas:
        prefill = math.prod(x.shape[:-1]) > norm.MAX_QUANT_ROWS  # `PREFILL_CODES = "all"` sends these here
        chunk = None if row_scale else PREFILL_NORM_CHUNK_GROUPS if prefill else NORM_QUANT_CHUNK_GROUPS
        return norm.rms_norm_quant_pallas(x, delta, w, eps, chunk_groups=chunk, row_scale=row_scale)
    return norm.rms_norm_quant_ref(x, delta, w, eps, row_scale=row_scale)


def rope_inv_freq(cfg: LlamaConfig, *, local: bool = False) -> np.ndarray:
    """[Dh/2] f32 inverse frequencies, with `cfg.rope_scaling` applied (Llama 3's, or linear). local: those of the
    sliding-window layers where they have their own base (`cfg.rope_local_theta`, Gemma 3; never scaled)."""
    dh = cfg.head_dim
    if local and cfg.rope_local_theta is not None:
        cfg = dataclasses.replace(cfg, rope_theta=cfg.rope_local_theta, rope_scaling=None)
    inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, dh, 2, dtype=np.float64) / dh))
    s = cfg.rope_scaling
    if s is None:
        return inv_freq.astype(np.float32)
    if s.rope_type == "linear":
        return (inv_freq / s.factor).astype(np.float32)
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_tables(positions: jax.Array, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """positions [B, T] → (cos, sin), each f32 [B, T, 1, Dh], shared by every layer."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [B, T, Dh/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # [B, T, 1, Dh]
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [B, T, N, Dh] rotated by the tables of `rope_tables` (rotate-half layout, in x's dtype)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)  # [B, T, N, Dh]
    return x * cos.astype(x.dtype) + rotated * sin.astype(x.dtype)


PER_LAYER_WINDOW = "per-layer"  # a layer's window under a traced layer index where layers differ (Gemma 3's scans):
# only its mask knows it, so the attention kernels, which take the window as a number, step aside


def layer_is_local(cfg: LlamaConfig, layer_index) -> bool | jax.Array:
    """Whether layer `layer_index` (an int, or a traced int32 under a scan) attends through `cfg.sliding_window`:
    every layer of a Mistral-style config, all but `cfg.global_layers` in a Gemma 3 one."""
    if not cfg.sliding_window:
        return False
    if not cfg.global_layers:
        return True
    return _layer_not_in(cfg, layer_index, cfg.global_layers, "global and sliding-window layers")


def _layer_not_in(cfg: LlamaConfig, layer_index, ids: tuple[int, ...], kind: str) -> bool | jax.Array:
    """layer_index ∉ ids, for an int or a traced int32; without an index, a ValueError naming what the layers differ
    in (`kind`)."""
    if layer_index is None:
        raise ValueError(f"this {cfg.model_type} model has {kind}: pass layer_index")
    if isinstance(layer_index, (int, np.integer)):
        return int(layer_index) not in ids
    return jnp.logical_not(jnp.isin(layer_index, jnp.asarray(ids, jnp.int32)))


def _positional(cfg: LlamaConfig, positions: jax.Array, k_pos: jax.Array):
    """What the layers' attention shares: (RoPE tables, mask [B, T, S]) of the global layers and, where the
    sliding-window layers differ (Gemma 3), theirs; else (tables, mask, None, None) for every layer."""
    local = cfg.sliding_window is not None and cfg.rope_local_theta is not None
    rope = rope_tables(positions, rope_inv_freq(cfg, local=local and not cfg.global_layers))
    if not cfg.global_layers:
        return rope, _attention_mask(positions, k_pos, cfg.sliding_window), None, None
    local_rope = rope_tables(positions, rope_inv_freq(cfg, local=True)) if local else rope
    return rope, _attention_mask(positions, k_pos, None), local_rope, _attention_mask(positions, k_pos, cfg.sliding_window)


def _layer_attention(cfg: LlamaConfig, index, shared):
    """Layer `index`'s (RoPE tables, mask, window) from `_positional`'s shared arrays: its kind's (chosen with
    jnp.where under a traced index; the window is then PER_LAYER_WINDOW), and the identity tables for a NoPE layer."""
    rope, mask, local_rope, local_mask = shared
    window = cfg.sliding_window
    if local_mask is not None:
        local = layer_is_local(cfg, index)
        if isinstance(local, (bool, np.bool_)):
            rope, mask, window = (local_rope, local_mask, window) if local else (rope, mask, None)
        else:
            rope = tuple(jnp.where(local, a, b) for a, b in zip(local_rope, rope))
            mask, window = jnp.where(local, local_mask, mask), PER_LAYER_WINDOW
    return _rope_for(rope, layer_uses_rope(cfg, index)), mask, window


def _attention_mask(q_pos: jax.Array, k_pos: jax.Array, sliding_window: int | None) -> jax.Array:
    """q_pos [B, T], k_pos [B, S] → bool [B, T, S]: causal, and within the sliding window if any."""
    diff = q_pos[:, :, None] - k_pos[:, None, :]  # [B, T, S]
    mask = diff >= 0
    if sliding_window is not None:
        mask &= diff < sliding_window
    return mask


ATTENTION = "auto"  # "auto" (default): cached steps of ≤ attention.MAX_ROWS query rows per KV head (decode)
# attend in one Pallas launch on the Pallas path; "always": the kernels on every path (interpret mode off the
# GPU; tests); "xla": `attend_ref`, XLA's dots and softmax. W4.4A8 decode +8 % at b1, +13 % at b32, bf16
# +4 % / +8 % (H200, 2026-12-03, benchmarks/NOTES-kernels.md items 49, 52)
ATTENTION_FUSED = True  # with the kernel on: a fused q/k/v projection and a per-layer cache take
# `attend_new_tokens_pallas` (RoPE, the cache write and attention in one launch on the projection's split-K
# partials); False, or a stacked cache or separate q/k/v: `decode_attention_pallas` after XLA's RoPE and write
ATTENTION_CODES = True  # with the fused step on, a mixed o_proj without bias on the decode tiles (3 …
# norm.MAX_QUANT_ROWS tokens; the GEMV quantizes its own input) and one split of 128-wide heads, or multiples of 128
# with `attention.WIDE_HEAD_CODES` (`attention.codes_in_kernel`: with Llama-3-8B's 8 KV heads b ≥ 16, and b8 on caches
# of ≤ 512 positions): the attention kernel hands o_proj its int8 codes, so o_proj's quantization launch goes (and
# at b8 the splits' merge). H100, 2026-12-06: b32 +0.9 %, b16 +0.7 %, b8 +2.6 % (NOTES-kernels.md item 124); False:
# o_proj quantizes the attention's bf16 output itself


PREFILL_ATTENTION = "auto"  # attention of chunks the decode kernel does not take (prefill): "auto" (default)
# runs cuDNN's fused flash attention (`jax.nn.dot_product_attention(implementation="cudnn")`) on an NVIDIA GPU
# of compute capability ≥ 8.0 when the queries are bf16/f16 and the cache is float, the same for float and
# quantized weights; "xla": `attend_ref` always (it materialises the [B, H, T, S] f32 scores: ≈ a third of a
# 2048-token prefill on the H200, benchmarks/NOTES-kernels.md item 61)


def _cudnn_attention_on(q: jax.Array, kv_heads: int, k_scale, implementation: Implementation) -> bool:
    """cuDNN for prompt-shaped chunks only (q [B, T, H, Dh]): more query rows a KV head than the decode kernel
    holds (`attention.MAX_ROWS`). Decode-shaped chunks on XLA's path (`ATTENTION = "xla"`) keep `attend_ref`:
    cuDNN at one token a step cost XLA's bf16 decode 15 % at b1 (183 against 216 tok/s, H200, session 20)."""
    from pallas_kernels.attention import MAX_ROWS

    if PREFILL_ATTENTION not in ("auto", "xla"):
        raise ValueError(f"mixjax.model.PREFILL_ATTENTION = {PREFILL_ATTENTION!r}; expected 'auto' or 'xla'")
    rows = q.shape[1] * (q.shape[2] // kv_heads)
    return (PREFILL_ATTENTION == "auto" and rows > MAX_ROWS and k_scale is None
            and q.dtype in (jnp.bfloat16, jnp.float16) and q.shape[-1] % 8 == 0
            and q.shape[-1] <= cudnn_head_dim_limit() and resolve_implementation(implementation) == "pallas")


def _attention_kernel_on(T: int, cfg: LlamaConfig, implementation: Implementation) -> bool:
    from pallas_kernels.attention import MAX_ROWS

    if ATTENTION not in ("xla", "auto", "always"):
        raise ValueError(f"mixjax.model.ATTENTION = {ATTENTION!r}; expected 'xla', 'auto' or 'always'")
    dh = cfg.head_dim
    if ATTENTION == "xla" or T * (cfg.num_attention_heads // cfg.num_key_value_heads) > MAX_ROWS:
        return False
    if dh < 16 or dh & (dh - 1):  # the kernel's tiles are powers of two
        return False
    return ATTENTION == "always" or resolve_implementation(implementation) == "pallas"


# ----------------------------------------------------------------------------------------------------
# KV cache


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Keys/values of every layer for decoding.

    k, v: per layer [B, KVH, S, Dh] in the cache dtype (RoPE already applied to k), held either as a
    tuple of L arrays (the default; pairs with tuple layers and a Python loop) or stacked into one
    [L, B, KVH, S, Dh] array (pairs with stacked layers and `lax.scan`). `forward_step` converts a cache
    whose form does not match the params once and returns it in the matching form. Per-layer arrays
    with heads before positions let XLA update and read each layer in place: on an H100 (Llama-3-8B
    shape, bf16, tuple layers, 2048 positions) a batch-32 decode step takes 11.9 ms against 38.3 ms with
    a stacked [L, B, S, KVH, Dh] cache.
    length: [B] int32, the number of valid positions of each row.
    k_scale/v_scale: None for float caches. For an int8 cache (`init_cache(..., dtype=jnp.int8)`, MixLLM's
    Table 8 KV8), per layer [B, KVH, S] symmetric scales, one per (row, head, position), in the form of
    k/v: keys and values are quantized as they are written (w ≈ q·s, q ∈ [-127, 127], s = max |x| / 127
    over the head dim) and dequantized inside attention.
    v_block: 0, or (an int8 cache whose length is a multiple of it) v in blocks of that many positions, each
    block stored [Dh, v_block] in the same [B, KVH, S, Dh] array (`pallas_kernels.attention.block_values`;
    `values(layer)` gives the position-major values). Static: part of the pytree's structure.
    """

    k: jax.Array | tuple[jax.Array, ...]
    v: jax.Array | tuple[jax.Array, ...]
    length: jax.Array
    k_scale: jax.Array | tuple[jax.Array, ...] | None = None
    v_scale: jax.Array | tuple[jax.Array, ...] | None = None
    v_block: int = dataclasses.field(default=0, metadata=dict(static=True))

    @property
    def stacked(self) -> bool:
        return not isinstance(self.k, (tuple, list))

    def _first(self) -> jax.Array:
        return self.k if self.stacked else self.k[0]

    @property
    def max_len(self) -> int:
        return self._first().shape[-2]

    @property
    def batch(self) -> int:
        return self._first().shape[-4]

    def values(self, layer: int) -> jax.Array:
        """Layer `layer`'s values [B, KVH, S, Dh], position-major whatever `v_block` is."""
        return unblock_values(self.v[layer], self.v_block)


INT8_V_BLOCK = True  # int8 caches whose length is a multiple of `attention.V_BLOCK` store v in its blocks


def cache_length(positions: int, dtype) -> int:
    """The cache length `generate` builds for `positions`: an int8 cache rounded up to whole value blocks (the
    order the decode kernel reads fastest), a float one as it is."""
    if jnp.dtype(dtype) == jnp.int8:
        return -(-positions // V_BLOCK) * V_BLOCK
    return positions


def init_cache(cfg: LlamaConfig, batch: int, max_len: int, dtype=jnp.bfloat16, *, stacked: bool = False,
               scale_dtype=jnp.float32) -> KVCache:
    """An empty cache for `batch` sequences of up to `max_len` positions (per-layer tuple by default).

    dtype: a float dtype, or jnp.int8 for an int8 cache with per-(row, head, position) scales in
    `scale_dtype` (f32 or bf16; half the cache memory of bf16 plus 4/Dh or 2/Dh for the scales). An int8
    cache whose max_len is a multiple of 64 (`attention.V_BLOCK`) stores its values in blocks of 64 positions
    (`KVCache.v_block`), which the decode kernel reads faster (`generate` rounds its int8 caches up to one).
    """
    dtype, scale_dtype = jnp.dtype(dtype), jnp.dtype(scale_dtype)
    quantized = dtype == jnp.int8
    if not (quantized or jnp.issubdtype(dtype, jnp.floating)):
        raise ValueError(f"init_cache: dtype={dtype} is not supported; use a float dtype or jnp.int8")
    if quantized and scale_dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
        raise ValueError(f"init_cache: scale_dtype={scale_dtype} is not supported; use jnp.float32 or jnp.bfloat16")
    shape = (batch, cfg.num_key_value_heads, max_len, cfg.head_dim)  # [B, KVH, S, Dh]

    def zeros(shape, dtype):
        if stacked:
            return jnp.zeros((cfg.num_hidden_layers, *shape), dtype)
        return tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_hidden_layers))

    scales = (lambda: zeros(shape[:3], scale_dtype)) if quantized else (lambda: None)  # noqa: E731
    v_block = V_BLOCK if quantized and INT8_V_BLOCK and max_len % V_BLOCK == 0 else 0
    return KVCache(k=zeros(shape, dtype), v=zeros(shape, dtype), length=jnp.zeros((batch,), jnp.int32),
                   k_scale=scales(), v_scale=scales(), v_block=v_block)


def _cache_as(cache: KVCache, stacked: bool) -> KVCache:
    """The same cache stacked into [L, ...] arrays or split into per-layer tuples."""
    if cache.stacked == stacked:
        return cache
    convert = (lambda a: jnp.stack(a)) if stacked else (lambda a: tuple(a))  # noqa: E731
    fields = {f: getattr(cache, f) for f in ("k", "v", "k_scale", "v_scale")}
    return dataclasses.replace(cache, **{f: None if a is None else convert(a) for f, a in fields.items()})


def _quantize_kv(x: jax.Array, scale_dtype) -> tuple[jax.Array, jax.Array]:
    """x [B, T, KVH, Dh] → (int8 codes [B, T, KVH, Dh], scales [B, T, KVH]): symmetric, x ≈ q·s."""
    amax = jnp.max(jnp.abs(x.astype(jnp.float32)), axis=-1)  # [B, T, KVH]
    # the stored scale's rounding, as an op XLA keeps: with its default excess precision, XLA on the GPU may drop
    # a convert to bf16 and back, so the codes would be made against the unrounded scale (up to 127 × 2^-8 of a
    # step off the stored one; H200, sessions 23–24: the int8-cache test's code ≈ 1.1 steps from the float key)
    fi = jnp.finfo(scale_dtype)
    s = jax.lax.reduce_precision(amax / 127.0, exponent_bits=fi.nexp, mantissa_bits=fi.nmant)
    scale = s.astype(scale_dtype)  # exact: s is representable in scale_dtype
    q = jnp.round(x.astype(jnp.float32) / jnp.where(s > 0, s, 1.0)[..., None])
    return jnp.clip(q, -127, 127).astype(jnp.int8), scale


CACHE_WRITE = "scatter_t"  # how a chunk of T > 1 tokens' keys and values go into the cache: "scatter_t" (the
# chunk transposed to the store's [B, KVH, T, Dh] order, one index per (row, head, position), declared unique and
# sorted) or "scatter" (XLA's scatter of [B, T] positions with [KVH, Dh] windows, the form before session 23);
# positions past S are dropped by both. H200, 2048 tokens (session 23, NOTES-kernels.md item 83): "scatter" took
# 1.2 ms of every prefill, bf16 and quantized alike; "scatter_t" −0.6 to −1.0 ms a prefill


def _write_cache(store: jax.Array, scale_store: jax.Array | None, index: jax.Array | None, new: jax.Array,
                 positions: jax.Array, v_block: int = 0):
    """Writes new [B, T, KVH, Dh] at positions [B, T] into one layer of the cache.

    store: that layer's [B, KVH, S, Dh] (index None) or the stacked [L, B, KVH, S, Dh] (index = layer);
    scale_store: None for a float cache, else the matching [B, KVH, S] / [L, B, KVH, S] scales (the new
    keys/values are quantized to int8 first). Only the T new positions are written, in place on a carried
    or donated buffer; positions past S are dropped. Returns (store, scale_store, the layer's
    [B, KVH, S, Dh] view, the layer's [B, KVH, S] scales or None). v_block > 0: a value store in
    `attention.block_values`' order, written so (the view too keeps that order).
    """
    rows = jnp.arange(new.shape[0])[:, None]  # [B, 1]
    scale = None
    if scale_store is None:
        new = new.astype(store.dtype)
    else:
        new, scale = _quantize_kv(new, scale_store.dtype)  # [B, T, KVH, Dh], [B, T, KVH]
    if v_block:  # the blocked order: a position's Dh values v_block apart, as a [B, KVH, S/v_block, Dh, v_block] view
        return _write_blocked(store, scale_store, index, new, scale, positions, v_block)
    if CACHE_WRITE == "scatter_t" and new.shape[1] > 1:  # in the store's order: [B, KVH, T, Dh] windows of Dh
        heads = jnp.arange(new.shape[2])[None, :, None]  # [1, KVH, 1]
        at = (rows[:, :, None], heads, positions[:, None, :])  # → [B, KVH, T]
        at = at if index is None else (index, *at)
        flags = dict(mode="drop", unique_indices=True, indices_are_sorted=True)
        new, scale = new.transpose(0, 2, 1, 3), None if scale is None else scale.transpose(0, 2, 1)
    else:
        at = (rows, slice(None), positions) if index is None else (index, rows, slice(None), positions)
        flags = dict(mode="drop")
    store = store.at[at].set(new, **flags)
    if scale_store is not None:
        scale_store = scale_store.at[at].set(scale, **flags)
    if index is None:
        return store, scale_store, store, scale_store
    return store, scale_store, store[index], None if scale_store is None else scale_store[index]


def _write_blocked(store, scale_store, index, new, scale, positions, v_block: int):
    """`_write_cache` for a value store in blocks of v_block positions (int8: `scale` holds the new scales)."""
    B, T, KVH, Dh = new.shape
    S = store.shape[-2]
    view = store.reshape(*store.shape[:-2], S // v_block, Dh, v_block)
    # in the store's order, as CACHE_WRITE's "scatter_t": indices [B, KVH, T] (sorted, unique), windows of Dh
    rows, heads, pos = jnp.arange(B)[:, None, None], jnp.arange(KVH)[None, :, None], positions[:, None, :]
    # (a position past S has a block index past the blocks, S being a multiple of v_block: dropped)
    at = (rows, heads, pos // v_block, slice(None), pos % v_block)  # advanced indices [B, KVH, T], then Dh
    at = at if index is None else (index, *at)
    view = view.at[at].set(new.transpose(0, 2, 1, 3), mode="drop", unique_indices=True, indices_are_sorted=True)
    store = view.reshape(store.shape)
    scale_at = (jnp.arange(B)[:, None], slice(None), positions)
    scale_at = scale_at if index is None else (index, *scale_at)
    scale_store = scale_store.at[scale_at].set(scale, mode="drop")
    if index is None:
        return store, scale_store, store, scale_store
    return store, scale_store, store[index], scale_store[index]


# ----------------------------------------------------------------------------------------------------
# The decoder


def _decoder_layer(
    layer: dict[str, Any],
    x: jax.Array,  # [B, T, D]
    positions: jax.Array,  # [B, T] int32
    rope: tuple[jax.Array, jax.Array],  # this layer's cos, sin [B, T, 1, Dh] (`_layer_attention`)
    mask: jax.Array,  # [B, T, S] bool, S = T without a cache: this layer's
    cache_kv: tuple | None,  # (k store, v store, k scales, v scales, index), see _write_cache
    cfg: LlamaConfig,
    implementation: Implementation,
    pending: jax.Array | None = None,
    defer: bool = False,
    v_block: int = 0,  # the cache's `KVCache.v_block`
    window: int | str | None = None,  # this layer's sliding window (None: global), or PER_LAYER_WINDOW
):
    """One pre-norm decoder layer. Returns (x [B, T, D], updated (k, v, k scales, v scales) stores or None,
    deferred): `pending`, the previous layer's deferred down_proj partials f32 [S, B, T, D], is added to x
    here (by the input norm's kernel when it takes partials); with `defer`, this layer's own down_proj
    partials come back as `deferred` instead of being added (None when they were added)."""
    B, T, _ = x.shape
    H, KVH, Dh = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    static_window = not isinstance(window, str)  # else only the mask knows it: no attention kernel
    scores = attention_scores(cfg)  # Gemma 2: the scores' factor and soft cap, for every attention path but cuDNN's

    def proj(name, h):
        p = get_path(layer, name)
        return linear(h, p["weight"], p.get("bias"), implementation=implementation)

    def projs(group, h):  # the group's linears sharing the input h: one call on their fused weight if present
        members, fused_name = _FUSED[group]
        if fused_name in layer[group]:
            sizes = [_out_features(name, cfg) for name in members]
            return jnp.split(proj(f"{group}.{fused_name}", h), np.cumsum(sizes)[:-1].tolist(), axis=-1)
        return [proj(f"{group}.{name}", h) for name in members]

    from pallas_kernels.format import MixedWeight
    from pallas_kernels.norm import MAX_QUANT_ROWS

    def consumers(group):  # the weights that read the norm's output
        members, fused_name = _FUSED[group]
        names = [fused_name] if fused_name in layer[group] else members
        return [layer[group][name]["weight"] for name in names]

    eps = cfg.rms_norm_eps
    interpret = resolve_implementation(implementation) != "pallas"
    kernel = cache_kv is not None and static_window and _attention_kernel_on(T, cfg, implementation)
    qkv = layer["self_attn"].get(_FUSED["self_attn"][1])
    fused_attention = kernel and ATTENTION_FUSED and qkv is not None and cache_kv[4] is None
    o_proj = layer["self_attn"]["o_proj"]
    attn_codes = fused_attention and _attention_codes_on(o_proj, B * T, cache_kv[0])
    rms = None  # with NORM_DEFER_RMS: the input norm's r, applied by the attention kernel
    if _norm_quant_on(consumers("self_attn"), x, implementation):  # int8 codes for q/k/v
        if fused_attention and _defer_rms(x, implementation):
            x, h, rms = norm_codes(x, pending, layer["input_layernorm"], eps, implementation)
        else:
            x, h = norm_quant(x, pending, layer["input_layernorm"], eps, implementation)
    else:
        x = x if pending is None else add_partials(x, pending)
        h = rms_norm(x, layer["input_layernorm"], eps)
    if fused_attention:
        # projection → RoPE → cache write → attention in one launch, on the projection's split-K partials
        k_store, v_store, ks_store, vs_store, _ = cache_kv
        w = qkv["weight"]
        src = w.matmul(h, implementation=implementation, partials=True) if isinstance(w, MixedWeight) else \
            linear(h, w, implementation=implementation)  # [S, B, T, W] f32 or [B, T, W]
        attn, *new_cache = attend_new_tokens_pallas(
            src, positions, *rope, k_store, v_store, heads=H, kv_heads=KVH, dtype=x.dtype, bias=qkv.get("bias"),
            k_scale_store=ks_store, v_scale_store=vs_store, sliding_window=window, rms=rms,
            codes=attn_codes, v_block=v_block, interpret=interpret, norm_eps=eps,
            qk_norm=(query_norm_weight(layer, cfg), layer["k_norm"]) if cfg.qk_norm else None, **scores)
        new_cache = tuple(new_cache)
    else:
        q, k, v = projs("self_attn", h)
        q, k = q.reshape(B, T, H, Dh), k.reshape(B, T, KVH, Dh)
        if cfg.qk_norm:
            q, k = rms_norm(q, query_norm_weight(layer, cfg), eps), rms_norm(k, layer["k_norm"], eps)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        v = v.reshape(B, T, KVH, Dh)
        if cache_kv is None:
            keys, values = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, KVH, T, Dh]
            k_scale = v_scale = new_cache = None
        else:
            k_store, v_store, ks_store, vs_store, index = cache_kv
            k_store, ks_store, keys, k_scale = _write_cache(k_store, ks_store, index, k, positions)  # [B, KVH, S, Dh]
            v_store, vs_store, values, v_scale = _write_cache(v_store, vs_store, index, v, positions, v_block)
            new_cache = (k_store, v_store, ks_store, vs_store)
        if kernel:
            attn = decode_attention_pallas(q, keys, values, positions, sliding_window=window,
                                           k_scale=k_scale, v_scale=v_scale, v_block=v_block, interpret=interpret,
                                           **scores)
        elif static_window and "softcap" not in scores and _cudnn_attention_on(q, KVH, k_scale, implementation):
            attn = prefill_attention(q, keys, values, mask, positions, window, scores.get("scale"))
        else:  # (XLA reads the values position-major)
            attn = attend_ref(q, keys, unblock_values(values, v_block), mask, k_scale, v_scale, **scores)
    if attn_codes:  # o_proj's codes, from the attention kernel's epilogue
        o_in = attn
    else:
        attn = attn.reshape(B, T, H * Dh)
        o_in = _o_proj_input(attn, implementation) if isinstance(o_proj["weight"], MixedWeight) else attn
    decode_rows = B * T <= MAX_QUANT_ROWS  # more rows (prefill codes): outputs in x's dtype, not f32 partials
    gate_up = layer["mlp"].get(_FUSED["mlp"][1])
    swiglu_codes = gate_up is not None and _swiglu_quant_on(gate_up, layer["mlp"]["down_proj"], x, implementation)
    rms = None  # with NORM_DEFER_RMS: the post-attention norm's r, applied by the SwiGLU kernel
    sandwich = cfg.sandwich_norms  # Gemma 3: each branch's output normalized before its residual add
    if _norm_quant_on(consumers("mlp"), x, implementation) and sandwich and _sandwich_fused(o_proj, x, implementation):
        # o_proj's partials → their sum normalized (attn_output_norm) → residual add, norm and codes: one launch
        delta = o_proj["weight"].matmul(o_in, implementation=implementation, partials=True)  # [S, B, T, D]
        x, h = norm_quant(x, delta, layer["post_attention_layernorm"], eps, implementation, "gate_up",
                          delta_w=layer["attn_output_norm"])
    elif _norm_quant_on(consumers("mlp"), x, implementation):  # residual add, norm and quantization: one launch
        if sandwich:
            delta = rms_norm(proj("self_attn.o_proj", o_in), layer["attn_output_norm"], eps)
        elif decode_rows and isinstance(o_proj["weight"], MixedWeight) and o_proj.get("bias") is None:  # partials
            delta = o_proj["weight"].matmul(o_in, implementation=implementation, partials=True)  # [S, B, T, D]
        else:
            delta = proj("self_attn.o_proj", o_in)
        if swiglu_codes and _defer_rms(x, implementation):
            x, h, rms = norm_codes(x, delta, layer["post_attention_layernorm"], eps, implementation)
        else:
            x, h = norm_quant(x, delta, layer["post_attention_layernorm"], eps, implementation, "gate_up")
    else:
        out = proj("self_attn.o_proj", o_in)
        x = x + (rms_norm(out, layer["attn_output_norm"], eps) if sandwich else out)
        h = rms_norm(x, layer["post_attention_layernorm"], eps)
    if swiglu_codes:
        # the gate/up partials → SiLU(gate)·up → int8 codes for down_proj, one launch
        from pallas_kernels import swiglu

        parts = gate_up["weight"].matmul(h, implementation=implementation, partials=decode_rows)  # [S, B, T, 2F] f32
        quant = swiglu.silu_mul_quant_pallas if resolve_implementation(implementation) == "pallas" else \
            swiglu.silu_mul_quant_ref
        gated = quant(parts, x.dtype, partials=decode_rows, rms=rms, row_scale=_row_scale_codes(x, "down"),
                      act=cfg.mlp_act)
    else:
        gate, up = projs("mlp", h)
        gated = mlp_activation(cfg.mlp_act)(gate) * up  # [B, T, F]
    down = layer["mlp"]["down_proj"]
    if defer and isinstance(down["weight"], MixedWeight) and down.get("bias") is None:
        return x, new_cache, down["weight"].matmul(gated, implementation=implementation, partials=True)
    out = proj("mlp.down_proj", gated)
    x = x + (rms_norm(out, layer["mlp_output_norm"], eps) if sandwich else out)
    return x, new_cache, None


def attention_scores(cfg: LlamaConfig) -> dict:
    """The attention paths' `scale` and `softcap` keywords for the config (`attend_ref`, the decode kernels; empty for
    a Llama). cuDNN's prefill attention takes the scale, not the cap (Gemma 2's prompts attend through XLA)."""
    out = {}
    if cfg.query_pre_attn_scalar is not None and not cfg.qk_norm:  # (with head norms: `query_norm_weight`)
        out["scale"] = cfg.query_pre_attn_scalar ** -0.5
    if cfg.attn_logit_softcap is not None:
        out["softcap"] = cfg.attn_logit_softcap
    return out


def query_norm_weight(layer: dict, cfg: LlamaConfig) -> jax.Array:
    """The query head norm's weight, × √(head_dim / query_pre_attn_scalar) where the config scales attention scores by
    that scalar (gemma-3-27b): every attention path then applies its usual 1/√head_dim (RoPE is linear)."""
    w = layer["q_norm"]
    if cfg.query_pre_attn_scalar is None:
        return w
    return (w.astype(jnp.float32) * math.sqrt(cfg.head_dim / cfg.query_pre_attn_scalar)).astype(w.dtype)


def mlp_activation(kind: str):
    """`LlamaConfig.mlp_act`'s function: SiLU (SwiGLU), or GELU's tanh form (Gemma's GeGLU, transformers'
    gelu_pytorch_tanh)."""
    return jax.nn.silu if kind == "silu" else functools.partial(jax.nn.gelu, approximate=True)


def _attention_codes_on(o_proj: dict, rows: int, k_store: jax.Array) -> bool:
    """`ATTENTION_CODES`' condition, for a decode step of `rows` tokens that takes the fused attention kernel."""
    from pallas_kernels.api import GEMV_MAX_M
    from pallas_kernels.attention import codes_in_kernel
    from pallas_kernels.format import MixedWeight
    from pallas_kernels.norm import MAX_QUANT_ROWS

    if not ATTENTION_CODES or not isinstance(o_proj["weight"], MixedWeight) or o_proj.get("bias") is not None:
        return False
    B, KVH, S, Dh = k_store.shape
    return GEMV_MAX_M < rows <= MAX_QUANT_ROWS and codes_in_kernel(B, KVH, S, Dh, k_store.dtype.itemsize)


def add_partials(x: jax.Array, partials: jax.Array) -> jax.Array:
    """x + Σ_S partials (f32 [S, *x.shape] summed in f32, rounded to x's dtype before the add: what the
    norm kernels do with them)."""
    return x + jnp.sum(partials, axis=0).astype(x.dtype)


DEFER_DOWN = True  # decode on the Pallas path (norms emitting codes, ≤ norm.MAX_QUANT_ROWS tokens, unstacked
# layers): down_proj's split-K partials go to the next layer's input norm kernel, which adds them to the
# residual, instead of an XLA fusion summing them into x (one launch a layer fewer). H200, b1, 2026-12-03:
# 400 → 369 launches a step, 485.9 → 490.5 tok/s


def _defer_down(layers, x, cfg: LlamaConfig, implementation) -> bool:
    from pallas_kernels.norm import MAX_QUANT_ROWS

    if (not DEFER_DOWN or NORM_QUANT == "never" or cfg.sandwich_norms or len(layers) < 2
            or math.prod(x.shape[:-1]) > MAX_QUANT_ROWS):  # (a sandwich norm must see down_proj's whole output)
        return False  # (at prefill the next norm takes down_proj's output in the activations' dtype instead)
    return _norm_quant_on([layers[1]["mlp"]["down_proj"]["weight"]], x, implementation)


def decoder_layer(layer: dict[str, Any], x: jax.Array, cfg: LlamaConfig, *, layer_index=None,
                  implementation: Implementation = "auto") -> jax.Array:
    """One decoder layer on full causal sequences at positions 0..T-1, no cache: x [B, T, D] → [B, T, D].

    The layer-by-layer entry point for tools that run the model one block at a time (quantization
    calibration, salience with per-layer rematerialisation). layer_index (an int or a traced int32): which layer
    this is, needed where layers differ (`cfg.nope_layers`, SmolLM3's layers without RoPE; `cfg.global_layers`,
    Gemma 3's global and sliding-window layers).
    """
    B, T, _ = x.shape
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    rope, mask, window = _layer_attention(cfg, layer_index, _positional(cfg, positions, positions))
    return _decoder_layer(layer, x, positions, rope, mask, None, cfg, implementation, window=window)[0]


def layer_uses_rope(cfg: LlamaConfig, layer_index) -> bool | jax.Array:
    """Whether layer `layer_index` (an int, or a traced int32 under a scan) applies RoPE: every layer but
    `cfg.nope_layers`. Raises if the config has NoPE layers and no index is given."""
    if not cfg.nope_layers:
        return True
    return _layer_not_in(cfg, layer_index, cfg.nope_layers, f"layers without RoPE ({cfg.nope_layers})")


def _rope_for(rope: tuple[jax.Array, jax.Array], use_rope) -> tuple[jax.Array, jax.Array]:
    """RoPE's tables, or for a NoPE layer the identity (cos 1, sin 0: x·1 + rot·0 is x exactly, in every kernel)."""
    if isinstance(use_rope, (bool, np.bool_)) and use_rope:
        return rope
    cos, sin = rope
    return (jnp.where(use_rope, cos, jnp.ones_like(cos)), jnp.where(use_rope, sin, jnp.zeros_like(sin)))


def _run_layers(params, x, positions, cache: KVCache | None, cfg, implementation):
    """All decoder layers: `lax.scan` over stacked layers, a Python loop over a tuple of layers.

    The cache (already in the params' form) is updated in place: per-layer arrays in the loop, the
    stacked arrays carried through the scan. Returns (x, (k, v, k_scale, v_scale) or None).
    """
    layers = params["layers"]
    if cache is None:
        k_pos = positions  # [B, T]
    else:
        B, S = positions.shape[0], cache.max_len
        k_pos = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))  # [B, S]
    shared = _positional(cfg, positions, k_pos)  # RoPE tables and masks [B, T, S]

    def body(x, layer, kv, pending=None, defer=False, index=None):
        v_block = 0 if cache is None else cache.v_block
        rope, mask, window = _layer_attention(cfg, index, shared)
        return _decoder_layer(layer, x, positions, rope, mask, kv, cfg, implementation, pending, defer, v_block,
                              window)

    if isinstance(layers, (tuple, list)):
        defer = _defer_down(layers, x, cfg, implementation)
        n = len(layers)
        stores = None if cache is None else [list(a) if a is not None else [None] * n
                                             for a in (cache.k, cache.v, cache.k_scale, cache.v_scale)]
        pending = None
        for i, layer in enumerate(layers):
            kv = None if cache is None else (*(s[i] for s in stores), None)
            x, new, pending = body(x, layer, kv, pending, defer and i + 1 < n, i)
            if cache is not None:
                for s, a in zip(stores, new):
                    s[i] = a
        if pending is not None:
            x = add_partials(x, pending)
        if cache is None:
            return x, None
        return x, tuple(None if a is None else tuple(s) for a, s in
                        zip((cache.k, cache.v, cache.k_scale, cache.v_scale), stores))

    n_layers = jax.tree.leaves(layers)[0].shape[0]
    if cache is None:
        x, _ = jax.lax.scan(lambda x, xs: (body(x, xs[0], None, index=xs[1])[0], None), x,
                            (layers, jnp.arange(n_layers, dtype=jnp.int32)))
        return x, None

    def cached_body(carry, xs):
        x, stores = carry
        layer, index = xs
        x, stores, _ = body(x, layer, (*stores, index), index=index)
        return (x, stores), None

    stores = (cache.k, cache.v, cache.k_scale, cache.v_scale)
    (x, stores), _ = jax.lax.scan(cached_body, (x, stores), (layers, jnp.arange(n_layers)))
    return x, stores


def embed(params, tokens, cfg: LlamaConfig):
    """tokens [B, T] → embeddings [B, T, D], × `cfg.embed_scale` (Gemma) in their dtype.

    A quantized table (`MixedWeight`, from `QuantConfig.head_bits`) dequantizes only the looked-up rows
    (`pallas_kernels.take_rows`); any other `QuantizedLinear` table (e.g. its `FakeQuantWeight`) its
    dequantized rows. Either comes out in the params' float dtype (that of the final norm).
    """
    table = params["embed_tokens"]
    if not isinstance(table, QuantizedLinear):
        rows = jnp.take(table, tokens, axis=0)  # [B, T, D]
    else:
        from pallas_kernels.format import MixedWeight, take_rows

        rows = take_rows(table, tokens) if isinstance(table, MixedWeight) else \
            jnp.take(table.dequantize(), tokens, axis=0)
        rows = rows.astype(params["norm"].dtype)  # [B, T, D]
    return rows if cfg.embed_scale is None else rows * jnp.asarray(cfg.embed_scale, rows.dtype)


def final_logits(params, x, cfg, implementation):
    """Final norm + LM head: hidden states [B, T, D] → f32 logits [B, T, V].

    The head may be a `QuantizedLinear` (a `MixedWeight` from `QuantConfig.head_bits`, shared with the
    embedding when tied): it then runs through `linear` like a decoder linear (int8 activations)."""
    head = params["embed_tokens"] if cfg.tie_word_embeddings else params["lm_head"]
    if _norm_quant_on([head], x, implementation):
        _, x = norm_quant(x, None, params["norm"], cfg.rms_norm_eps, implementation, "head")
    else:
        x = rms_norm(x, params["norm"], cfg.rms_norm_eps)
    logits = linear(x, head, implementation=implementation).astype(jnp.float32)  # [B, T, V]
    cap = cfg.final_logit_softcap
    return logits if cap is None else cap * jnp.tanh(logits / cap)


LOGITS_AT = ("all", "last")


def _check_tokens(tokens, cfg: LlamaConfig) -> None:
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [B, T]; got shape {tokens.shape}")
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise TypeError(f"tokens must be integer token ids; got dtype {tokens.dtype}")
    if not isinstance(tokens, jax.core.Tracer) and tokens.size:
        lo, hi = int(jnp.min(tokens)), int(jnp.max(tokens))
        if lo < 0 or hi >= cfg.vocab_size:
            raise ValueError(
                f"token ids must lie in [0, vocab_size={cfg.vocab_size}); got min {lo}, max {hi} "
                "(is the tokenizer the model's own?)"
            )


def forward(params, tokens: jax.Array, cfg: LlamaConfig, *, implementation: Implementation = "auto") -> jax.Array:
    """tokens [B, T] int → logits [B, T, V] f32 (positions 0..T-1, causal)."""
    tokens = jnp.asarray(tokens) if not isinstance(tokens, jax.Array) else tokens
    _check_tokens(tokens, cfg)
    B, T = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    x, _ = _run_layers(params, embed(params, tokens, cfg), positions, None, cfg, implementation)
    return final_logits(params, x, cfg, implementation)


def forward_step(
    params,
    tokens: jax.Array,
    cfg: LlamaConfig,
    cache: KVCache,
    *,
    num_valid: jax.Array | None = None,
    logits_at: str = "all",
    implementation: Implementation = "auto",
) -> tuple[jax.Array, KVCache]:
    """Runs tokens [B, T] at positions cache.length[b] + t; returns (logits f32, new cache).

    num_valid [B] (default T): the first num_valid[b] tokens of row b are real, the rest right padding;
    the new length is length + num_valid. Logits at padded positions are meaningless.
    logits_at: "all" → logits [B, T, V]; "last" → [B, 1, V], only at each row's last real token
    (position num_valid[b] - 1; 0 when num_valid[b] is 0), so a prefill never materialises [B, T, V]
    (Llama-3-8B, 2048 tokens: 1 GB of f32 logits). The returned cache has the params' form (stacked or
    per-layer tuple; see `KVCache`).
    """
    if logits_at not in LOGITS_AT:
        raise ValueError(f"logits_at={logits_at!r}; expected one of {LOGITS_AT}")
    tokens = jnp.asarray(tokens) if not isinstance(tokens, jax.Array) else tokens
    _check_tokens(tokens, cfg)
    B, T = tokens.shape
    if cache.batch != B:
        raise ValueError(f"tokens have batch {B} but the cache was built for batch {cache.batch}")
    if T > cache.max_len:
        raise ValueError(f"{T} tokens do not fit a cache of max_len={cache.max_len}; build a longer cache")
    num_valid = jnp.full((B,), T, jnp.int32) if num_valid is None else jnp.asarray(num_valid, jnp.int32)
    if num_valid.shape != (B,):
        raise ValueError(f"num_valid must have shape (B,) = ({B},); got {num_valid.shape}")
    _check_fits(cache, num_valid, T)
    positions = cache.length[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]  # [B, T]
    cache = _cache_as(cache, stacked=not isinstance(params["layers"], (tuple, list)))
    x, (k, v, k_scale, v_scale) = _run_layers(params, embed(params, tokens, cfg), positions, cache, cfg, implementation)
    if logits_at == "last":
        last = jnp.maximum(num_valid - 1, 0)[:, None, None]  # [B, 1, 1]
        x = jnp.take_along_axis(x, last, axis=1)  # [B, 1, D]
    logits = final_logits(params, x, cfg, implementation)
    new_cache = dataclasses.replace(cache, k=k, v=v, k_scale=k_scale, v_scale=v_scale, length=cache.length + num_valid)
    return logits, new_cache


def _check_fits(cache: KVCache, num_valid: jax.Array, T: int) -> None:
    if isinstance(cache.length, jax.core.Tracer) or isinstance(num_valid, jax.core.Tracer):
        return
    if num_valid.size and (int(jnp.min(num_valid)) < 0 or int(jnp.max(num_valid)) > T):
        raise ValueError(f"num_valid must lie in [0, T={T}]; got {np.asarray(num_valid).tolist()}")
    end = int(jnp.max(cache.length + num_valid)) if num_valid.size else 0
    if end > cache.max_len:
        raise ValueError(
            f"sequence of {end} positions does not fit the cache (max_len={cache.max_len}); "
            "shorten the prompt or build a longer cache with init_cache(..., max_len=...)"
        )
