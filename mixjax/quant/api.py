"""`mixjax.quantize` and `mixjax.salience`: MixLLM global mixed-precision post-training quantization.

Pipeline (`quantize`):
1. salience of every output channel of every decoder linear on the float model (`salience.py`);
2. one global ranking → the 8-bit channels within the bit budget (`allocate.py`);
3. layer by layer, as GPTQ does: run decoder layer i on the calibration hidden states (which come out
   of the already quantized layers < i), accumulate H = 2·XᵀX of each linear's input over the
   calibration batches (memory: one [K, K] per linear of one layer, never all inputs), quantize the
   layer's linears (GPTQ and/or clipping search, or RTN), then run the quantized layer to produce the
   next layer's inputs;
4. pack: kernel-compatible configurations (int4 asym / int8 sym groups of 128, int8 activations per group of
   128: dynamic per (token, group), or static per group) give `pallas_kernels.MixedWeight`s
   (`pallas_kernels.StaticMixedWeight`s holding the calibrated maxima when static); every other configuration
   gives `FakeQuantWeight`s (dequantized float weight + activation fake-quant). All are `QuantizedLinear`s.

The returned params keep the float norms and biases; `"layers"` is a tuple of per-layer dicts (DESIGN.md's
quantized layout). The token embedding table and the LM head stay float unless `QuantConfig.head_bits` is
set (`quantize_head`): then they become `MixedWeight`s (every row int8, or every row int4), one shared
`MixedWeight` when the embeddings are tied.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from mixjax import model
from mixjax.config import LlamaConfig
from mixjax.linear import Implementation
from mixjax.parallel import check_mesh, has_split_weights, replicate, shard_rows, shard_samples
from mixjax.quant.activations import STATIC_RATIOS, ActFormat, group_absmax, static_clip_errors
from mixjax.quant.allocate import Budget, allocate, average_bits
from mixjax.quant.clip import clip_grid
from mixjax.quant.fakequant import FakeQuantWeight
from mixjax.quant.gptq import gptq_quantize, rtn_clip_quantize
from mixjax.quant.report import build_report, weight_bytes
from mixjax.quant.rtn import QuantizedRows, WeightFormat, dequantize_rows, quantize_rows
from mixjax.quant.salience import SALIENCE_KINDS, SalienceKind, compute_salience, linear_weight, with_weights


HEAD_BITS = (4, 8)


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """How to quantize. The defaults are MixLLM W4.4A8.

    bits: average weight-code bits per element over all decoder linears, in [4, 8] (4.4 ≈ 10 % of the
      elements at 8 bits); `budget="channels"` counts channels instead, like the official code.
    salience: "fisher" (first order + full-channel empirical Fisher), "diag", "first-order-off", "hvp".
    local: choose the 8-bit channels inside each (layer, linear) instead of globally.
    gptq / group_reorder / clip / damp: the weight quantizer (RTN when gptq and clip are off).
    weight: int4 format and group size (int8 channels: symmetric, same group size).
    act: activation quantization of every decoder linear's input (bits=None: float, W·A16).
    batch_size: calibration samples per forward/backward (memory vs speed).
    head_bits: None keeps the token embedding table and the LM head in the float dtype; 8 quantizes every
      row to int8 symmetric g128, 4 to int4 asymmetric g128 (RTN, `quantize_head`; kernel-format configs only).
      The LM head then runs like every decoder linear (int8 activations per token and group of 128).
    """

    bits: float = 4.4
    budget: Budget = "elements"
    salience: SalienceKind = "fisher"
    local: bool = False
    gptq: bool = True
    group_reorder: bool = True
    clip: bool = True
    damp: float = 0.01
    weight: WeightFormat = WeightFormat()
    act: ActFormat = ActFormat()
    batch_size: int = 4
    head_bits: int | None = None

    def __post_init__(self):
        if not isinstance(self.bits, (int, float)) or not 4.0 <= float(self.bits) <= 8.0:
            raise ValueError(f"QuantConfig.bits={self.bits!r} must lie in [4, 8] (average weight bits, e.g. 4.4)")
        if self.budget not in ("elements", "channels"):
            raise ValueError(f"QuantConfig.budget={self.budget!r}; expected 'elements' or 'channels'")
        if self.salience not in SALIENCE_KINDS:
            raise ValueError(f"QuantConfig.salience={self.salience!r}; expected one of {SALIENCE_KINDS}")
        if not 0.0 <= self.damp < 1.0:
            raise ValueError(f"QuantConfig.damp={self.damp} must lie in [0, 1) (GPTQ uses 0.01)")
        if self.batch_size < 1:
            raise ValueError(f"QuantConfig.batch_size={self.batch_size} must be ≥ 1")
        if self.head_bits is not None:
            if type(self.head_bits) is not int or self.head_bits not in HEAD_BITS:
                raise ValueError(f"QuantConfig.head_bits={self.head_bits!r}; expected None (float embedding and "
                                 f"LM head), 8 (int8 symmetric g128) or 4 (int4 asymmetric g128)")
            if not self.kernel_compatible:
                raise ValueError("QuantConfig.head_bits needs the kernel format (weight=WeightFormat(128, False), "
                                 "act=ActFormat(8, 'group', 128, False)); use head_bits=None with ablation formats")

    @property
    def kernel_compatible(self) -> bool:
        """True when `pallas_kernels.MixedWeight` + `mixed_matmul` compute exactly this configuration (with static
        activation scales through `pallas_kernels.StaticMixedWeight`)."""
        act = dataclasses.replace(self.act, static=False, static_calib="max")
        return self.weight == WeightFormat(128, False) and act == ActFormat(8, "group", 128)

    @property
    def needs_calibration_inputs(self) -> bool:
        return self.gptq or self.clip or (self.act.bits is not None and self.act.static)


def salience(params, calib_batches: Iterable, cfg: LlamaConfig, *, config: QuantConfig = QuantConfig(),
             progress: bool = False, mesh: Mesh | None = None) -> dict[str, np.ndarray]:
    """Salience of every decoder-linear output channel: {linear name: float64 [L, N]} (see salience.py).

    mesh: a one-axis "data" mesh (`mixjax.data_mesh()`) splits the calibration samples over its devices.
    """
    check_mesh(mesh)
    batches = check_calibration(calib_batches, cfg)
    check_weights(params, cfg)
    return compute_salience(params, _rebatch(batches, config.batch_size), cfg, kind=config.salience,
                            progress=progress, mesh=mesh)


def quantize(params, calib_batches: Iterable, cfg: LlamaConfig, *, config: QuantConfig = QuantConfig(),
             scores: dict[str, np.ndarray] | None = None, return_report: bool = False, progress: bool = False,
             mesh: Mesh | None = None):
    """Float params → quantized params (tuple of layers of `MixedWeight`/`FakeQuantWeight` linears).

    calib_batches: an iterable of int [B, T] token arrays (T ≥ 2, ids < vocab_size).
    scores: salience from `mixjax.salience` (same params), to reuse across budgets; computed if None.
    With `return_report=True` returns (qparams, QuantReport).
    mesh: a one-axis "data" mesh (`mixjax.data_mesh()`) splits the calibration samples of the salience pass
    and of the layer statistics over its devices, the params replicated (`mixjax.parallel`), or split too
    where `mixjax.shard_weights` placed them (FSDP: the layer passes then gather one layer at a time).
    """
    check_mesh(mesh)
    t_start = time.perf_counter()
    batches = check_calibration(calib_batches, cfg)
    check_weights(params, cfg)
    given = params  # salience runs the params as given: stacked ones under lax.scan, no copy (`compute_salience`)
    # the layer-by-layer passes read stacked layers one at a time (`model.layer_views`), never a whole unstacked copy
    params = {**params, "layers": model.layer_views(params["layers"])}
    if config.head_bits is not None:
        check_head_weights(params, cfg)
    batches = _rebatch(batches, config.batch_size)
    first = params["layers"][0]
    in_features = {n: linear_weight(first, n).shape[1] for n in model.LINEAR_NAMES}
    n_layers = len(params["layers"])
    if scores is not None:
        _check_scores(scores, params)
    if 4.0 < config.bits < 8.0:
        if scores is None:
            scores = compute_salience(given, batches, cfg, kind=config.salience, progress=progress, mesh=mesh)
        is_int8 = allocate(scores, in_features, config.bits, budget=config.budget, local=config.local)
    else:
        n_out = {n: linear_weight(first, n).shape[0] for n in model.LINEAR_NAMES}
        is_int8 = {n: np.full((n_layers, n_out[n]), config.bits >= 8.0) for n in model.LINEAR_NAMES}
    t_salience = time.perf_counter()
    layers = quantize_layers(params, batches, cfg, config, is_int8, progress=progress, mesh=mesh)
    rest = {k: v for k, v in params.items() if k != "layers"}
    if has_split_weights(rest, mesh):  # FSDP float weights: the quantized model's embedding, norm, head replicated
        rest = replicate(rest, mesh)
    qparams = {**rest, "layers": layers}
    if config.head_bits is not None:
        qparams.update(quantize_head(qparams, cfg, bits=config.head_bits))  # the float embedding / head of `rest`
    t_end = time.perf_counter()
    if not return_report:
        return qparams
    report = build_report(
        is_int8=is_int8, scores=scores, in_features=in_features, bits_target=config.bits,
        bits_achieved=average_bits(is_int8, in_features), budget=config.budget, salience=config.salience,
        local=config.local, calib_tokens=sum(int(b.size) for b in batches),
        seconds={"salience": t_salience - t_start, "quantize": t_end - t_salience, "total": t_end - t_start},
        head_bits=config.head_bits, weight_bytes=weight_bytes(qparams),
    )
    return qparams, report


# ----------------------------------------------------------------------------------------------------
# Token embedding table and LM head

HEAD_NAMES = ("embed_tokens", "lm_head")
_HEAD_CHUNK = 4096  # rows per jitted call: bounds the clipping search's [rows, G, 128] temporaries


def quantize_head(params, cfg: LlamaConfig, *, bits: int, clip: bool = False) -> dict:
    """The float embedding table (and the untied LM head), each [V, D] → {name: MixedWeight} to merge into
    the quantized params. Tied embeddings give one entry, "embed_tokens", serving both.

    bits: 8 (every row int8 symmetric g128) or 4 (int4 asymmetric g128). Codes are round-to-nearest
    (what `quantize` uses). `clip=True` first picks each (row, group)'s clip ratio on the 80–100 % grid
    minimising the weight's squared error (the decoder's clipping search with H = I: an embedding row has
    no input activations); it lowers that error but raised the embedded SmolLM2's int4 perplexity (34.79 →
    35.15, benchmarks/results/accuracy.md), so it is an ablation only. Needs no calibration data: the
    decoder's quantization is the same with or without a quantized head.
    """
    if type(bits) is not int or bits not in HEAD_BITS:
        raise ValueError(f"quantize_head: bits={bits!r}; expected 8 or 4")
    check_head_weights(params, cfg)
    return {name: _quantize_rows_packed(params[name], bits, clip) for name in head_names(cfg)}


def head_names(cfg: LlamaConfig) -> tuple[str, ...]:
    """("embed_tokens",) when the embeddings are tied, else ("embed_tokens", "lm_head")."""
    return HEAD_NAMES[:1] if cfg.tie_word_embeddings else HEAD_NAMES


def check_head_weights(params, cfg: LlamaConfig) -> None:
    """The embedding table (and untied LM head) are float [V, D] with only finite values."""
    shape = (cfg.vocab_size, cfg.hidden_size)
    for name in head_names(cfg):
        w = params.get(name)
        if w is None:
            raise ValueError(f"params are missing {name} (cfg.tie_word_embeddings={cfg.tie_word_embeddings})")
        if not hasattr(w, "dtype") or not jnp.issubdtype(w.dtype, jnp.floating):
            raise ValueError(f"{name} is {type(w).__name__}; quantize expects float params (already quantized?)")
        if tuple(w.shape) != shape:
            raise ValueError(f"{name} has shape {tuple(w.shape)}; the config implies {shape} [V, D]")
        if not bool(jnp.all(jnp.isfinite(w))):
            raise ValueError(f"{name} contains NaN or Inf: fix the checkpoint before quantizing")


def _quantize_rows_packed(w, bits: int, clip: bool):
    """w [V, D] → MixedWeight, every row at `bits`, quantized in chunks of rows (rows are independent)."""
    from pallas_kernels import pack_mixed

    v, d = w.shape
    fmt = WeightFormat()
    chunk = min(_HEAD_CHUNK, v)
    eye = jnp.eye(d, dtype=jnp.float32) if clip else None  # H = I: the search minimises ‖ΔW‖² per (row, group)
    is_int8 = jnp.full((chunk,), bits == 8)
    parts = []
    for start in range(0, v, chunk):
        rows = w[start : start + chunk].astype(jnp.float32)
        rows = jnp.pad(rows, ((0, chunk - rows.shape[0]), (0, 0)))  # one compiled shape for every chunk
        qr = rtn_clip_quantize(rows, eye, is_int8, fmt=fmt, grid=clip_grid()) if clip else _rtn(rows, is_int8, fmt=fmt)
        parts.append(jax.tree.map(np.asarray, (qr.q, qr.scale, qr.zero)))
    q, scale, zero = (np.concatenate(a)[:v] for a in zip(*parts))
    if not np.all(np.isfinite(scale)):
        raise FloatingPointError("non-finite quantization scales in the embedding table / LM head")
    return pack_mixed(q, scale, zero, np.full(v, bits == 8), k=d, group_size=fmt.group_size)


# ----------------------------------------------------------------------------------------------------
# Layer-by-layer quantization


def quantize_layers(params, batches, cfg, config: QuantConfig, is_int8: dict[str, np.ndarray], *,
                    progress: bool = False, mesh: Mesh | None = None) -> tuple:
    """Quantizes every decoder layer; with calibration inputs when GPTQ/clipping/static scales need them.

    mesh: a "data" mesh splits the calibration samples (and the H = 2·XᵀX sums) over its devices.
    """
    layers = params["layers"]
    steps = range(len(layers))
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc="quantize layers", unit="layer")
    if not config.needs_calibration_inputs:
        return tuple(_quantize_layer(replicate(layers[i], mesh), i, None, None, config, is_int8, mesh)[0]
                     for i in steps)
    sharded = [shard_samples(b, mesh)[:2] for b in batches]
    masks = [m for _, m in sharded]  # None, or f32 [Bp]: 0 on the padding samples
    embed = replicate({k: params[k] for k in ("embed_tokens", "norm")}, mesh)
    hidden = [model.embed(embed, t, cfg) for t, _ in sharded]  # [Bp, T, D] each
    out = []
    for i in steps:
        layer = replicate(layers[i], mesh)
        index = jnp.asarray(i, jnp.int32)  # traced in the jitted steps: one compile for all layers
        hess, absmax = _accumulate_stats(layer, hidden, masks, cfg, config.act, index)
        qlayer, sim = _quantize_layer(layer, i, hess, absmax, config, is_int8, mesh)
        out.append(qlayer)
        if i + 1 < len(layers):
            hidden = [_run_layer(sim, h, index, cfg=cfg) for h in hidden]
    return tuple(out)


def _quantize_layer(layer, i, hess, absmax, config: QuantConfig, is_int8, mesh=None) -> tuple[dict, dict]:
    """→ (the quantized layer, the same layer with FakeQuantWeights for calibration propagation).

    mesh: each linear's rows (output channels, independent in GPTQ and the clip search) split over its devices.
    """
    final, sim = {}, {}
    for name in model.LINEAR_NAMES:
        w = linear_weight(layer, name)
        rows, n = shard_rows(w, mesh)
        mask, _ = shard_rows(jnp.asarray(is_int8[name][i]), mesh)
        h = None if hess is None else hess[name]
        qr = _quantize_linear(rows, h, mask, config)
        if qr.q.shape[0] != n:  # drop the padding rows
            qr = dataclasses.replace(qr, q=qr.q[:n], scale=qr.scale[:n], zero=qr.zero[:n], is_int8=qr.is_int8[:n])
        _check_finite_codes(qr, f"layers.{i}.{name}")
        a = absmax[name] if absmax is not None and config.act.static else None
        sim[name] = FakeQuantWeight(w=_dequantize(qr, fmt=config.weight).astype(w.dtype), a_absmax=a, act=config.act,
                                    exact=False)  # carries the calibration inputs: TF32 on a GPU is enough there
        if not config.kernel_compatible:
            final[name] = dataclasses.replace(sim[name], exact=True)
        elif a is None:
            final[name] = _pack(qr)
        else:
            from pallas_kernels.static import static_weight

            final[name] = static_weight(_pack(qr), a)
    return with_weights(layer, final), with_weights(layer, sim)


def quantize_weight(w, h, is_int8, config: QuantConfig = QuantConfig(), *, path: str = "weight"):
    """One float linear weight w [N, K] → its quantized weight: a `MixedWeight` where the kernels compute `config`
    (`QuantConfig.kernel_compatible`), else a `FakeQuantWeight` in w's dtype.

    h: [K, K] f32 = 2·XᵀX summed over the calibration inputs X [tokens, K] (GPTQ and the clipping search); None
    with `gptq=False, clip=False` (RTN). is_int8: bool [N], the channels at 8 bits. path names the weight in errors.
    The steps of one linear in `quantize`'s layer pass (`_quantize_layer`, which also keeps the dequantized copy that
    carries the inputs on, static scales and rows split over devices), for `mixjax.nn.quantize_linears`."""
    if config.act.bits is not None and config.act.static:
        raise ValueError(f"{path}: static activation scales need each linear's calibrated input maxima; quantize "
                         "with mixjax.quantize, or use dynamic scales (ActFormat(static=False))")
    if h is None and (config.gptq or config.clip):
        raise ValueError(f"{path}: GPTQ and the clipping search need h = 2·XᵀX of the calibration inputs; pass h, or "
                         "QuantConfig(gptq=False, clip=False) for RTN")
    n, k = w.shape
    if h is not None and tuple(h.shape) != (k, k):
        raise ValueError(f"{path}: h has shape {tuple(h.shape)}; expected ({k}, {k}) = 2·XᵀX over the weight's K inputs")
    mask = jnp.asarray(is_int8, bool)
    if mask.shape != (n,):
        raise ValueError(f"{path}: is_int8 has shape {mask.shape}; expected ({n},), one flag an output channel")
    qr = _quantize_linear(jnp.asarray(w, jnp.float32), h, mask, config)
    _check_finite_codes(qr, path)
    if config.kernel_compatible:
        return _pack(qr)
    return FakeQuantWeight(w=_dequantize(qr, fmt=config.weight).astype(w.dtype), act=config.act)


def _quantize_linear(w, h, is_int8, config: QuantConfig) -> QuantizedRows:
    if config.gptq:
        return gptq_quantize(w, h, is_int8, fmt=config.weight, damp=config.damp, reorder=config.group_reorder,
                             clip=config.clip, grid=clip_grid())
    if config.clip:
        return rtn_clip_quantize(w, h, is_int8, fmt=config.weight, grid=clip_grid())
    return _rtn(w, is_int8, fmt=config.weight)


@functools.partial(jax.jit, static_argnames=("fmt",))
def _rtn(w, is_int8, *, fmt):
    return quantize_rows(w, is_int8, fmt)


@functools.partial(jax.jit, static_argnames=("fmt",))
def _dequantize(qr: QuantizedRows, *, fmt: WeightFormat) -> jax.Array:
    return dequantize_rows(qr, fmt)


def _pack(qr: QuantizedRows):
    from pallas_kernels import pack_mixed

    return pack_mixed(np.asarray(qr.q), np.asarray(qr.scale), np.asarray(qr.zero), np.asarray(qr.is_int8),
                      k=qr.k, group_size=128)


class _Tap:
    """A float weight that records its input while the layer is traced (inside one jitted function)."""

    def __init__(self, w, name: str, sink: dict):
        self.w, self.name, self.sink = w, name, sink

    @property
    def shape(self):
        return tuple(self.w.shape)

    def matmul(self, x, *, implementation: Implementation = "auto"):
        self.sink[self.name] = x
        return jnp.einsum("...k,nk->...n", x, self.w.astype(x.dtype), preferred_element_type=jnp.float32).astype(x.dtype)


def _linear_inputs(layer, x, mask, cfg: LlamaConfig, index=None) -> dict[str, jax.Array]:
    """Each linear's input over x [B, T, D] as f32 [B·T, K], one array for linears sharing an input (traced).

    mask: None, or f32 [B] with 0 on padding samples, whose rows become zeros.
    """
    sink: dict[str, jax.Array] = {}
    tapped = with_weights(layer, {n: _Tap(linear_weight(layer, n), n, sink) for n in model.LINEAR_NAMES})
    model.decoder_layer(tapped, x, cfg, layer_index=index, implementation="xla")
    inputs, by_source = {}, {}
    for name in model.LINEAR_NAMES:
        src = sink[name]
        if id(src) not in by_source:
            xin = src if mask is None else src.astype(jnp.float32) * mask[:, None, None]
            by_source[id(src)] = xin.reshape(-1, xin.shape[-1]).astype(jnp.float32)
        inputs[name] = by_source[id(src)]
    return inputs


@functools.partial(jax.jit, static_argnames=("cfg", "act"))
def _layer_stats(layer, x, mask, index, *, cfg: LlamaConfig, act: ActFormat):
    """H = 2·XᵀX [K, K] f32 and per-group max |X| [G] of each linear's input X over x [B, T, D]."""
    hess, absmax, done = {}, {}, {}
    for name, xf in _linear_inputs(layer, x, mask, cfg, index).items():
        if id(xf) not in done:
            amax = group_absmax(xf, act) if act.bits is not None else jnp.zeros((1,), jnp.float32)
            done[id(xf)] = (2.0 * xf.T @ xf, amax)
        hess[name], absmax[name] = done[id(xf)]
    return hess, absmax


