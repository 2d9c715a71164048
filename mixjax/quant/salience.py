"""MixLLM output-channel salience: the estimated loss increase of quantizing one channel to 4 bits.

For a channel c (row of a linear weight) with Δ_c = RTN4(w_c) − w_c and g_d the LM-loss gradient of
calibration sample d (labels = inputs, mean over its tokens), MixLLM scores

    S_c = mean_d |g_dᵀΔ_c + ½ (g_dᵀΔ_c)²|          ("fisher": first order + full-channel empirical Fisher)

Variants (ablations):
- "first-order-off": S_c = mean_d ½ (g_dᵀΔ_c)².
- "diag" (the official code's `use_diagnal` switch): S_c = mean_d Σ_k |e_k + ½ e_k²| with e_k = g_dk Δ_ck,
  the absolute value taken per element before the sum over K. Needs per-sample weight gradients, so it
  runs one sample at a time.
- "hvp": S_c = mean_d |g_dᵀΔ_c + ½ Δ_cᵀ(H_d Δ)_c| with H_d the loss Hessian in the weights and Δ the
  whole model's RTN4 perturbation (a Hessian-vector product; the terms over c sum to ½ ΔᵀH_dΔ).

How g_dᵀΔ_c is computed without per-sample weight gradients: every decoder linear becomes a probe
`y = x Wᵀ + α ⊙ (x Δᵀ)` with α [B, N] zeros (one α per sample and channel). With the loss
Σ_b L_b, ∂/∂α[b, c] = Σ_t δy[b, t, c]·(x_b Δᵀ)[t, c] = g_bᵀΔ_c exactly, for all channels of all linears of
all layers in one backward pass. The HVP is `jax.jvp` of that gradient with tangent α = 1. Each decoder
layer is rematerialised (`jax.checkpoint`), so activation memory is one layer's worth plus the layer
inputs: long sequences stay bounded. Scores are float64 on the host, `dict[linear name → [L, N]]`.

Memory: stacked params (as `convert.load` gives them) run under `lax.scan`, each layer's Δ computed inside
its iteration (redone in the backward), so the pass holds the weights once and one layer's work at a time. A
tuple of layers runs as a Python loop holding every layer's Δ (`HOLD_DELTAS`), 2× the decoder's weights;
`HOLD_DELTAS = False` computes them in the loop's layers instead, which XLA's CPU scheduler hoists out of them.
XLA's CPU compile, 4 / 8 Llama-3-8B layers in f32 at 4 × 2048 tokens: stacked 7.2 / 10.4 GiB of arguments and
13.6 / 14.1 of temporaries; the tuple with Δ held 10.4 / 16.9 and 45.6 / 83.1 (`benchmarks/salience_memory.py`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Iterable, Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from mixjax import model
from mixjax.config import LlamaConfig
from mixjax.linear import Implementation
from mixjax.parallel import check_mesh, keep_or_replicate, shard_samples
from mixjax.quant.rtn import rtn4_delta

SalienceKind = Literal["fisher", "diag", "first-order-off", "hvp"]
SALIENCE_KINDS = ("fisher", "diag", "first-order-off", "hvp")
HOLD_DELTAS = True  # the probe pass holds every layer's Δ (True), or computes each where its layer runs (False)


@functools.partial(jax.tree_util.register_dataclass, data_fields=["w", "delta", "alpha"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class ProbeWeight:
    """w [N, K] float, delta [N, K] = RTN4(w) − w (None: computed from w where the matmul runs), alpha [B, N]:
    y = x Wᵀ + α ⊙ (x Δᵀ)."""

    w: jax.Array
    delta: jax.Array | None
    alpha: jax.Array

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.w.shape)

    def matmul(self, x: jax.Array, *, implementation: Implementation = "auto") -> jax.Array:
        """x [B, T, K] → [B, T, N]."""
        delta = self.delta
        if delta is None:  # tied to x, so that XLA computes it where this layer runs (HOLD_DELTAS = False)
            w, _ = jax.lax.optimization_barrier((self.w, x))
            delta = rtn4_delta(w).astype(w.dtype)
        y = jnp.einsum("btk,nk->btn", x, self.w.astype(x.dtype), preferred_element_type=jnp.float32)
        yd = jnp.einsum("btk,nk->btn", x, delta.astype(x.dtype), preferred_element_type=jnp.float32)
        return (y + self.alpha[:, None, :] * yd).astype(x.dtype)


def linear_weight(layer: dict, name: str):
    group, proj = name.split(".")
    return layer[group][proj]["weight"]


def with_weights(layer: dict, weights: dict[str, Any]) -> dict:
    """A copy of a per-layer dict with the given linears' weights replaced."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in layer.items()}
    for name, w in weights.items():
        group, proj = name.split(".")
        out[group][proj] = {**out[group][proj], "weight": w}
    return out


