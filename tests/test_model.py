"""mixjax.model: cached decoding equals the full forward, tuple layers equal scanned layers, bad input."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixjax import model
from mixjax.config import LlamaConfig, RopeScaling
from mixjax.model import (
    LINEAR_NAMES,
    KVCache,
    forward,
    forward_step,
    init_cache,
    init_params,
    layer_views,
    param_shapes,
    stack_layers,
    unstack_layers,
)

# Same f32 maths with different reduction shapes (cache length vs prompt length, scan vs loop): errors
# of a few ulps of the largest logit. Compared as max-abs error relative to the reference's max-abs.
F32_RTOL = 1e-5


@pytest.fixture(autouse=True)
def _f32_matmuls():
    """f32 dots in full precision on any backend (a GPU's default rounds their inputs to TF32): the tolerances
    here are for f32 arithmetic."""
    with jax.default_matmul_precision("highest"):
        yield


def assert_close(actual, desired, rtol=F32_RTOL):
    actual, desired = np.asarray(actual), np.asarray(desired)
    assert actual.shape == desired.shape
    err = np.max(np.abs(actual - desired)) / np.max(np.abs(desired))
    assert err <= rtol, f"relative max-abs error {err:.2e} > {rtol:.0e}"

CFG = LlamaConfig(
    vocab_size=97,
    hidden_size=48,
    intermediate_size=80,
    num_hidden_layers=3,
    num_attention_heads=6,
    num_key_value_heads=2,
    head_dim=8,
    rope_theta=10000.0,
    attention_bias=True,
)


@pytest.fixture(scope="module")
def params():
    return init_params(CFG, jax.random.key(0), jnp.float32)


def _tokens(seed, shape, vocab=CFG.vocab_size):
    return jax.random.randint(jax.random.key(seed), shape, 0, vocab, dtype=jnp.int32)


def _scale_up(params):
    """Random init has std 0.02; larger weights make attention patterns non-trivial."""
    return jax.tree.map(lambda a: a * 10.0 if a.ndim >= 2 else a, params)


def test_param_shapes_follow_design():
    shapes = param_shapes(CFG)
    layers = shapes["layers"]
    assert layers["self_attn"]["q_proj"] == {"weight": (3, 48, 48), "bias": (3, 48)}
    assert layers["self_attn"]["k_proj"]["weight"] == (3, 16, 48)
    assert layers["mlp"]["down_proj"] == {"weight": (3, 48, 80)}
    assert "lm_head" in shapes and len(LINEAR_NAMES) == 7


def test_forward_shape_dtype_and_causality(params):
    p = _scale_up(params)
    tokens = _tokens(1, (2, 9))
    logits = forward(p, tokens, CFG, implementation="xla")
    assert logits.shape == (2, 9, CFG.vocab_size) and logits.dtype == jnp.float32
    # Changing the last token must leave every earlier position's logits unchanged.
    changed = tokens.at[:, -1].set((tokens[:, -1] + 1) % CFG.vocab_size)
    logits2 = forward(p, changed, CFG, implementation="xla")
    assert_close(logits2[:, :-1], logits[:, :-1])
    assert float(jnp.max(jnp.abs(logits2[:, -1] - logits[:, -1]))) > 1e-3


def test_tuple_layers_equal_scanned_layers(params):
    p = _scale_up(params)
    tokens = _tokens(2, (2, 7))
    unstacked = unstack_layers(p)
    assert isinstance(unstacked["layers"], tuple) and len(unstacked["layers"]) == CFG.num_hidden_layers
    assert_close(forward(unstacked, tokens, CFG), forward(p, tokens, CFG))
    restacked = stack_layers(unstacked)
    assert jax.tree.structure(restacked) == jax.tree.structure(p)
    assert all(jnp.array_equal(a, b) for a, b in zip(jax.tree.leaves(restacked), jax.tree.leaves(p)))


def test_layer_views_read_stacked_layers_one_at_a_time(params):
    """`layer_views`: the per-layer dicts `unstack_layers` gives, sliced on demand (the quantizer's reads)."""
    views = layer_views(params["layers"])
    unstacked = unstack_layers(params)["layers"]
    assert len(views) == CFG.num_hidden_layers
    for got, want in zip([*views, views[-1]], [*unstacked, unstacked[-1]]):
        assert jax.tree.structure(got) == jax.tree.structure(want)
        assert all(jnp.array_equal(a, b) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)))
    with pytest.raises(IndexError):
        views[CFG.num_hidden_layers]
    assert layer_views(unstacked) is unstacked


