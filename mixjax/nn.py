"""Flax NNX front end: mixjax's quantized linears as NNX modules, and MixLLM for the `nnx.Linear`s of any NNX model.

- `MixedLinear`: a drop-in for `nnx.Linear` whose weight is a mixjax quantized weight (`MixedWeight`: the Pallas
  kernels on a GPU, their XLA reference elsewhere; or a `FakeQuantWeight` for the ablation formats). The weight
  sits in a `QuantizedWeight` variable, not an `nnx.Param`, so `nnx.state(model, nnx.Param)` and optimizers built
  on `nnx.Param` see only the float leaves.
- `linear_salience` and `quantize_linears`: MixLLM on a model mixjax does not know. The salience is the method's
  S_c = mean_d |g_dᵀΔ_c + ½(g_dᵀΔ_c)²| from per-sample gradients of the user's loss (one `jax.grad` a sample,
  vmapped over `QuantConfig.batch_size` samples), ranked over every selected linear at once; GPTQ and the clipping
  search take H = 2·XᵀX of each linear's input on the calibration batches. Unlike `mixjax.quantize`, which runs a
  Llama layer by layer on the quantized layers' outputs, every H here comes from the float model in one pass
  (each linear's own inputs, any architecture), and the pass holds every selected linear's H at once
  (Σ K² · 4 bytes). The salience pass holds `batch_size` samples' gradients of every selected kernel: sized for
  models of a few hundred million parameters; a Llama checkpoint of billions goes through `mixjax.quantize`.
- `Llama`: the Llama-family model of `mixjax.model` as NNX modules (`nnx.Linear` projections), built from mixjax
  params or a checkpoint path, with `to_params()` back to the functional params that `mixjax.generate`,
  `mixjax.perplexity` and `mixjax.quant.checkpoint` take — the quantized linears included.

Kernels are [K, N] in Flax (`nnx.Linear.kernel`) and [N, K] in mixjax (`mixjax.linear`): the transposes happen
here and nowhere else.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mixjax import model
from mixjax.config import LlamaConfig
from mixjax.linear import Implementation, QuantizedLinear, linear
from mixjax.quant.allocate import allocate, average_bits
from mixjax.quant.api import QuantConfig, quantize_weight
from mixjax.quant.rtn import rtn4_delta
from pallas_kernels.attention import attend_ref

Select = Callable[[str, nnx.Linear], bool]  # (dotted path, module) → quantize it?
LossFn = Callable[[nnx.Module, Any], jax.Array]  # (model, batch) → scalar loss, or one a sample [B]
NN_SALIENCE_KINDS = ("fisher", "first-order-off", "diag")


def _get(v: nnx.Variable):
    return v.get_value() if hasattr(v, "get_value") else v.value


def _set(v: nnx.Variable, value) -> None:
    if hasattr(v, "set_value"):
        v.set_value(value)
    else:
        v.value = value


class QuantizedWeight(nnx.Variable):
    """A quantized linear weight of logical shape [N, K] (a `mixjax.linear.QuantizedLinear` pytree)."""


class MixedLinear(nnx.Module):
    """y = x·Wᵀ + b with W a mixjax quantized weight [N, K]: a drop-in for `nnx.Linear(K, N)`.

    With a `MixedWeight`, x is quantized to int8 per (token, group of 128) and multiplied by MixLLM's two-step
    dequantization (`pallas_kernels.mixed_matmul`). The output has x's dtype."""

    def __init__(self, weight: QuantizedLinear, bias: jax.Array | None = None, *,
                 implementation: Implementation = "auto"):
        if not isinstance(weight, QuantizedLinear):
            raise TypeError(f"weight is {type(weight).__name__}; expected a quantized weight (MixedWeight, "
                            "FakeQuantWeight); build one from an nnx.Linear with MixedLinear.from_linear")
        self.out_features, self.in_features = (int(d) for d in weight.shape)
        if bias is not None and tuple(np.shape(bias)) != (self.out_features,):
            raise ValueError(f"bias has shape {tuple(np.shape(bias))}; expected ({self.out_features},)")
        self.weight = QuantizedWeight(weight)
        self.bias = None if bias is None else nnx.Param(jnp.asarray(bias))
        self.implementation = implementation

    def __call__(self, x: jax.Array) -> jax.Array:  # [..., K] → [..., N]
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x has {x.shape[-1]} features; this MixedLinear takes {self.in_features}")
        bias = None if self.bias is None else _get(self.bias)
        return linear(x, _get(self.weight), bias, implementation=self.implementation)

    @classmethod
    def from_linear(cls, layer: nnx.Linear, is_int8=None, *, h: jax.Array | None = None,
                    config: QuantConfig | None = None, implementation: Implementation = "auto") -> "MixedLinear":
        """Quantizes one `nnx.Linear` (left unchanged). is_int8: bool [N], the output channels at 8 bits (None:
        all at 4). h: [K, K] = 2·XᵀX of its calibration inputs, for GPTQ and the clipping search. config: None is
        MixLLM's formats with GPTQ and clipping when h is given, RTN when not."""
        if not isinstance(layer, nnx.Linear):
            raise TypeError(f"layer is {type(layer).__name__}; expected an nnx.Linear")
        if config is None:
            config = QuantConfig() if h is not None else QuantConfig(gptq=False, clip=False)
        kernel = _get(layer.kernel)  # [K, N]
        n = kernel.shape[1]
        mask = np.zeros(n, bool) if is_int8 is None else np.asarray(is_int8, bool)
        weight = quantize_weight(kernel.T, h, mask, config, path="layer")
        bias = None if layer.bias is None else _get(layer.bias)
        return cls(weight, bias, implementation=implementation)


