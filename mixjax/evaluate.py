"""Perplexity of a model over token windows.

Each window [T] contributes its T-1 next-token predictions; perplexity = exp(mean NLL over all
predictions of all windows), the same quantity as `exp(loss)` of a Hugging Face causal LM run on each
window with `labels = input_ids`. Each batch runs as one jitted call returning the NLL sum in f32;
sums are accumulated on the host in float64.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mixjax import model
from mixjax.config import LlamaConfig
from mixjax.linear import Implementation
from mixjax.parallel import (DATA_AXIS, check_mesh, check_params_for_mesh, has_split_weights, is_model_mesh,
                             local_config, mesh_or_none, replicate, tensor_parallel_jit)


def perplexity(params, cfg: LlamaConfig, windows, *, batch_size: int = 4,
               implementation: Implementation = "auto", progress: bool = False, mesh: Mesh | None = None) -> float:
    """exp(mean next-token NLL) of `params` over `windows` int [N, T] (T ≥ 2).

    mesh: a one-axis "data" mesh (`mixjax.data_mesh()`): each batch (`batch_size` rounded up to a multiple of
    the device count) is split over its devices, the params replicated; every device runs the model as one
    device does (`shard_map`, so the Pallas kernels too) and the NLL sums are added across them. Or a "model"
    mesh (`mixjax.model_mesh()`) with params from `mixjax.shard_model` on it: tensor parallel.
    """
    windows = np.asarray(windows)
    _check_windows(windows, cfg, batch_size)
    check_mesh(mesh, tensor_parallel=True)
    check_params_for_mesh(params, mesh)
    n, T = windows.shape
    total = _sum_over_batches(_nll_sum, params, windows, batch_size, progress, mesh, cfg=cfg,
                              implementation=implementation)
    return math.exp(float(total) / (n * (T - 1)))


def _sum_over_batches(body, params, windows, batch_size, progress, mesh, **static):
    """Σ over batches of body(params, tokens [B, T], weight [B], **static) (a weighted sum over the rows), in
    float64 on the host. With a mesh, each batch (its size rounded up to a multiple of the device count) is split
    over the devices and the params replicated; each device runs `body` on its rows (`shard_map`, so the Pallas
    kernels run as on one device) and the sums are psum'd. Float params split by `shard_weights` stay split: XLA
    partitions the jitted body itself, gathering each layer's weights as it runs."""
    if mesh is None:
        call = functools.partial(_jitted(body, tuple(static)), **static)
    elif is_model_mesh(mesh):  # params from shard_model: every device runs every row on its slice of the model
        call, mesh = _tensor_parallel(body, mesh, tuple(sorted(static.items()))), None
    else:
        batch_size = -(-batch_size // mesh.size) * mesh.size
        if has_split_weights(params, mesh):  # FSDP float weights: XLA partitions the program, no shard_map
            call = functools.partial(_jitted(body, tuple(static)), **static)
        else:
            params, call = replicate(params, mesh), _split(body, mesh, tuple(sorted(static.items())))
        rows = NamedSharding(mesh, PartitionSpec(DATA_AXIS))
    total = 0.0
    for chunk, weight in _padded_batches(windows, batch_size, progress):
        if mesh is not None:
            chunk, weight = jax.device_put((chunk, weight), rows)
        total = total + np.asarray(call(params, chunk, weight), np.float64)
    return total


@functools.cache
def _jitted(body, static_names: tuple):
    return jax.jit(body, static_argnames=static_names)


@functools.lru_cache(maxsize=16)
def _tensor_parallel(body, mesh: Mesh, static: tuple):
    static = {**dict(static), "cfg": local_config(dict(static)["cfg"], mesh.size)}
    return tensor_parallel_jit(functools.partial(body, **static), mesh, 1)


@functools.lru_cache(maxsize=16)
def _split(body, mesh: Mesh, static: tuple):
    def local(params, tokens, weight):  # tokens [B / devices, T] on each device
        return jax.lax.psum(body(params, tokens, weight, **dict(static)), DATA_AXIS)

    rows = PartitionSpec(DATA_AXIS)
    return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(PartitionSpec(), rows, rows), out_specs=PartitionSpec(),
                                 check_vma=False))