def test_stack_layers_refuses_quantized_layers(params):
    from pallas_kernels import pack_rtn

    unstacked = unstack_layers(params)
    w = unstacked["layers"][1]["mlp"]["up_proj"]["weight"]
    unstacked["layers"][1]["mlp"]["up_proj"]["weight"] = pack_rtn(w, np.zeros(w.shape[0], bool))
    with pytest.raises(TypeError, match="layer 1 holds a MixedWeight"):
        stack_layers(unstacked)


@pytest.mark.parametrize("layers,stacked_cache", [("stacked", False), ("stacked", True), ("tuple", True)])
def test_prefill_then_decode_equals_forward(params, layers, stacked_cache):
    """Also covers a cache whose form differs from the params' (converted once, returned converted)."""
    p = _scale_up(params)
    if layers == "tuple":
        p = unstack_layers(p)
    tokens = _tokens(3, (2, 10))
    full = forward(p, tokens, CFG)
    cache = init_cache(CFG, batch=2, max_len=16, dtype=jnp.float32, stacked=stacked_cache)
    logits, cache = _prompt_then_steps(p, tokens, CFG, cache, prompt=6)
    assert_close(logits, full)
    assert cache.length.tolist() == [10, 10] and cache.stacked == (layers == "stacked")


def _prompt_then_steps(p, tokens, cfg, cache, prompt: int):
    """The first `prompt` tokens in one cached call, then one call a token: (all logits [B, T, V], the cache)."""
    step = jax.jit(forward_step, static_argnames=("cfg", "implementation"))
    logits, cache = step(p, tokens[:, :prompt], cfg, cache)
    pieces = [logits]
    for t in range(prompt, tokens.shape[1]):
        logits, cache = step(p, tokens[:, t : t + 1], cfg, cache)
        pieces.append(logits)
    return jnp.concatenate(pieces, axis=1), cache


def test_ragged_prefill_with_num_valid(params):
    """Prompts of lengths 7 and 4 in one right-padded prefill, then 3 decode steps each."""
    p = _scale_up(params)
    lengths = [7, 4]
    seqs = [_tokens(10 + i, (1, n + 3))[0] for i, n in enumerate(lengths)]
    padded = jnp.zeros((2, 7), jnp.int32)
    for b, n in enumerate(lengths):
        padded = padded.at[b, :n].set(seqs[b][:n])
    cache = init_cache(CFG, batch=2, max_len=12, dtype=jnp.float32)
    logits, cache = forward_step(p, padded, CFG, cache, num_valid=jnp.array(lengths))
    assert cache.length.tolist() == lengths
    got = [[logits[b, n - 1]] for b, n in enumerate(lengths)]
    for t in range(3):
        nxt = jnp.stack([seqs[b][n + t] for b, n in enumerate(lengths)])[:, None]
        logits, cache = forward_step(p, nxt, CFG, cache)
        for b in range(2):
            got[b].append(logits[b, 0])
    for b, n in enumerate(lengths):
        ref = forward(p, seqs[b][None], CFG)[0, n - 1 :]  # [4, V]
        assert_close(jnp.stack(got[b]), ref)


def test_nope_layers_run_without_rope(params):
    """SmolLM3's NoPE layers (`cfg.nope_layers`): the scan over stacked layers, the loop over a tuple of layers,
    `decoder_layer` one layer at a time and the cached steps give the same logits, which differ from every layer
    using RoPE; `decoder_layer` refuses a call without the layer's index."""
    p = _scale_up(params)
    cfg = dataclasses.replace(CFG, model_type="smollm3", nope_layers=(1,))
    tokens = _tokens(21, (2, 9))
    full = forward(p, tokens, cfg)
    assert_close(forward(unstack_layers(p), tokens, cfg), full)
    x = model.embed(p, tokens, cfg)
    for i, layer in enumerate(unstack_layers(p)["layers"]):
        x = model.decoder_layer(layer, x, cfg, layer_index=i)
    assert_close(model.final_logits(p, x, cfg, "xla"), full)
    assert np.max(np.abs(np.asarray(forward(p, tokens, CFG) - full))) > 0.1 * np.max(np.abs(np.asarray(full)))
    cache = init_cache(cfg, batch=2, max_len=12, dtype=jnp.float32, stacked=True)
    assert_close(_prompt_then_steps(p, tokens, cfg, cache, prompt=5)[0], full)
    with pytest.raises(ValueError, match=r"layers without RoPE \(\(1,\)\): pass layer_index"):
        model.decoder_layer(unstack_layers(p)["layers"][0], model.embed(p, tokens, cfg), cfg)