# ----------------------------------------------------------------------------------------------------
# Finding and replacing a model's linears


def _name(path) -> str:
    return ".".join(str(p) for p in path)


def find_linears(module: nnx.Module, select: Select | None = None) -> list[tuple[tuple, nnx.Linear]]:
    """The `nnx.Linear`s of `module` that `select(dotted path, linear)` keeps (None: all), as (path, linear)."""
    found = []
    for path, node in nnx.iter_graph(module):
        if isinstance(node, nnx.Linear) and (select is None or select(_name(path), node)):
            found.append((tuple(path), node))
    return found


def _is_attribute(obj, key) -> bool:  # a module's attribute, or an item of an nnx.List / dict
    return isinstance(key, str) and not isinstance(obj, Mapping) and hasattr(obj, key)


def _child(obj, key):
    return getattr(obj, key) if _is_attribute(obj, key) else obj[key]


def _set_child(obj, key, value) -> None:
    if _is_attribute(obj, key):
        setattr(obj, key, value)
    else:
        obj[key] = value


def _swap(module: nnx.Module, path: tuple, new) -> None:
    parent = module
    for key in path[:-1]:
        parent = _child(parent, key)
    _set_child(parent, path[-1], new)


class _Placeholder(nnx.Module):
    pass


def _swapped(module, targets, news):
    """Puts `news` at the targets' paths; restores and raises if a target is also reachable elsewhere (shared)."""
    for (path, _), new in zip(targets, news):
        _swap(module, path, new)
    olds = {id(lin) for _, lin in targets}
    inside = [path for path, _ in targets]  # a new module may wrap its target (`_Recorder`)
    left = [_name(p) for p, node in nnx.iter_graph(module)
            if id(node) in olds and not any(tuple(p[: len(q)]) == q for q in inside)]
    if left:
        for path, lin in targets:
            _swap(module, path, lin)
        raise ValueError(f"{left[0]} is a linear that the model also holds under another path (shared weights); "
                         "quantize_linears replaces one path at a time — leave it out with select=")


def _check_targets(targets, module) -> None:
    if not targets:
        raise ValueError(f"{type(module).__name__} holds no nnx.Linear that select= keeps; nothing to quantize")
    for path, lin in targets:
        kernel = _get(lin.kernel)
        if kernel.ndim != 2 or not jnp.issubdtype(kernel.dtype, jnp.floating):
            raise ValueError(f"{_name(path)}.kernel is {kernel.dtype} {kernel.shape}; expected a float [K, N] kernel")
        if not bool(jnp.all(jnp.isfinite(kernel))):
            raise ValueError(f"{_name(path)}.kernel contains NaN or Inf: fix the weights before quantizing")
    _swapped(module, targets, [_Placeholder() for _ in targets])  # raises on a shared linear
    for path, lin in targets:
        _swap(module, path, lin)