def _padded_batches(windows: np.ndarray, batch_size: int, progress: bool):
    """(tokens int32 [batch_size, T], row weights f32 [batch_size]) per batch of windows; the last batch is padded
    with zero-weight rows to keep one compiled shape."""
    n, T = windows.shape
    starts = range(0, n, batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="perplexity", unit="batch")
    for start in starts:
        chunk = windows[start : start + batch_size]  # [b, T]
        weight = np.ones(batch_size, np.float32)
        if len(chunk) < batch_size:
            weight[len(chunk):] = 0.0
            chunk = np.concatenate([chunk, np.zeros((batch_size - len(chunk), T), chunk.dtype)])
        yield jnp.asarray(chunk, jnp.int32), jnp.asarray(weight)


def _nll_sum(params, tokens, weight, *, cfg, implementation):
    """Sum of next-token NLL over tokens [B, T], rows weighted by weight [B] → f32 scalar."""
    logits = model.forward(params, tokens, cfg, implementation=implementation)[:, :-1]  # [B, T-1, V]
    targets = tokens[:, 1:]  # [B, T-1]
    lse = jax.nn.logsumexp(logits, axis=-1)  # [B, T-1]
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]  # [B, T-1]
    return jnp.sum((lse - picked).sum(axis=-1) * weight)


def phased_perplexity(phases, cfg: LlamaConfig, windows, *, prompt: int, batch_size: int = 4,
                      implementation: Implementation = "auto", progress: bool = False,
                      mesh: Mesh | None = None) -> float:
    """exp(mean NLL) of each window's tokens after its first `prompt`, the model run in phases through the KV
    cache as generation runs it: `phases` = [(params, end), ...], each params running positions [previous end,
    end) of every window (ends increasing, the last = T). A token is predicted by the phase that ran the
    position before it: the first scored token (position `prompt`) by the phase that ran the prompt's last
    position. With one phase this is `perplexity` over the predictions after the prompt (progressive precision
    switching during decoding, `mixjax ablate progressive`, runs several)."""
    return math.exp(float(np.mean(phased_nll(phases, cfg, windows, prompt=prompt, batch_size=batch_size,
                                             implementation=implementation, progress=progress, mesh=mesh))))


def phased_nll(phases, cfg: LlamaConfig, windows, *, prompt: int, batch_size: int = 4,
               implementation: Implementation = "auto", progress: bool = False,
               mesh: Mesh | None = None, cache_dtype=jnp.float32) -> np.ndarray:
    """`phased_perplexity`'s NLL per position: float64 [T − prompt], entry i the mean over windows of the NLL of
    the token at position prompt + i (so a later range's perplexity is exp of a slice's mean). cache_dtype: the
    KV cache's (`model.init_cache`; jnp.int8: every key and value quantized as `generate --kv-int8` stores them,
    before any attention reads them)."""
    windows = np.asarray(windows)
    _check_windows(windows, cfg, batch_size)
    check_mesh(mesh, tensor_parallel=True)
    for params, _ in phases:
        check_params_for_mesh(params, mesh)
    n, T = windows.shape
    ends = tuple(int(end) for _, end in phases)
    if not phases or any(b <= a for a, b in zip((0,) + ends, ends)) or ends[-1] != T:
        raise ValueError(f"phase ends {list(ends)} must increase from above 0 to the window length T={T}")
    if not 1 <= prompt < T:
        raise ValueError(f"prompt={prompt} must lie in [1, T={T}): at least one token to condition on and one to score")
    total = _sum_over_batches(_phased_nll_sum, tuple(p for p, _ in phases), windows, batch_size, progress, mesh,
                              cfg=cfg, ends=ends, prompt=prompt, implementation=implementation,
                              cache_dtype=jnp.dtype(cache_dtype))
    return total / n