GEMMA3 = dataclasses.replace(CFG, model_type="gemma3_text", attention_bias=False, qk_norm=True, mlp_act="gelu_tanh",
                             embed_scale=48 ** 0.5, sandwich_norms=True, sliding_window=3, global_layers=(1,),
                             rope_theta=1e6, rope_local_theta=1e4, rope_scaling=RopeScaling(4.0, rope_type="linear"),
                             final_logit_softcap=4.0, rms_norm_eps=1e-6)


def test_gemma3_layers_in_every_form():
    """Gemma 3 (sliding-window layers 0 and 2 with their own RoPE base, layer 1 global with linear scaling; sandwich
    norms, q/k head norms, GeGLU, scaled embeddings, soft-capped logits): the scan over stacked layers (window and
    tables chosen under a traced index), the loop over a tuple, `decoder_layer` one layer at a time and the cached
    steps (stacked and per-layer caches) give the same logits; each of the sandwich norms, the global layer's
    exemption and the local RoPE base changes them; `decoder_layer` refuses a call without the layer's index."""
    cfg = GEMMA3
    rng = np.random.default_rng(7)
    p = _scale_up(init_params(cfg, jax.random.key(3), jnp.float32))
    p["layers"] = {k: jnp.asarray(rng.uniform(0.3, 2.0, v.shape), jnp.float32) if "norm" in k else v
                   for k, v in p["layers"].items()}  # every norm away from 1, so a dropped one shows
    tokens = _tokens(22, (2, 9))
    full = forward(p, tokens, cfg)
    assert np.all(np.abs(np.asarray(full)) <= 4.0)  # the soft cap
    tup = unstack_layers(p)
    assert_close(forward(tup, tokens, cfg), full)
    x = model.embed(p, tokens, cfg)
    for i, layer in enumerate(tup["layers"]):
        x = model.decoder_layer(layer, x, cfg, layer_index=i)
    assert_close(model.final_logits(p, x, cfg, "xla"), full)
    for stacked, params in ((True, p), (False, tup)):
        cache = init_cache(cfg, batch=2, max_len=12, dtype=jnp.float32, stacked=stacked)
        assert_close(_prompt_then_steps(params, tokens, cfg, cache, prompt=5)[0], full)
    ones = {**p, "layers": {**p["layers"], "attn_output_norm": jnp.ones_like(p["layers"]["attn_output_norm"])}}
    for other_p, other_cfg in ((ones, cfg), (p, dataclasses.replace(cfg, global_layers=())),
                               (p, dataclasses.replace(cfg, rope_local_theta=1e6))):
        assert np.max(np.abs(np.asarray(forward(other_p, tokens, other_cfg) - full))) > 1e-2 * np.max(np.abs(full))
    with pytest.raises(ValueError, match="global and sliding-window layers: pass layer_index"):
        model.decoder_layer(tup["layers"][0], model.embed(p, tokens, cfg), cfg)


def test_sliding_window_masks_old_keys(params):
    p = _scale_up(params)
    windowed = dataclasses.replace(CFG, sliding_window=3)
    tokens = _tokens(4, (1, 8))
    a = forward(p, tokens, windowed)
    # Within the window nothing changes; beyond it the first token no longer influences the output.
    assert_close(a[:, :3], forward(p, tokens, CFG)[:, :3])
    changed = tokens.at[0, 0].set((tokens[0, 0] + 1) % CFG.vocab_size)
    b = forward(p, changed, windowed)
    # With L=3 layers and window 3, token 0 reaches positions < 0 + 3 * (3 - 1) + 1 = 7.
    assert_close(b[:, 7:], a[:, 7:])
    assert float(jnp.max(jnp.abs(b[:, 1] - a[:, 1]))) > 1e-3
    cache = init_cache(windowed, 1, 8, jnp.float32)
    step_logits, _ = forward_step(p, tokens, windowed, cache)
    assert_close(step_logits, a)