@functools.partial(jax.jit, static_argnames=("cfg", "act"))
def _layer_clip_errors(layer, x, mask, absmax, index, *, cfg: LlamaConfig, act: ActFormat):
    """Per linear, the squared error of static scales clipped to each of STATIC_RATIOS: [R, G] f32."""
    errors, done = {}, {}
    for name, xf in _linear_inputs(layer, x, mask, cfg, index).items():
        if id(xf) not in done:
            done[id(xf)] = static_clip_errors(xf, absmax[name], act)
        errors[name] = done[id(xf)]
    return errors


def _accumulate_stats(layer, hidden, masks, cfg, act, index):
    hess, absmax = None, None
    for h, m in zip(hidden, masks):
        hb, ab = _layer_stats(layer, h, m, index, cfg=cfg, act=act)
        hess = hb if hess is None else jax.tree.map(jnp.add, hess, hb)
        absmax = ab if absmax is None else jax.tree.map(jnp.maximum, absmax, ab)
    if act.bits is not None and act.static and act.static_calib == "mse":  # a second pass, with the maxima known
        errors = None
        for h, m in zip(hidden, masks):
            eb = _layer_clip_errors(layer, h, m, absmax, index, cfg=cfg, act=act)
            errors = eb if errors is None else jax.tree.map(jnp.add, errors, eb)
        ratios = jnp.asarray(STATIC_RATIOS, jnp.float32)
        absmax = {name: ratios[jnp.argmin(errors[name], axis=0)] * absmax[name] for name in absmax}
    return hess, absmax