# ----------------------------------------------------------------------------------------------------
# Salience from per-sample gradients


def _batch_size(batch) -> int:
    sizes = {np.shape(leaf)[0] if np.ndim(leaf) else None for leaf in jax.tree.leaves(batch)}
    if not sizes or None in sizes or len(sizes) != 1:
        raise ValueError("each calibration batch must be a pytree of arrays sharing a leading sample axis; got "
                         f"leading sizes {sorted(sizes, key=str)}")
    return sizes.pop()


def _progress(items, enabled: bool, desc: str, unit: str):
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit=unit)


def _chunks(batches: list, size: int) -> list:
    """The samples of `batches` regrouped into pytrees of `size` samples (the last one shorter)."""
    out = []
    for batch in batches:
        b = _batch_size(batch)
        out += [jax.tree.map(lambda a, s=s: np.asarray(a)[s : s + size], batch) for s in range(0, b, size)]
    return out


def linear_salience(module: nnx.Module, batches: Iterable, loss_fn: LossFn, *, select: Select | None = None,
                    kind: str = "fisher", batch_size: int = 4) -> dict[str, np.ndarray]:
    """MixLLM's salience of every output channel of the selected `nnx.Linear`s: {dotted path: float64 [N]}.

    batches: pytrees of arrays with a leading sample axis (token arrays [B, T], (inputs, labels) pairs...).
    loss_fn(module, batch): the loss of a batch of ONE sample (leading axis 1), a scalar or shape [1].
    kind: "fisher" (S_c = mean_d |g_dᵀΔ_c + ½(g_dᵀΔ_c)²|), "first-order-off" (mean_d ½(g_dᵀΔ_c)²) or "diag"
    (mean_d Σ_k |e_k + ½e_k²|, e_k = g_dk·Δ_ck). Δ_c = RTN4(w_c) − w_c, asymmetric int4 in groups of 128.
    """
    if kind not in NN_SALIENCE_KINDS:
        raise ValueError(f"kind={kind!r}; expected one of {NN_SALIENCE_KINDS} (hvp needs mixjax.salience)")
    targets = find_linears(module, select)
    _check_targets(targets, module)
    return _salience(module, targets, batches, loss_fn, kind, batch_size)


class _Alpha(nnx.Variable):
    pass


class _Delta(nnx.Variable):
    pass


class _Probe(nnx.Module):
    """Runs `layer` plus (x·Δ)⊙α at α = 0, which changes nothing: ∂loss/∂α_c = g_cᵀΔ_c, the salience's directional
    derivative, from a gradient of N numbers instead of the kernel's K·N (`mixjax.salience`'s α probe)."""

    def __init__(self, layer: nnx.Linear):
        self.layer = layer
        kernel = _get(layer.kernel)  # [K, N]
        self.delta = _Delta(rtn4_delta(kernel.T.astype(jnp.float32)).T)
        self.alpha = _Alpha(jnp.zeros((kernel.shape[1],), jnp.float32))

    def __call__(self, x):
        y = self.layer(x)
        return y + (jnp.dot(x.astype(jnp.float32), _get(self.delta)) * _get(self.alpha)).astype(y.dtype)


def _salience(module, targets, batches, loss_fn, kind: str, batch_size: int,
              progress: bool = False) -> dict[str, np.ndarray]:
    batches = _chunks(list(batches), batch_size)
    if not batches:
        raise ValueError("no calibration batches: salience needs at least one sample")
    if kind != "diag":  # a scalar a channel and sample: the α probe
        return _probe_salience(module, targets, batches, loss_fn, kind, progress)
    kernels = {id(lin.kernel): _name(path) for path, lin in targets}
    graphdef, kstate, rest = nnx.split(module, lambda path, v: id(v) in kernels, ...)
    names = [kernels[id(v)] for _, v in kstate.flat_state()]
    deltas = jax.tree.map(lambda k: rtn4_delta(k.T.astype(jnp.float32)).T, kstate)  # [K, N] like the kernels
    return _mean_terms(_salience_terms(graphdef, rest, loss_fn, kind), kstate, deltas, batches, names, progress)