def test_llama3_rope_scaling_changes_long_positions(params):
    scaled = dataclasses.replace(
        CFG, rope_scaling=RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                      original_max_position_embeddings=8)
    )
    p = _scale_up(params)
    tokens = _tokens(5, (1, 6))
    diff = jnp.max(jnp.abs(forward(p, tokens, scaled) - forward(p, tokens, CFG)))
    assert float(diff) > 1e-3


def test_bf16_params_track_f32(params):
    """bf16 params compute in bf16; compared with f32 maths on the same (bf16-rounded) weights."""
    low = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
    tokens = _tokens(6, (2, 8))
    ref = forward(jax.tree.map(lambda a: a.astype(jnp.float32), low), tokens, CFG)
    logits = forward(low, tokens, CFG)
    assert logits.dtype == jnp.float32
    # bf16 activations carry 8 mantissa bits (relative rounding 2^-9 per op); a few percent overall.
    assert_close(logits, ref, rtol=3e-2)
    cache = init_cache(CFG, 2, 8)
    assert cache.k[0].dtype == jnp.bfloat16 and cache.k_scale is None
    step_logits, _ = forward_step(low, tokens, CFG, cache)
    assert_close(step_logits, ref, rtol=3e-2)


def test_init_params_dtype_and_tied():
    tied = dataclasses.replace(CFG, tie_word_embeddings=True, attention_bias=False)
    p = init_params(tied, jax.random.key(1), jnp.bfloat16)
    assert "lm_head" not in p and "bias" not in p["layers"]["self_attn"]["q_proj"]
    assert {a.dtype for a in jax.tree.leaves(p)} == {jnp.dtype(jnp.bfloat16)}
    assert forward(p, _tokens(7, (1, 4)), tied).shape == (1, 4, CFG.vocab_size)


def test_kvcache_is_a_pytree():
    cache = init_cache(CFG, 2, 5, jnp.float32)
    leaves, treedef = jax.tree.flatten(cache)
    assert len(leaves) == 2 * CFG.num_hidden_layers + 1  # per-layer k and v, length; the scales are None
    rebuilt = jax.tree.unflatten(treedef, leaves)
    assert isinstance(rebuilt, KVCache) and rebuilt.k[2].shape == (2, 2, 5, 8)  # [B, KVH, S, Dh]
    stacked = init_cache(CFG, 2, 5, jnp.float32, stacked=True)
    assert stacked.stacked and stacked.k.shape == (3, 2, 2, 5, 8) and len(jax.tree.leaves(stacked)) == 3
    assert (stacked.max_len, stacked.batch) == (cache.max_len, cache.batch) == (5, 2)


def test_bad_tokens_raise(params):
    with pytest.raises(ValueError, match=r"vocab_size=97"):
        forward(params, jnp.array([[1, 97]]), CFG)
    with pytest.raises(ValueError, match=r"min -1"):
        forward(params, jnp.array([[-1, 3]]), CFG)
    with pytest.raises(TypeError, match="integer"):
        forward(params, jnp.ones((1, 3), jnp.float32), CFG)
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        forward(params, jnp.ones((3,), jnp.int32), CFG)


def test_prompt_longer_than_cache_raises(params):
    cache = init_cache(CFG, 1, 4, jnp.float32)
    with pytest.raises(ValueError, match="max_len=4"):
        forward_step(params, _tokens(8, (1, 5)), CFG, cache)
    _, cache = forward_step(params, _tokens(8, (1, 3)), CFG, cache)
    with pytest.raises(ValueError, match="does not fit the cache"):
        forward_step(params, _tokens(9, (1, 2)), CFG, cache)
    with pytest.raises(ValueError, match="batch"):
        forward_step(params, _tokens(9, (2, 1)), CFG, cache)
    with pytest.raises(ValueError, match=r"num_valid must have shape \(B,\)"):
        forward_step(params, _tokens(9, (1, 1)), CFG, cache, num_valid=jnp.array([1, 1]))
    with pytest.raises(ValueError, match=r"num_valid must lie in \[0, T=1\]"):
        forward_step(params, _tokens(9, (1, 1)), CFG, cache, num_valid=jnp.array([2]))


# An int8 cache rounds every cached key/value to 1/254 of its head's max |x|. On the std-0.02 test
# model the logits move by 2-5e-3 of their largest magnitude (8 seeds measured; a bf16 cache: 1-2e-3),
# so 2e-2 leaves room. (On the ×10 scaled-up model the float maths itself is chaotic: bf16 caches
# differ by up to 16 %, so it is no yardstick here.)
INT8_CACHE_RTOL = 2e-2


