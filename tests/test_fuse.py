"""Fused projections: q/k/v and gate/up as one weight give the same model outputs, float and quantized."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixjax import model
from mixjax.config import LlamaConfig
from pallas_kernels import MixedWeight, dequantize, mixed_matmul, pack_rtn
from pallas_kernels.fuse import concat_mixed

CFG = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_theta=10000.0,
                  max_position_embeddings=64)


def _rng():
    return np.random.default_rng()  # fresh inputs every run


def _random_mixed(rng, n, k, share):
    w = rng.standard_normal((n, k)).astype(np.float32)
    return pack_rtn(w, rng.random(n) < share)


@pytest.mark.parametrize("k", [128, 200])
def test_concat_mixed_equals_the_parts(k):
    rng = _rng()
    parts = [_random_mixed(rng, n, k, share) for n, share in ((96, 0.1), (40, 0.0), (130, 1.0), (33, 0.5))]
    fused = concat_mixed(parts)
    assert fused.shape == (sum(p.n for p in parts), k) and fused.n8 == sum(p.n8 for p in parts)
    np.testing.assert_array_equal(np.asarray(dequantize(fused)),
                                  np.concatenate([np.asarray(dequantize(p)) for p in parts]))
    x = jnp.asarray(rng.standard_normal((5, k)), jnp.float32)
    y = mixed_matmul(x, fused, implementation="xla")
    expect = jnp.concatenate([mixed_matmul(x, p, implementation="xla") for p in parts], axis=1)
    np.testing.assert_allclose(np.asarray(y), np.asarray(expect), rtol=1e-6, atol=1e-5)
    y_kernel = mixed_matmul(x, fused, interpret=True)  # the Pallas kernel on the fused layout
    np.testing.assert_allclose(np.asarray(y_kernel), np.asarray(expect), rtol=1e-4, atol=1e-4)


def test_concat_all_8bit_parts_keeps_channel_order():
    """Every channel 8-bit: the parts' padding rows go, so the fused weight holds channel c at row c of q8
    (MixedWeight's invariant, read as it is by the Mosaic GPU prefill GEMM), and computes what the parts do."""
    rng = _rng()
    k = 200
    parts = [_random_mixed(rng, n, k, 1.0) for n in (96, 40, 130)]
    fused = concat_mixed(parts)
    n = sum(p.n for p in parts)
    assert fused.n8 == fused.n == n and fused.q8.shape == (384, 256) and fused.q4.shape[0] == 0
    assert np.array_equal(np.asarray(fused.row_of_channel), np.arange(n))
    assert np.array_equal(np.asarray(fused.channel), np.concatenate([np.arange(n), np.full(384 - n, n)]))
    assert not np.any(np.asarray(fused.q8[n:])) and not np.any(np.asarray(fused.scale8[:, n:]))
    np.testing.assert_array_equal(np.asarray(dequantize(fused)),
                                  np.concatenate([np.asarray(dequantize(p)) for p in parts]))
    x = jnp.asarray(rng.standard_normal((3, k)), jnp.float32)
    expect = jnp.concatenate([mixed_matmul(x, p, implementation="xla") for p in parts], axis=1)
    np.testing.assert_allclose(np.asarray(mixed_matmul(x, fused, interpret=True)), np.asarray(expect),
                               rtol=1e-4, atol=1e-4)


def test_concat_mixed_refuses_different_in_features():
    rng = _rng()
    with pytest.raises(ValueError, match="share in_features"):
        concat_mixed([_random_mixed(rng, 8, 128, 0.5), _random_mixed(rng, 8, 256, 0.5)])


def _tokens(shape):
    return jnp.asarray(_rng().integers(0, CFG.vocab_size, shape), jnp.int32)


@pytest.mark.parametrize("layout", ["stacked", "tuple"])
def test_fused_float_model_equals_unfused(layout):
    params = model.init_params(CFG, jax.random.key(int(_rng().integers(1 << 30))), jnp.float32)
    if layout == "tuple":
        params = model.unstack_layers(params)
    fused = model.fuse_projections(params)
    layer = fused["layers"] if layout == "stacked" else fused["layers"][0]
    assert set(layer["self_attn"]) == {"qkv_proj", "o_proj"} and set(layer["mlp"]) == {"gate_up_proj", "down_proj"}
    again = model.fuse_projections(fused)  # idempotent: nothing left to fuse
    assert jax.tree.structure(again) == jax.tree.structure(fused)
    tokens = _tokens((2, 9))
    np.testing.assert_allclose(np.asarray(model.forward(fused, tokens, CFG)),
                               np.asarray(model.forward(params, tokens, CFG)), rtol=1e-5, atol=1e-5)


def test_fused_biases_follow_their_weights():
    cfg = LlamaConfig(**{**CFG.__dict__, "attention_bias": True})
    params = model.unstack_layers(model.init_params(cfg, jax.random.key(3), jnp.float32))
    params = jax.tree.map(lambda a: a + 0.3 if a.ndim == 1 and a.shape[0] != cfg.hidden_size else a, params)
    fused = model.fuse_projections(params)
    tokens = _tokens((1, 7))
    np.testing.assert_allclose(np.asarray(model.forward(fused, tokens, cfg)),
                               np.asarray(model.forward(params, tokens, cfg)), rtol=1e-5, atol=1e-5)


def test_fused_quantized_model_equals_unfused():
    rng = _rng()
    params = model.unstack_layers(model.init_params(CFG, jax.random.key(4), jnp.float32))

    def quantize_leaf(path, leaf):
        if getattr(path[-1], "key", None) == "weight" and leaf.ndim == 2:
            return pack_rtn(np.asarray(leaf) * 6.0, rng.random(leaf.shape[0]) < 0.2)
        return leaf

    qparams = {**params, "layers": tuple(jax.tree_util.tree_map_with_path(quantize_leaf, layer)
                                         for layer in params["layers"])}
    fused = model.fuse_projections(qparams)
    assert isinstance(fused["layers"][0]["self_attn"]["qkv_proj"]["weight"], MixedWeight)
    tokens = _tokens((2, 6))
    forward = jax.jit(model.forward, static_argnames=("cfg", "implementation"))
    a = forward(fused, tokens, CFG, implementation="xla")
    b = forward(qparams, tokens, CFG, implementation="xla")
    # identical integer products per group; only XLA's f32 summation order may differ
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5 * float(jnp.abs(b).max()))