def _mean_terms(terms, state, deltas, batches, names, progress: bool) -> dict[str, np.ndarray]:
    """{name: S_c averaged over every sample}: `terms`' per-chunk sums, added up over the chunks."""
    total, count = None, 0
    for chunk in _progress(batches, progress, "salience", "batch"):
        s = terms(state, deltas, chunk)
        total = s if total is None else jax.tree.map(jnp.add, total, s)
        count += _batch_size(chunk)
    return {name: np.asarray(_get(v), np.float64) / count for name, (_, v) in zip(names, total.flat_state())}


def _probe_salience(module, targets, batches, loss_fn, kind: str, progress: bool) -> dict[str, np.ndarray]:
    """fisher / first-order-off through `_Probe`s swapped in for the targets (and back out): per-sample gradients of
    the α's only, [samples, N] a linear, where the kernels' would be [samples, K, N]."""
    probes = [_Probe(lin) for _, lin in targets]
    _swapped(module, targets, probes)
    try:
        alphas = {id(probe.alpha): _name(path) for (path, _), probe in zip(targets, probes)}
        graphdef, astate, rest = nnx.split(module, lambda path, v: id(v) in alphas, ...)
        names = [alphas[id(v)] for _, v in astate.flat_state()]
        terms = _salience_terms(graphdef, rest, loss_fn, kind, probe=True)
        return _mean_terms(terms, astate, None, batches, names, progress)
    finally:
        for path, lin in targets:
            _swap(module, path, lin)


def _salience_terms(graphdef, rest, loss_fn, kind: str, probe: bool = False):
    """jitted (state, deltas, chunk) → per channel Σ over the chunk's samples. state: the kernels (deltas [K, N]
    beside them), or with `probe` the `_Probe` α's, whose gradients are g_dᵀΔ_c themselves (deltas None)."""
    def sample_loss(kstate, sample):
        one = jax.tree.map(lambda a: a[None], sample)  # a batch of one sample
        loss = jnp.asarray(loss_fn(nnx.merge(graphdef, kstate, rest), one), jnp.float32)
        if loss.size != 1:
            raise ValueError(f"loss_fn returned shape {loss.shape} for a batch of one sample; expected a scalar "
                             "or shape [1] (the sample's loss)")
        return loss.reshape(())

    @jax.jit
    def terms(kstate, deltas, chunk):  # → per channel Σ over the chunk's samples, [N] a linear
        grads = jax.vmap(jax.grad(sample_loss), in_axes=(None, 0))(kstate, chunk)  # [S, K, N] a linear (α: [S, N])
        if probe:
            def from_alpha(t):
                t = t.astype(jnp.float32)
                return jnp.sum(0.5 * t * t if kind == "first-order-off" else jnp.abs(t + 0.5 * t * t), axis=0)

            return jax.tree.map(from_alpha, grads)

        def score(g, d):
            g = g.astype(jnp.float32)
            if kind == "diag":
                e = g * d[None]
                return jnp.sum(jnp.abs(e + 0.5 * e * e), axis=(0, 1))
            t = jnp.einsum("skn,kn->sn", g, d)  # g_dᵀΔ_c
            return jnp.sum(0.5 * t * t if kind == "first-order-off" else jnp.abs(t + 0.5 * t * t), axis=0)

        return jax.tree.map(score, grads, deltas)

    return terms


# ----------------------------------------------------------------------------------------------------
# Calibration statistics and quantization


class _HessianStat(nnx.Variable):
    pass


class _Recorder(nnx.Module):
    """Runs `layer` and adds 2·XᵀX of its input to `h` (X: every token's input row, f32)."""

    def __init__(self, layer: nnx.Linear):
        self.layer = layer
        k = _get(layer.kernel).shape[0]
        self.h = _HessianStat(jnp.zeros((k, k), jnp.float32))

    def __call__(self, x):
        xf = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
        _set(self.h, _get(self.h) + 2.0 * xf.T @ xf)
        return self.layer(x)