def rtn4_deltas(layers: tuple) -> tuple[dict[str, jax.Array], ...]:
    """Δ = RTN4(w) − w per linear per layer, in the weight dtype (bf16 weights: bf16 Δ, half the memory)."""
    return tuple({n: rtn4_delta(linear_weight(layer, n)).astype(linear_weight(layer, n).dtype)
                  for n in model.LINEAR_NAMES} for layer in layers)


def per_sample_loss(params, layers, tokens, cfg: LlamaConfig) -> jax.Array:
    """Σ_b mean_t CE(b, t) with labels = inputs; each decoder layer rematerialised. tokens [B, T].

    layers: a tuple of per-layer dicts (a Python loop), or one dict of stacked [L, ...] leaves (`lax.scan`: the
    loop's iterations run one after another, so what a layer computes lives only while it runs)."""
    @jax.checkpoint
    def run_layer(x, layer, index):
        return model.decoder_layer(layer, x, cfg, layer_index=index, implementation="xla")

    x = model.embed(params, tokens, cfg)  # [B, T, D]
    if isinstance(layers, dict):
        n = jax.tree.leaves(layers)[0].shape[0]
        x, _ = jax.lax.scan(lambda h, xs: (run_layer(h, *xs), None), x, (layers, jnp.arange(n, dtype=jnp.int32)))
    else:
        for i, layer in enumerate(layers):
            x = run_layer(x, layer, i)
    logits = model.final_logits(params, x, cfg, "xla")[:, :-1]  # [B, T-1, V]
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, tokens[:, 1:, None], axis=-1)[..., 0]
    return jnp.sum(jnp.mean(lse - picked, axis=-1))


def _probe_layers(layers, deltas, alphas):
    if isinstance(layers, dict):  # stacked: one ProbeWeight of [L, ...] leaves a linear, sliced by the scan
        return with_weights(layers, {n: ProbeWeight(linear_weight(layers, n), None, alphas[n])
                                     for n in model.LINEAR_NAMES})
    if deltas is None:
        deltas = tuple({n: None for n in model.LINEAR_NAMES} for _ in layers)
    return tuple(
        with_weights(layer, {n: ProbeWeight(linear_weight(layer, n), d[n], a[n]) for n in model.LINEAR_NAMES})
        for layer, d, a in zip(layers, deltas, alphas)
    )


@functools.partial(jax.jit, static_argnames=("cfg", "hvp"))
def probe_terms(params, layers, tokens, *, cfg: LlamaConfig, hvp: bool = False, deltas=None):
    """Per sample and channel: u = g_bᵀΔ_c, and (hvp) v = Δ_cᵀ(H_b Δ)_c. Each a tuple of dicts of [B, N], or for
    stacked layers (one dict of [L, ...] leaves, run by `lax.scan`) one dict of [L, B, N].

    deltas: a tuple of dicts of Δ (`rtn4_deltas`, held for the whole model), or None: each layer's Δ computed
    inside its rematerialised block (the same values; the tests compare the two). Stacked layers always take
    None: inside the scan, one layer's Δ exists at a time."""
    B = tokens.shape[0]
    if isinstance(layers, dict):
        if deltas is not None:
            raise ValueError("probe_terms: stacked layers compute each layer's Δ in the scan; pass deltas=None")
        alphas = {n: jnp.zeros((w.shape[0], B, w.shape[1]), jnp.float32)
                  for n, w in ((n, linear_weight(layers, n)) for n in model.LINEAR_NAMES)}
    else:
        alphas = tuple({n: jnp.zeros((B, linear_weight(layer, n).shape[0]), jnp.float32)
                        for n in model.LINEAR_NAMES} for layer in layers)

    def loss(alphas):
        return per_sample_loss(params, _probe_layers(layers, deltas, alphas), tokens, cfg)

    grad = jax.grad(loss)
    if not hvp:
        return grad(alphas), None
    ones = jax.tree.map(jnp.ones_like, alphas)
    return jax.jvp(grad, (alphas,), (ones,))


@functools.partial(jax.jit, static_argnames=("cfg", "first_order"))
def diag_terms(params, layers, deltas, tokens, *, cfg: LlamaConfig, first_order: bool = True):
    """Official "diagonal Fisher" per channel for one sample: Σ_k |e + ½e²|, e = g ⊙ Δ. tokens [1, T]."""
    weights = tuple({n: linear_weight(layer, n) for n in model.LINEAR_NAMES} for layer in layers)

    def loss(weights):
        return per_sample_loss(params, tuple(with_weights(l, w) for l, w in zip(layers, weights)), tokens, cfg)

    grads = jax.grad(loss)(weights)

    def score(g, d):
        e = g.astype(jnp.float32) * d  # [N, K]
        s = 0.5 * e * e + (e if first_order else 0.0)
        return jnp.sum(jnp.abs(s), axis=-1)  # [N]

    return jax.tree.map(score, grads, deltas)