@pytest.mark.parametrize("layers,stacked_cache", [("stacked", True), ("tuple", False), ("tuple", True)])
def test_int8_cache_tracks_float_cache(params, layers, stacked_cache):
    p = params
    if layers == "tuple":
        p = unstack_layers(p)
    tokens = _tokens(12, (2, 9))
    step = jax.jit(forward_step, static_argnames=("cfg", "implementation", "logits_at"))
    out = {}
    for dtype in (jnp.float32, jnp.int8):
        cache = init_cache(CFG, batch=2, max_len=12, dtype=dtype, stacked=stacked_cache)
        logits, cache = step(p, tokens[:, :6], CFG, cache, num_valid=jnp.array([6, 4]))
        pieces = [logits[:, :4]]
        for t in range(6, 9):
            logits, cache = step(p, tokens[:, t : t + 1], CFG, cache)
            pieces.append(logits)
        out[dtype] = jnp.concatenate(pieces, axis=1)
        if dtype == jnp.int8:
            first = cache.k if cache.stacked else cache.k[0]
            scales = cache.k_scale if cache.stacked else cache.k_scale[0]
            assert first.dtype == jnp.int8 and scales.dtype == jnp.float32
            assert scales.shape == first.shape[:-1]
    assert_close(out[jnp.int8], out[jnp.float32], rtol=INT8_CACHE_RTOL)
    assert not np.array_equal(np.asarray(out[jnp.int8]), np.asarray(out[jnp.float32]))  # really quantized


@pytest.mark.parametrize("layers,stacked_cache", [("stacked", True), ("tuple", False), ("tuple", True)])
def test_int8_values_in_blocks_change_nothing_but_the_order(params, layers, stacked_cache, monkeypatch):
    """An int8 cache whose length is a multiple of 64 stores its values in blocks of 64 positions
    (`KVCache.v_block`, the decode kernel's order): on the XLA path the logits and the keys and scales are those
    of the position-major cache exactly, and `values(layer)` gives its values back; the stored order differs."""
    import mixjax.model as model_module

    p = _scale_up(params if layers == "stacked" else unstack_layers(params))
    tokens = _tokens(15, (2, 9))
    runs = {}
    for blocked in (True, False):
        monkeypatch.setattr(model_module, "INT8_V_BLOCK", blocked)
        cache = init_cache(CFG, batch=2, max_len=64, dtype=jnp.int8, stacked=stacked_cache)
        assert cache.v_block == (64 if blocked else 0)
        step = jax.jit(forward_step, static_argnames=("cfg", "implementation", "logits_at"))
        logits, cache = step(p, tokens[:, :6], CFG, cache, num_valid=jnp.array([6, 4]))
        pieces = [logits]
        for t in range(6, 9):
            logits, cache = step(p, tokens[:, t : t + 1], CFG, cache)
            pieces.append(logits)
        assert cache.v_block == (64 if blocked else 0)  # kept through the steps (and the stacked/tuple conversion)
        runs[blocked] = (np.asarray(jnp.concatenate(pieces, axis=1)), cache)
    np.testing.assert_array_equal(runs[True][0], runs[False][0])
    got, want = runs[True][1], runs[False][1]
    for a, b in zip((got.k, got.k_scale, got.v_scale), (want.k, want.k_scale, want.v_scale)):
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            np.testing.assert_array_equal(x, y)
    for i in range(CFG.num_hidden_layers):
        np.testing.assert_array_equal(got.values(i), want.v[i])
    assert not np.array_equal(np.asarray(jax.tree.leaves(got.v)[0]), np.asarray(jax.tree.leaves(want.v)[0]))