def linear_hessians(module: nnx.Module, batches: Iterable, loss_fn: LossFn, *,
                    select: Select | None = None) -> dict[str, jax.Array]:
    """H = 2·XᵀX [K, K] f32 of each selected linear's input X over the calibration batches (one forward each, through
    `loss_fn(module, batch)`, whose value is unused), {dotted path: H}. The module is left as it was."""
    targets = find_linears(module, select)
    _check_targets(targets, module)
    return _hessians(module, targets, batches, loss_fn)


def _hessians(module, targets, batches, loss_fn, progress: bool = False) -> dict[str, jax.Array]:
    recorders = [_Recorder(lin) for _, lin in targets]
    _swapped(module, targets, recorders)
    try:
        run = nnx.jit(lambda m, b: loss_fn(m, b))
        for batch in _progress(batches, progress, "calibration inputs", "batch"):
            _batch_size(batch)
            run(module, batch)
        return {_name(path): _get(rec.h) for (path, _), rec in zip(targets, recorders)}
    finally:
        for path, lin in targets:
            _swap(module, path, lin)


@dataclasses.dataclass(frozen=True)
class LinearsReport:
    """What `quantize_linears` did: the average weight-code bits reached and each linear's 8-bit share."""

    bits: float
    int8_share: dict[str, float]

    def __str__(self) -> str:
        lines = [f"{len(self.int8_share)} linears, {self.bits:.3f} weight bits on average; 8-bit channels:"]
        lines += [f"  {name}: {share:.1%}" for name, share in self.int8_share.items()]
        return "\n".join(lines)


def quantize_linears(module: nnx.Module, batches: Iterable | None, loss_fn: LossFn | None, *,
                     config: QuantConfig = QuantConfig(), select: Select | None = None,
                     scores: dict[str, np.ndarray] | None = None, implementation: Implementation = "auto",
                     linears_per_pass: int | None = None, progress: bool = False) -> LinearsReport:
    """MixLLM on the selected `nnx.Linear`s of `module`, in place: each becomes a `MixedLinear`.

    The 8-bit channels are the most salient over all selected linears at once (`linear_salience`; `config.local`
    ranks inside each linear), `config.bits` counted in weight elements as in `mixjax.quantize`; then GPTQ and the
    clipping search on H from `linear_hessians` (or RTN with `QuantConfig(gptq=False, clip=False)`). batches /
    loss_fn as for `linear_salience`; neither is needed for RTN at 4 or 8 bits. scores: salience computed before
    (reused across budgets). linears_per_pass: how many linears' H (K² × 4 bytes each) are recorded in one forward
    pass over the batches and held at once (default: all, one pass); fewer bound that memory at one pass over the
    batches per group of linears, in `select` order, with the same weights. progress: tqdm bars for the salience
    batches, the calibration forwards and the linears.
    Every check and every weight is done before the first linear is replaced: on an error the module is
    unchanged.
    """
    if config.act.bits is not None and config.act.static:
        raise ValueError("quantize_linears takes dynamic activation scales only; static ones need mixjax.quantize")
    if config.head_bits is not None:
        raise ValueError("QuantConfig.head_bits is mixjax.quantize's embedding / LM head switch; here, select the "
                         "head's nnx.Linear like any other")
    if linears_per_pass is not None and (not isinstance(linears_per_pass, int) or linears_per_pass < 1):
        raise ValueError(f"linears_per_pass={linears_per_pass!r}; expected a positive int or None (all in one pass)")
    targets = find_linears(module, select)
    _check_targets(targets, module)
    names = [_name(path) for path, _ in targets]
    kernels = {_name(path): _get(lin.kernel) for path, lin in targets}  # [K, N]
    batches = None if batches is None else list(batches)
    in_features = {name: kernels[name].shape[0] for name in names}
    mixed = 4.0 < config.bits < 8.0
    needs_data = (mixed and scores is None) or config.gptq or config.clip
    if needs_data and (not batches or loss_fn is None):
        raise ValueError("salience (4 < bits < 8), GPTQ and the clipping search need calibration batches and a "
                         "loss_fn; pass them, or QuantConfig(bits=4 or 8, gptq=False, clip=False) for RTN")
    if mixed:
        if scores is None:
            if config.salience not in NN_SALIENCE_KINDS:
                raise ValueError(f"QuantConfig.salience={config.salience!r}; quantize_linears computes "
                                 f"{NN_SALIENCE_KINDS} (hvp needs mixjax.quantize)")
            scores = _salience(module, targets, batches, loss_fn, config.salience, config.batch_size, progress)
        for name in names:
            want = (kernels[name].shape[1],)
            if np.shape(scores.get(name)) != want:
                raise ValueError(f"scores[{name!r}] has shape {np.shape(scores.get(name))}; expected {want} "
                                 "(from linear_salience on the same model and select=)")
        chosen = allocate({n: np.asarray(scores[n])[None] for n in names}, in_features, config.bits,
                          budget=config.budget, local=config.local)
        is_int8 = {n: chosen[n][0] for n in names}
    else:
        is_int8 = {n: np.full(kernels[n].shape[1], config.bits >= 8.0) for n in names}
    per_pass = linears_per_pass or len(targets)
    news = []
    bar = _progress(range(len(targets)), progress, "quantize linears", "linear")
    for first in range(0, len(targets), per_pass):
        group = targets[first:first + per_pass]  # H of these only, from the float model (nothing swapped in yet)
        hess = _hessians(module, group, batches, loss_fn, progress) if config.gptq or config.clip else {}
        for path, lin in group:
            name = _name(path)
            weight = quantize_weight(kernels[name].T, hess.pop(name, None), is_int8[name], config, path=name)
            bias = None if lin.bias is None else _get(lin.bias)
            news.append(MixedLinear(weight, bias, implementation=implementation))
            if progress:
                bar.update(1)
    if progress:
        bar.close()
    _swapped(module, targets, news)
    return LinearsReport(bits=average_bits({n: is_int8[n][None] for n in names}, in_features),
                         int8_share={n: float(np.mean(is_int8[n])) for n in names})