@functools.partial(jax.jit, static_argnames=("cfg",))
def _run_layer(layer, x, index, *, cfg: LlamaConfig):
    return model.decoder_layer(layer, x, cfg, layer_index=index, implementation="xla")


# ----------------------------------------------------------------------------------------------------
# Input checks (all raised before any work starts)


def check_calibration(calib_batches: Iterable, cfg: LlamaConfig) -> list[np.ndarray]:
    """Materialises and checks the calibration batches: non-empty, int [B, T] with T ≥ 2, ids < vocab."""
    if calib_batches is None:
        raise ValueError("calibration set is missing: pass an iterable of int [B, T] token arrays")
    batches = []
    for i, b in enumerate(calib_batches):
        a = np.asarray(b)
        if a.ndim == 1:
            a = a[None]
        if a.ndim != 2 or a.shape[0] == 0:
            raise ValueError(f"calibration batch {i} has shape {a.shape}; expected int [B, T] token ids")
        if not np.issubdtype(a.dtype, np.integer):
            raise ValueError(f"calibration batch {i} has dtype {a.dtype}; expected integer token ids")
        if a.shape[1] < 2:
            raise ValueError(
                f"calibration batch {i} has sequences of {a.shape[1]} token(s); the LM loss needs T ≥ 2 "
                "(use longer calibration samples, e.g. --seq-len 512)"
            )
        if a.min() < 0 or a.max() >= cfg.vocab_size:
            raise ValueError(
                f"calibration batch {i} holds token ids in [{a.min()}, {a.max()}], outside the vocabulary "
                f"[0, {cfg.vocab_size}): tokenize the calibration text with this model's tokenizer"
            )
        batches.append(a.astype(np.int32))
    if not batches:
        raise ValueError("the calibration set is empty: pass at least one int [B, T] batch of token ids")
    return batches