@pytest.mark.parametrize("T, start", [(1, [5, 127]), (70, [0, 100]), (9, [60, 124])])
def test_blocked_value_writes_equal_position_major_ones(T, start):
    """`_write_cache` into a value store in blocks (one token, a chunk spanning blocks, positions past the end
    dropped) holds what the position-major write holds, per layer and in a stacked store."""
    from mixjax.model import _write_cache
    from pallas_kernels.attention import block_values, unblock_values

    rng = np.random.default_rng()
    B, KVH, S, Dh = 2, 3, 128, 16
    new = jnp.asarray(rng.normal(size=(B, T, KVH, Dh)), jnp.float32)
    positions = jnp.asarray(np.asarray(start)[:, None] + np.arange(T)[None, :], jnp.int32)
    store = jnp.asarray(rng.integers(-127, 128, (B, KVH, S, Dh)), jnp.int8)
    scales = jnp.asarray(rng.uniform(0.1, 1, (B, KVH, S)), jnp.float32)
    want = _write_cache(store, scales, None, new, positions)
    got = _write_cache(block_values(store, 64), scales, None, new, positions, v_block=64)
    np.testing.assert_array_equal(unblock_values(got[0], 64), want[0])
    np.testing.assert_array_equal(got[1], want[1])
    stacked = jnp.stack([store, store[::-1]])
    want = _write_cache(stacked, jnp.stack([scales, scales]), jnp.int32(1), new, positions)
    got = _write_cache(block_values(stacked, 64), jnp.stack([scales, scales]), jnp.int32(1), new, positions, v_block=64)
    np.testing.assert_array_equal(unblock_values(got[0], 64), want[0])
    np.testing.assert_array_equal(unblock_values(got[2], 64), want[2])


def test_int8_cache_codes_reconstruct_the_float_keys(params):
    """Layer 0's stored codes times their scales equal the float cache within half a quantization step
    (later layers see attention over the quantized cache, so their inputs differ)."""
    p = _scale_up(params)
    tokens = _tokens(13, (2, 5))
    _, fc = forward_step(p, tokens, CFG, init_cache(CFG, 2, 5, jnp.float32))
    _, qc = forward_step(p, tokens, CFG, init_cache(CFG, 2, 5, jnp.int8, scale_dtype=jnp.bfloat16))
    for name, q, s, f in (("k", qc.k[0], qc.k_scale[0], fc.k[0]), ("v", qc.v[0], qc.v_scale[0], fc.v[0])):
        assert s.dtype == jnp.bfloat16 and int(jnp.max(jnp.abs(q.astype(jnp.int32)))) == 127
        s32 = np.asarray(s.astype(jnp.float32))[..., None]  # [B, KVH, S, 1]
        q, f = np.asarray(q, np.float32), np.asarray(f)
        excess = np.abs(q * s32 - f) - 0.5 * s32 * (1 + 1e-5)
        at = tuple(int(i) for i in np.unravel_index(np.argmax(excess), excess.shape))  # [B, KVH, S, Dh]
        step = s32[at[:3]][0]
        assert excess[at] <= 1e-6, (f"{name}{list(at)}: code {q[at]:.0f} × scale {step:.6g} against the float cache's "
                                    f"{f[at]:.6g} ({f[at] / step:.3f} steps; the row's largest |value| "
                                    f"{np.abs(f[at[:3]]).max():.6g})")


def test_logits_at_last_equals_the_gathered_full_logits(params):
    p = unstack_layers(_scale_up(params))
    tokens = _tokens(14, (3, 7))
    lengths = jnp.array([7, 2, 5])
    full, c1 = forward_step(p, tokens, CFG, init_cache(CFG, 3, 9, jnp.float32), num_valid=lengths)
    last, c2 = forward_step(p, tokens, CFG, init_cache(CFG, 3, 9, jnp.float32), num_valid=lengths, logits_at="last")
    assert last.shape == (3, 1, CFG.vocab_size)
    assert_close(last[:, 0], full[jnp.arange(3), lengths - 1])
    assert_close(jnp.stack(c2.k), jnp.stack(c1.k), rtol=0)


def test_bad_cache_options_raise(params):
    with pytest.raises(ValueError, match="dtype=int32 is not supported"):
        init_cache(CFG, 1, 4, jnp.int32)
    with pytest.raises(ValueError, match="scale_dtype=float16"):
        init_cache(CFG, 1, 4, jnp.int8, scale_dtype=jnp.float16)
    with pytest.raises(ValueError, match="logits_at='first'"):
        forward_step(params, _tokens(15, (1, 2)), CFG, init_cache(CFG, 1, 4, jnp.float32), logits_at="first")