# ----------------------------------------------------------------------------------------------------
# The Llama family as NNX modules


def _linear_of(w, bias, rngs) -> nnx.Module:
    """An nnx.Linear holding the float weight w [N, K] (and bias [N]); a MixedLinear for a quantized weight."""
    if isinstance(w, QuantizedLinear):
        return MixedLinear(w, bias)
    n, k = w.shape
    return nnx.Linear(k, n, use_bias=bias is not None, param_dtype=w.dtype, rngs=rngs,
                      kernel_init=lambda *_: jnp.asarray(w).T,  # [K, N]
                      bias_init=lambda *_: jnp.asarray(bias))


def _weight_of(layer: nnx.Module) -> tuple[Any, jax.Array | None]:
    """(w [N, K] or the quantized weight, bias or None) of an nnx.Linear or a MixedLinear."""
    bias = None if layer.bias is None else _get(layer.bias)
    if isinstance(layer, MixedLinear):
        return _get(layer.weight), bias
    return _get(layer.kernel).T, bias


class RMSNorm(nnx.Module):
    """x normalized in f32 and scaled by `weight` [D], in Hugging Face's order (`mixjax.model.rms_norm`)."""

    def __init__(self, weight: jax.Array, eps: float):
        self.weight = nnx.Param(jnp.asarray(weight))
        self.eps = eps

    def __call__(self, x):
        return model.rms_norm(x, _get(self.weight), self.eps)