def _phased_nll_sum(phase_params, tokens, weight, *, cfg, ends, prompt, implementation, cache_dtype=jnp.float32):
    """NLL of tokens [B, T] at positions prompt … T-1 summed over the weighted rows → f32 [T − prompt]; phase i's
    params run positions [ends[i-1], ends[i]) through a KV cache of `cache_dtype`."""
    cache = model.init_cache(cfg, tokens.shape[0], tokens.shape[1], cache_dtype)
    logits, begin = [], 0
    for params, end in zip(phase_params, ends):
        out, cache = model.forward_step(params, tokens[:, begin:end], cfg, cache, implementation=implementation)
        logits.append(out)
        begin = end
    logits = jnp.concatenate(logits, axis=1)[:, prompt - 1 : -1]  # the predictions of positions prompt … T-1
    targets = tokens[:, prompt:]
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return jnp.sum((lse - picked) * weight[:, None], axis=0)


def _check_windows(windows: np.ndarray, cfg: LlamaConfig, batch_size: int) -> None:
    if windows.ndim != 2 or windows.shape[0] == 0 or windows.shape[1] < 2:
        raise ValueError(f"windows must be int [N, T] with N ≥ 1 and T ≥ 2; got shape {windows.shape}")
    if not np.issubdtype(windows.dtype, np.integer):
        raise ValueError(f"windows must hold integer token ids; got dtype {windows.dtype}")
    if windows.min() < 0 or windows.max() >= cfg.vocab_size:
        raise ValueError(
            f"token ids must lie in [0, vocab_size={cfg.vocab_size}); got [{windows.min()}, {windows.max()}]"
            " (was the data tokenized with this model's tokenizer?)"
        )
    if windows.shape[1] > cfg.max_position_embeddings:
        raise ValueError(
            f"window length {windows.shape[1]} exceeds the model context "
            f"max_position_embeddings={cfg.max_position_embeddings}; use a shorter seq_len"
        )
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be a positive integer")


def evaluate_model(*, model_path=None, data: str = "wikipedia", seq_len: int = 2048,
                   max_tokens: int | None = None, batch_size: int = 4, dtype=jnp.float32,
                   implementation: Implementation = "auto", progress: bool = False,
                   devices: int | None = None, shard_weights: bool = False) -> dict:
    """Loads a model (default: the embedded one) and measures its perplexity on `data`.

    devices: local devices each batch is split over (None: all; `perplexity(mesh=...)`).
    shard_weights: a float model's weights split over those devices too, loaded straight into their slices
      (`mixjax.shard_weights`): for a model one device cannot hold.
    Returns {"perplexity", "windows", "seq_len", "data", "model", "devices"}.
    """
    import convert
    from mixjax import assets, data as data_lib
    from mixjax.quant.checkpoint import is_quantized_checkpoint

    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be a positive integer")
    mesh = mesh_or_none(devices)
    path = assets.resolve_model_path(model_path)
    tokenizer = convert.load_tokenizer(path)
    windows = data_lib.eval_windows(tokenizer, data, seq_len, max_tokens)  # [N, T]
    if shard_weights and is_quantized_checkpoint(path):
        raise ValueError(f"{path} is a quantized checkpoint: --shard-weights splits float weights; a quantized model "
                         "is replicated on each device (drop --shard-weights)")
    cfg, params = convert.load(path, dtype=dtype, mesh=mesh if shard_weights else None)
    # same outputs, fewer launches; the stored row-major codes, which the prompt-shaped GEMMs' unpack reads 1–2 %
    # faster than the tiled order batched decoding wants (`model.TILED_CODES`)
    params = model.fuse_projections(params, tile=False)
    ppl = perplexity(params, cfg, windows, batch_size=batch_size, implementation=implementation, progress=progress,
                     mesh=mesh)
    return {"perplexity": ppl, "windows": int(windows.shape[0]), "seq_len": seq_len, "data": str(data),
            "model": str(path), "devices": 1 if mesh is None else mesh.size}