def _rebatch(batches: list[np.ndarray], batch_size: int) -> list[np.ndarray]:
    """Regroups samples into batches of ≤ batch_size (samples of equal length only are merged)."""
    out = []
    for b in batches:
        out.extend(b[s : s + batch_size] for s in range(0, b.shape[0], batch_size))
    return out


def check_weights(params, cfg: LlamaConfig) -> None:
    """Every decoder linear has the shape cfg implies and only finite values; errors name the layer."""
    expected = model.param_shapes(cfg)["layers"]
    layers = model.layer_views(params["layers"])
    if len(layers) != cfg.num_hidden_layers:
        raise ValueError(f"params hold {len(layers)} layers but cfg.num_hidden_layers={cfg.num_hidden_layers}")
    for i, layer in enumerate(layers):
        for name in model.LINEAR_NAMES:
            path = f"layers.{i}.{name}.weight"
            try:
                w = linear_weight(layer, name)
            except (KeyError, TypeError):
                raise ValueError(f"params are missing {path}") from None
            if not hasattr(w, "dtype") or not jnp.issubdtype(w.dtype, jnp.floating):
                raise ValueError(f"{path} is {type(w).__name__}; quantize expects float params (already quantized?)")
            want = tuple(linear_weight(expected, name)[1:])
            if tuple(w.shape) != want:
                raise ValueError(f"{path} has shape {tuple(w.shape)}; the config implies {want} [N, K]")
            if not bool(jnp.all(jnp.isfinite(w))):
                raise ValueError(f"{path} contains NaN or Inf: fix the checkpoint before quantizing")


def _check_scores(scores, params) -> None:
    layers = params["layers"]
    for name in model.LINEAR_NAMES:
        want = (len(layers), linear_weight(layers[0], name).shape[0])
        got = np.shape(scores.get(name)) if isinstance(scores, dict) else None
        if got != want:
            raise ValueError(f"scores[{name!r}] has shape {got}; expected {want} [L, N] (from mixjax.salience)")


def _check_finite_codes(qr: QuantizedRows, path: str) -> None:
    if not bool(jnp.all(jnp.isfinite(qr.scale))):
        raise FloatingPointError(f"{path}: non-finite quantization scales (check its calibration inputs)")