def combine(u: np.ndarray, v: np.ndarray | None, kind: SalienceKind) -> np.ndarray:
    """Per-sample terms [B, N] → per-sample scores [B, N]."""
    if kind == "fisher":
        return np.abs(u + 0.5 * u * u)
    if kind == "first-order-off":
        return 0.5 * u * u
    if kind == "hvp":
        return np.abs(u + 0.5 * v)
    raise ValueError(f"salience kind {kind!r} has no per-sample probe terms")


def compute_salience(
    params: dict,
    batches: Iterable[np.ndarray],
    cfg: LlamaConfig,
    *,
    kind: SalienceKind = "fisher",
    progress: bool = False,
    mesh: Mesh | None = None,
) -> dict[str, np.ndarray]:
    """Salience of every output channel of every decoder linear: {linear name: float64 [L, N]}.

    `params` are float params (stacked or a tuple of layers); `batches` yields int [B, T] token arrays. Stacked
    params take the least memory: the weights once, each layer's Δ only while its scan iteration runs.
    mesh: a one-axis "data" mesh (`mixjax.data_mesh`) splits each batch's samples over its devices, the
    params replicated, or split too where `mixjax.shard_weights` placed them (see `mixjax.parallel`); "diag",
    one sample at a time, runs on one device.
    Checks every gradient term for NaN/Inf and names the layer.
    """
    if kind not in SALIENCE_KINDS:
        raise ValueError(f"salience kind={kind!r}; expected one of {SALIENCE_KINDS}")
    check_mesh(mesh)
    if kind == "diag":
        mesh = None
    # stacked params run as they are, by `lax.scan` with each layer's Δ computed in its iteration: the weights once,
    # no copy and no Δ for the whole model; a tuple of layers by the Python loop, Δ held (HOLD_DELTAS)
    stacked = kind != "diag" and not isinstance(params["layers"], (tuple, list))
    # params from `shard_weights` stay split over the mesh (FSDP: XLA gathers each layer in its iteration)
    params = keep_or_replicate(params if stacked else model.unstack_layers(params), mesh)
    layers = params["layers"]
    n_layers = jax.tree.leaves(layers)[0].shape[0] if stacked else len(layers)
    rest = {k: v for k, v in params.items() if k != "layers"}
    held = not stacked and (kind == "diag" or HOLD_DELTAS)
    deltas = rtn4_deltas(layers) if held else None
    totals = [{n: 0.0 for n in model.LINEAR_NAMES} for _ in range(n_layers)]
    count = 0
    for batch in _progress(batches, progress, "salience"):
        batch = np.asarray(batch)
        if kind == "diag":
            tokens = jnp.asarray(batch, jnp.int32)
            for b in range(tokens.shape[0]):
                terms = jax.device_get(diag_terms(rest, layers, deltas, tokens[b : b + 1], cfg=cfg))
                _check_finite(terms, "diagonal-Fisher salience")
                _accumulate(totals, terms, lambda t: t)
        else:
            tokens, _, n = shard_samples(batch, mesh)
            u, v = jax.device_get(probe_terms(rest, layers, tokens, cfg=cfg, hvp=kind == "hvp", deltas=deltas))
            if stacked:  # {name: [L, B, N]} → per layer {name: [B, N]}
                u, v = (None if t is None else tuple({k: t[k][i] for k in t} for i in range(n_layers)) for t in (u, v))
            u, v = jax.tree.map(lambda t: t[:n], (u, v))  # drop the padding samples
            _check_finite(u, "loss gradient (g·Δ)")
            if v is not None:
                _check_finite(v, "Hessian-vector product (ΔᵀHΔ)")
            for i, layer_u in enumerate(u):
                for n in model.LINEAR_NAMES:
                    s = combine(np.asarray(layer_u[n], np.float64), None if v is None else np.asarray(v[i][n], np.float64), kind)
                    totals[i][n] = totals[i][n] + s.sum(axis=0)
        count += batch.shape[0]
    if count == 0:
        raise ValueError("salience needs at least one calibration sample; the calibration set is empty")
    return {n: np.stack([np.asarray(t[n], np.float64) for t in totals]) / count for n in model.LINEAR_NAMES}


def _accumulate(totals, terms, f):
    for i, layer_terms in enumerate(terms):
        for n in model.LINEAR_NAMES:
            totals[i][n] = totals[i][n] + np.asarray(f(layer_terms[n]), np.float64)


def _check_finite(terms, what: str) -> None:
    for i, layer_terms in enumerate(terms):
        for n in model.LINEAR_NAMES:
            if not np.all(np.isfinite(np.asarray(layer_terms[n]))):
                raise FloatingPointError(
                    f"non-finite {what} in layers.{i}.{n}: check that layer's weights and the calibration tokens"
                )


def _progress(it, enabled: bool, desc: str):
    if not enabled:
        return it
    from tqdm.auto import tqdm

    return tqdm(it, desc=desc, unit="batch")
