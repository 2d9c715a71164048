"""Small helpers shared by the test modules."""

from __future__ import annotations

import numpy as np


def tenth(rng: np.random.Generator, n: int) -> np.ndarray:
    """A random 10 % of n channels as a bool mask, exactly round(n / 10) of them: weights of one shape then
    pack to the same sub-matrix shapes, so a model's layers share their compiled programs (a draw per
    channel gave every layer its own shapes and its own compilations)."""
    mask = np.zeros(n, bool)
    mask[rng.permutation(n)[: round(n / 10)]] = True
    return mask


def tiny_mixed_model(key: int, rng: np.random.Generator, *, fuse: bool = True):
    """(cfg, params): a 2-layer Llama (hidden 256, GQA 4/2 heads) with weights ×5 (so quantization shows),
    unstacked, every decoder linear a MixedWeight (a random tenth of its channels at 8 bits), q/k/v and
    gate/up fused (unless `fuse` is False); the embeddings and LM head float."""
    import jax
    import jax.numpy as jnp

    import pallas_kernels as pk
    from mixjax import model
    from mixjax.config import LlamaConfig

    cfg = LlamaConfig(vocab_size=97, hidden_size=256, intermediate_size=384, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=64, rope_theta=10000.0)
    params = jax.tree.map(lambda a: a * 5.0 if a.ndim >= 2 else a, model.init_params(cfg, jax.random.key(key), jnp.float32))
    params = model.unstack_layers(params)
    for layer in params["layers"]:
        for group in ("self_attn", "mlp"):
            for p in layer[group].values():
                p["weight"] = pk.pack_rtn(np.asarray(p["weight"]), tenth(rng, p["weight"].shape[0]))
    return cfg, model.fuse_projections(params) if fuse else params


def prefill_then_step(params, cfg, tokens, *, prompt: int, cache_len: int):
    """(logits of the prefill of tokens[:, :prompt], logits of one cached step on the rest) as numpy, through
    `model.forward_step` on the XLA path jitted anew: the module flags a test sets are read while tracing
    (and one compilation beats running the model op by op)."""
    import functools

    import jax
    import jax.numpy as jnp

    from mixjax import model

    cache = model.init_cache(cfg, tokens.shape[0], cache_len, jnp.float32)
    forward = jax.jit(functools.partial(model.forward_step, cfg=cfg, implementation="xla"))
    first, cache = forward(params, tokens[:, :prompt], cache=cache)
    step, _ = forward(params, tokens[:, prompt:], cache=cache)
    return np.asarray(first), np.asarray(step)