@pytest.mark.parametrize("positions, stacked, int8", [
    (np.arange(3, 9), False, False),
    (np.arange(3, 9), True, True),  # stacked layers, int8 codes and their scales
    (np.arange(10, 16), False, True),  # ends at S exactly
    (np.arange(12, 18), False, False),  # runs past S: the tail is dropped
])
@pytest.mark.parametrize("batch", [1, 3])
def test_cache_write_in_store_order_equals_the_scatter(monkeypatch, positions, stacked, int8, batch):
    """`model.CACHE_WRITE`: a chunk written by the scatter in the store's order ("scatter_t", the default) gives
    the stores of XLA's scatter in the tokens' order ("scatter"), bit for bit; positions past S are dropped by
    both, and nothing else in the cache changes."""
    from mixjax import model

    rng = np.random.default_rng()
    L, KVH, S, Dh, T = 3, 2, 16, 8, len(positions)
    shape = (L, batch, KVH, S, Dh) if stacked else (batch, KVH, S, Dh)
    store = jnp.asarray(rng.integers(-127, 128, shape), jnp.int8) if int8 else jnp.asarray(rng.normal(size=shape),
                                                                                           jnp.float32)
    scales = jnp.asarray(rng.uniform(0.1, 1, shape[:-1]), jnp.float32) if int8 else None
    new = jnp.asarray(rng.normal(size=(batch, T, KVH, Dh)), jnp.float32)
    index = jnp.asarray(1) if stacked else None
    pos = jnp.asarray(positions, jnp.int32)[None] + jnp.arange(batch, dtype=jnp.int32)[:, None] % 2  # rows 0, 1, 0…

    def write(st, sc, n, p):
        return model._write_cache(st, sc, index, n, p)[:2]

    monkeypatch.setattr(model, "CACHE_WRITE", "scatter_t")
    got = jax.jit(write)(store, scales, new, pos)
    monkeypatch.setattr(model, "CACHE_WRITE", "scatter")
    ref = jax.jit(write)(store, scales, new, pos)
    for a, b in zip(got, ref):
        if b is not None:
            assert np.array_equal(np.asarray(a), np.asarray(b))
    before, after = (np.asarray(a)[1] if stacked else np.asarray(a) for a in (store, ref[0]))  # [B, KVH, S, Dh]
    for b in range(batch):
        p = np.asarray(pos[b])
        kept = np.setdiff1d(np.arange(S), p)
        assert np.array_equal(after[b][:, kept], before[b][:, kept])  # only the chunk's positions changed
        assert not np.array_equal(after[b][:, p[p < S]], before[b][:, p[p < S]])


def test_tiled_codes_keep_the_logits():
    """`fuse_projections(tile=True)` (the default on a GPU) puts every decoder-layer mixed weight's and the quantized
    head's and embedding's codes in (tile, group) order and nothing else; the logits are those of the row-major
    weights exactly (the XLA reference and the embedding's row gather restore the order); the default on CPU
    (`model.TILED_CODES` None) keeps the stored order."""
    import pallas_kernels as pk
    from helpers import tenth
    from mixjax import model
    from mixjax.quant.api import quantize_head

    cfg = dataclasses.replace(CFG, hidden_size=128, intermediate_size=256, head_dim=16, num_hidden_layers=2)
    params = model.unstack_layers(model.init_params(cfg, jax.random.key(0), jnp.float32))
    rng = np.random.default_rng()
    for layer in params["layers"]:
        for group in ("self_attn", "mlp"):
            for p in layer[group].values():
                p["weight"] = pk.pack_rtn(np.asarray(p["weight"]), tenth(rng, p["weight"].shape[0]))
    params = {**params, **quantize_head(params, cfg, bits=4)}  # untied: an int4 embedding table and head
    row = model.fuse_projections(params, tile=False)
    tiled = model.fuse_projections(params, tile=True)
    weights = [w for w in jax.tree.leaves(tiled["layers"], is_leaf=lambda a: isinstance(a, pk.MixedWeight))
               if isinstance(w, pk.MixedWeight)]
    assert len(weights) == 4 * cfg.num_hidden_layers and all(w.tiled for w in weights)
    assert tiled["lm_head"].tiled and tiled["embed_tokens"].tiled and not row["lm_head"].tiled
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 7)), jnp.int32)
    want = forward(row, tokens, cfg, implementation="xla")
    np.testing.assert_array_equal(np.asarray(forward(tiled, tokens, cfg, implementation="xla")), np.asarray(want))
    default = model.fuse_projections(params)
    assert model.TILED_CODES is None and jax.default_backend() == "cpu" and not any(w.tiled for w in jax.tree.leaves(
        default, is_leaf=lambda a: isinstance(a, pk.MixedWeight)) if isinstance(w, pk.MixedWeight))