class Attention(nnx.Module):
    def __init__(self, layer: dict, cfg: LlamaConfig, rngs: nnx.Rngs):
        attn = layer["self_attn"]
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(self, name, _linear_of(attn[name]["weight"], attn[name].get("bias"), rngs))
        self.cfg = cfg
        # Qwen3, Gemma 3: RMSNorm over each query and key head before RoPE
        self.q_norm = RMSNorm(layer["q_norm"], cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(layer["k_norm"], cfg.rms_norm_eps) if cfg.qk_norm else None

    def __call__(self, x, rope, mask):  # x [B, T, D]
        B, T, _ = x.shape
        cfg = self.cfg
        H, KVH, Dh = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        q, k = self.q_proj(x).reshape(B, T, H, Dh), self.k_proj(x).reshape(B, T, KVH, Dh)
        if self.q_norm is not None:
            q = model.rms_norm(q, model.query_norm_weight({"q_norm": _get(self.q_norm.weight)}, cfg), cfg.rms_norm_eps)
            k = self.k_norm(k)
        q, k = model.apply_rope(q, *rope), model.apply_rope(k, *rope)
        v = self.v_proj(x).reshape(B, T, KVH, Dh)
        out = attend_ref(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), mask,
                         **model.attention_scores(cfg))  # [B, T, H, Dh]
        return self.o_proj(out.reshape(B, T, H * Dh))


class MLP(nnx.Module):
    def __init__(self, layer: dict, cfg: LlamaConfig, rngs: nnx.Rngs):
        mlp = layer["mlp"]
        for name in ("gate_proj", "up_proj", "down_proj"):
            setattr(self, name, _linear_of(mlp[name]["weight"], mlp[name].get("bias"), rngs))
        self.act = cfg.mlp_act  # "silu" (SwiGLU) or "gelu_tanh" (Gemma's GeGLU)

    def __call__(self, x):
        return self.down_proj(model.mlp_activation(self.act)(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    def __init__(self, layer: dict, cfg: LlamaConfig, rngs: nnx.Rngs):
        eps = cfg.rms_norm_eps
        self.input_layernorm = RMSNorm(layer["input_layernorm"], eps)
        self.self_attn = Attention(layer, cfg, rngs)
        self.post_attention_layernorm = RMSNorm(layer["post_attention_layernorm"], eps)
        self.mlp = MLP(layer, cfg, rngs)
        # Gemma 3: each branch's output normalized before its residual add
        self.attn_output_norm = RMSNorm(layer["attn_output_norm"], eps) if cfg.sandwich_norms else None
        self.mlp_output_norm = RMSNorm(layer["mlp_output_norm"], eps) if cfg.sandwich_norms else None

    def __call__(self, x, rope, mask):  # rope, mask: this layer's (`mixjax.model._layer_attention`)
        out = self.self_attn(self.input_layernorm(x), rope, mask)
        x = x + (out if self.attn_output_norm is None else self.attn_output_norm(out))
        out = self.mlp(self.post_attention_layernorm(x))
        return x + (out if self.mlp_output_norm is None else self.mlp_output_norm(out))


class Llama(nnx.Module):
    """A Llama-family causal LM (Llama 2/3, Mistral, Qwen2, Qwen3, SmolLM2/3, Phi-3, Gemma 1/3) as NNX modules:
    `model(tokens) → logits`.

    The projections are `nnx.Linear`s (or `MixedLinear`s), so `quantize_linears(llama, ..., select=
    Llama.decoder_linears)` quantizes it with MixLLM; `to_params()` gives the functional params back for
    `mixjax.generate` (KV cache, the decode kernels) and `mixjax.perplexity`. The embedding table and the LM head
    stay float arrays (`QuantConfig.head_bits` in `mixjax.quantize` quantizes those). `generate(prompts, ...)`
    decodes through `mixjax.generate`."""

    def __init__(self, cfg: LlamaConfig, params: dict, *, rngs: nnx.Rngs | None = None):
        rngs = rngs or nnx.Rngs(0)
        self.cfg = cfg
        float_leaves = [params["embed_tokens"], params["norm"]]
        if any(isinstance(w, QuantizedLinear) for w in float_leaves) or (
                not cfg.tie_word_embeddings and isinstance(params.get("lm_head"), QuantizedLinear)):
            raise ValueError("Llama takes float embedding / LM head arrays; these params quantized them "
                             "(QuantConfig.head_bits): use mixjax.forward / mixjax.generate on them instead")
        self.embed_tokens = nnx.Param(jnp.asarray(params["embed_tokens"]))  # [V, D]
        self.layers = nnx.List([DecoderLayer(layer, cfg, rngs) for layer in model.layer_views(params["layers"])])
        self.norm = RMSNorm(params["norm"], cfg.rms_norm_eps)
        self.lm_head = None if cfg.tie_word_embeddings else nnx.Param(jnp.asarray(params["lm_head"]))  # [V, D]

    @classmethod
    def from_pretrained(cls, path, *, dtype=jnp.float32) -> "Llama":
        """A Hugging Face directory, a .gguf file or a float mixjax Orbax checkpoint (`convert.load`)."""
        import convert

        cfg, params = convert.load(path, dtype=dtype)
        return cls(cfg, params)

    @staticmethod
    def decoder_linears(path: str, layer: nnx.Linear) -> bool:
        """`select=` for `quantize_linears`: the seven projections of every decoder layer (MixLLM's linears)."""
        return path.startswith("layers.")

    def __call__(self, tokens: jax.Array) -> jax.Array:  # [B, T] int → logits [B, T, V] f32
        tokens = jnp.asarray(tokens)
        model._check_tokens(tokens, self.cfg)
        B, T = tokens.shape
        positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        shared = model._positional(self.cfg, positions, positions)  # RoPE tables and masks [B, T, T]
        table = _get(self.embed_tokens)
        x = model.embed({"embed_tokens": table}, tokens, self.cfg)
        for i, layer in enumerate(self.layers):
            rope, mask, _ = model._layer_attention(self.cfg, i, shared)  # (NoPE, sliding-window layers)
            x = layer(x, rope, mask)
        x = self.norm(x)
        head = table if self.lm_head is None else _get(self.lm_head)
        logits = linear(x, head).astype(jnp.float32)
        cap = self.cfg.final_logit_softcap
        return logits if cap is None else cap * jnp.tanh(logits / cap)

    def generate(self, prompt_tokens, **kwargs) -> list[list[int]]:
        """Continues each prompt (token id lists): `mixjax.generate` on `to_params()`, so the KV cache, the decode
        kernels on a GPU and every keyword of `mixjax.generate` (max_new_tokens, temperature, cache_dtype, mesh,
        ...). Each call converts the modules again; for many calls keep `params = model.to_params()` and call
        `mixjax.generate(params, model.cfg, ...)`."""
        from mixjax.generate import generate

        return generate(self.to_params(), self.cfg, prompt_tokens, **kwargs)

    def to_params(self) -> dict:
        """The functional params (`mixjax.model`'s layout): float layers stacked; a tuple of layers once any linear
        is quantized (per-layer 8-bit channel counts differ)."""
        layers = []
        for layer in self.layers:
            attn, mlp = {}, {}
            for group, names, out in ((layer.self_attn, ("q_proj", "k_proj", "v_proj", "o_proj"), attn),
                                      (layer.mlp, ("gate_proj", "up_proj", "down_proj"), mlp)):
                for name in names:
                    w, b = _weight_of(getattr(group, name))
                    out[name] = {"weight": w} if b is None else {"weight": w, "bias": b}
            layers.append({"input_layernorm": _get(layer.input_layernorm.weight),
                           "post_attention_layernorm": _get(layer.post_attention_layernorm.weight),
                           "self_attn": attn, "mlp": mlp})
            if layer.self_attn.q_norm is not None:
                layers[-1].update(q_norm=_get(layer.self_attn.q_norm.weight), k_norm=_get(layer.self_attn.k_norm.weight))
            if layer.attn_output_norm is not None:
                layers[-1].update(attn_output_norm=_get(layer.attn_output_norm.weight),
                                  mlp_output_norm=_get(layer.mlp_output_norm.weight))
        params = {"embed_tokens": _get(self.embed_tokens), "norm": _get(self.norm.weight)}
        if self.lm_head is not None:
            params["lm_head"] = _get(self.lm_head)
        quantized = any(isinstance(leaf, QuantizedLinear) for leaf in
                        jax.tree.leaves(layers, is_leaf=lambda x: isinstance(x, QuantizedLinear)))
        params["layers"] = tuple(layers) if quantized else jax.tree.map(lambda *a: jnp.stack(a), *layers)
        return params
