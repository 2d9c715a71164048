"""mixjax.generate: cached decoding equals recomputation, batching, EOS, sampling, bad requests,
and greedy parity with transformers on the embedded real model."""

from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixjax import model
from mixjax.config import LlamaConfig
from mixjax.generate import SamplingConfig, _top_p_mask, generate, sample

CFG = LlamaConfig(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=48,
                  rope_theta=10000.0)


@pytest.fixture(scope="module")
def params():
    p = model.init_params(CFG, jax.random.key(7), jnp.float32)
    # std 0.02 weights give near-uniform logits; larger ones give decisive, input-dependent ones
    return jax.tree.map(lambda a: a * 15.0 if a.ndim > 1 and a.shape[-1] != 1 else a, p)


def _prompts(seed, lengths):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, CFG.vocab_size, n).tolist() for n in lengths]


def _greedy_by_recomputation(params, prompt, n):
    """Greedy decoding by running the full causal forward on the whole sequence at every step."""
    fwd = jax.jit(lambda p, t: model.forward(p, t, CFG))
    seq = np.zeros((1, len(prompt) + n), np.int32)  # causal: zeros after position t do not affect it
    seq[0, : len(prompt)] = prompt
    for t in range(len(prompt), len(prompt) + n):
        seq[0, t] = int(jnp.argmax(fwd(params, jnp.asarray(seq))[0, t - 1]))
    return seq[0, len(prompt):].tolist()


def test_greedy_with_cache_equals_full_recomputation(params):
    prompt = _prompts(0, [9])[0]
    out = generate(params, CFG, [prompt], max_new_tokens=12, eos_token_ids=())
    assert out == [_greedy_by_recomputation(params, prompt, 12)]
    assert len(set(out[0])) > 1  # the test model is not degenerate


def test_tuple_layers_generate_the_same_tokens(params):
    prompts = _prompts(5, [4, 9])
    stacked = generate(params, CFG, prompts, max_new_tokens=8, eos_token_ids=())
    assert generate(model.unstack_layers(params), CFG, prompts, max_new_tokens=8, eos_token_ids=()) == stacked


def test_batch_of_different_lengths_equals_each_prompt_alone(params):
    prompts = _prompts(1, [3, 17, 8])
    batched = generate(params, CFG, prompts, max_new_tokens=10, eos_token_ids=())
    alone = [generate(params, CFG, [p], max_new_tokens=10, eos_token_ids=())[0] for p in prompts]
    assert batched == alone
    sampled = generate(params, CFG, prompts, max_new_tokens=10, temperature=0.8, seed=5, eos_token_ids=())
    assert [len(r) for r in sampled] == [10, 10, 10]


def test_eos_stops_each_row_and_the_loop(params):
    prompts = _prompts(2, [5, 11])
    free = generate(params, CFG, prompts, max_new_tokens=16, eos_token_ids=())
    eos = free[0][3]  # row 0 emits this token at step 3 (or earlier)
    cut = free[0].index(eos)
    steps = []
    out = generate(params, CFG, prompts, max_new_tokens=16, eos_token_ids=[eos], on_token=steps.append)
    assert out[0] == free[0][: cut + 1]  # includes the EOS token, nothing after it
    row1_cut = free[1].index(eos) + 1 if eos in free[1] else 16
    assert out[1] == free[1][:row1_cut]
    assert len(steps) == max(cut + 1, row1_cut)  # the loop ends when every row is done
    both = generate(params, CFG, [prompts[0]] * 2, max_new_tokens=16, eos_token_ids=[eos], on_token=None)
    assert both == [free[0][: cut + 1]] * 2


def test_decode_is_one_compiled_while_loop(params):
    from mixjax.generate import _generate_jit

    prompts = jnp.zeros((2, 16), jnp.int32)
    jaxpr = jax.make_jaxpr(
        lambda p, t, n, k: _generate_jit(p, t, n, k, cfg=CFG, max_new_tokens=20, sampling=SamplingConfig(), eos=(2,),
                                         implementation="xla", cache_dtype=jnp.float32)
    )(params, prompts, jnp.array([3, 16], jnp.int32), jax.random.key(0))
    text = str(jaxpr)
    assert "while[" in text
    assert 1 <= text.count("scan[") < 20  # layer scans of prefill and of one decode step, not 20 unrolled steps


def test_streaming_callback_sees_every_step_in_order(params):
    prompts = _prompts(3, [4, 6])
    seen = []
    out = generate(params, CFG, prompts, max_new_tokens=7, eos_token_ids=(), on_token=seen.append)
    seen = np.stack(seen)  # [steps, B]
    assert seen.shape == (7, 2)
    assert seen.T.tolist() == out


@pytest.mark.parametrize("every", [3, 16])
def test_decoding_in_chunks_stops_and_streams_as_step_by_step(params, monkeypatch, every):
    gen = importlib.import_module("mixjax.generate")  # the module (the package exports the function by its name)
    prompts = _prompts(3, [4, 6])
    free = generate(params, CFG, prompts, max_new_tokens=11, eos_token_ids=())
    assert generate(params, CFG, prompts, max_new_tokens=11, eos_token_ids=(), sync_every=every) == free
    eos = [free[0][5], free[1][3]]  # row 0 stops at step 5 or before, row 1 at 3 or before: inside a chunk
    out = [row[: min(row.index(e) for e in eos if e in row) + 1] for row in free]
    steps = max(map(len, out))
    expected = [1]  # on_token calls a host callback makes: the first token at once,
    step = 1
    while step + every <= 11 and step < steps:  # a chunk while one fits and some row is left,
        expected.append(min(every, steps - step))
        step += every
    expected.append(max(0, steps - step))  # then the rest, one step at a time, in one callback
    calls = []
    deliver = gen._deliver

    def counted(*args):
        seen_before = len(seen)
        deliver(*args)
        calls.append(len(seen) - seen_before)

    monkeypatch.setattr(gen, "_deliver", counted)
    for switch_after, prefill_params in [(0, None), (2, params)]:  # progressive: two loops, chunks in each
        seen, calls[:] = [], []
        got = generate(params, CFG, prompts, max_new_tokens=11, eos_token_ids=eos, on_token=seen.append,
                       sync_every=every, prefill_params=prefill_params, switch_after=switch_after)
        assert got == out and steps < 11
        assert np.stack(seen).shape == (steps, 2)  # no step after the last row's EOS reaches on_token
        assert [[int(t) for t in col if t != gen.PAD] for col in np.stack(seen).T] == out
        if not switch_after:
            assert calls == expected
        assert calls[0] == 1 and max(calls) <= every and sum(calls) == steps


def test_sync_every_must_be_a_positive_integer(params):
    with pytest.raises(ValueError, match="sync_every=0 must be a positive integer"):
        generate(params, CFG, _prompts(3, [4]), max_new_tokens=3, on_token=print, sync_every=0)


def test_streaming_with_another_callback_reuses_the_compiled_program(params):
    prompts = _prompts(3, [4, 6])
    first, second, compiled = [], [], []
    out = generate(params, CFG, prompts, max_new_tokens=5, eos_token_ids=(), on_token=first.append)

    def on_compile(event, duration, **_):
        compiled.append(event)

    jax.monitoring.register_event_duration_secs_listener(on_compile)
    try:
        again = generate(params, CFG, prompts, max_new_tokens=5, eos_token_ids=(), on_token=second.append)
    finally:
        jax.monitoring.unregister_event_duration_listener(on_compile)
    assert again == out and np.array_equal(np.stack(first), np.stack(second))
    assert not [e for e in compiled if e.startswith("/jax/core/compile/")]


def test_sampling_is_deterministic_per_seed_and_top_k_1_is_greedy(params):
    prompts = _prompts(4, [6, 6])
    kw = dict(max_new_tokens=16, eos_token_ids=(), temperature=1.5)
    a = generate(params, CFG, prompts, seed=1, **kw)
    assert generate(params, CFG, prompts, seed=1, **kw) == a
    assert generate(params, CFG, prompts, seed=2, **kw) != a
    greedy = generate(params, CFG, prompts, max_new_tokens=16, eos_token_ids=())
    assert generate(params, CFG, prompts, seed=3, top_k=1, **kw) == greedy
    assert generate(params, CFG, prompts, seed=3, top_p=1e-6, **kw) == greedy


def test_top_k_and_top_p_restrict_the_support():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(2, 50)) * 3, jnp.float32)  # [B, V]
    keys = jax.random.split(jax.random.key(0), 300)
    draws = np.stack([sample(logits, k, SamplingConfig(1.0, 3, 1.0)) for k in keys])  # [300, B]
    top3 = np.argsort(-np.asarray(logits), axis=-1)[:, :3]
    for b in range(2):
        assert set(draws[:, b]) <= set(top3[b]) and len(set(draws[:, b])) > 1
    # nucleus: the kept set is the shortest prefix of the sorted distribution reaching top_p
    masked = np.asarray(_top_p_mask(logits, 0.7, -1e30))
    probs = np.asarray(jax.nn.softmax(logits, axis=-1))
    for b in range(2):
        order = np.argsort(-probs[b])
        need = int(np.searchsorted(np.cumsum(probs[b][order]), 0.7) + 1)
        assert set(np.flatnonzero(masked[b] > -1e30)) == set(order[:need])


@pytest.mark.parametrize(
    "prompts, kwargs, match",
    [
        ([[1] * 40], dict(max_new_tokens=9), "max_position_embeddings=48"),
        ([[1, 2], []], dict(max_new_tokens=4), "prompt 1 is empty"),
        ([], dict(max_new_tokens=4), "non-empty list"),
        ([[1, 101]], dict(max_new_tokens=4), r"outside \[0, vocab_size=101\)"),
        ([[1, 2]], dict(max_new_tokens=0), "max_new_tokens=0"),
        ([[1, 2]], dict(max_new_tokens=4, temperature=-1.0), "temperature"),
        ([[1, 2]], dict(max_new_tokens=4, top_p=0.0), "top_p"),
        ([[1, 2]], dict(max_new_tokens=4, top_k=-2), "top_k"),
        ([[1, 2]], dict(max_new_tokens=4, top_k=500), "top_k=500 exceeds vocab_size=101"),
    ],
)
def test_bad_requests_are_refused_before_running(params, prompts, kwargs, match):
    with pytest.raises(ValueError, match=match):
        generate(params, CFG, prompts, **kwargs)


@pytest.mark.slow
def test_greedy_matches_transformers_on_embedded_model(embedded_mixjax, embedded_hf_model):
    import torch

    cfg, params, tok = embedded_mixjax
    prompts = ["The capital of France is", "In 1905, Albert Einstein published a paper on"]
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    n = 40
    ours = generate(params, cfg, ids, max_new_tokens=n, eos_token_ids=[tok.eos_token_id])  # one batch
    for prompt_ids, got in zip(ids, ours):
        with torch.no_grad():
            ref = embedded_hf_model.generate(torch.tensor([prompt_ids]), max_new_tokens=n, do_sample=False,
                                             eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
        assert got == ref[0, len(prompt_ids):].tolist()  # both stop after the same EOS, if any
    assert "Paris" in tok.decode(ours[0])
    assert ours[0][-1] == tok.eos_token_id and len(ours[0]) < n  # this prompt ends early with EOS
    assert len(ours[1]) == n  # at least 32 new tokens compared


def test_int8_cache_generation_mostly_agrees_with_float_cache(params):
    """Greedy decoding with an int8 KV cache: quantization noise may flip a near-tie late in a sequence,
    so we require ≥ 80 % of the tokens to agree and the first token of each row to match."""
    prompts = _prompts(9, [5, 12, 8, 3])
    ref = generate(params, CFG, prompts, max_new_tokens=12, eos_token_ids=())
    out = generate(params, CFG, prompts, max_new_tokens=12, eos_token_ids=(), cache_dtype=jnp.int8)
    agree = np.mean(np.asarray(out) == np.asarray(ref))
    assert agree >= 0.8, f"only {agree:.0%} of tokens agree"
    assert [r[0] for r in out] == [r[0] for r in ref]
    tuple_layers = generate(model.unstack_layers(params), CFG, prompts, max_new_tokens=12, eos_token_ids=(),
                            cache_dtype=jnp.int8)
    assert tuple_layers == out


def test_int8_cache_takes_whole_value_blocks(params, monkeypatch):
    """`generate` rounds an int8 cache up to whole 64-position value blocks (the order the decode kernel reads
    fastest, `KVCache.v_block`) and a float cache not at all; the tokens are those of the position-major int8
    cache."""
    caches = []
    real = model.init_cache
    monkeypatch.setattr(model, "init_cache", lambda *a, **k: caches.append(real(*a, **k)) or caches[-1])
    prompts = _prompts(10, [5, 12])
    out = generate(params, CFG, prompts, max_new_tokens=12, eos_token_ids=(), cache_dtype=jnp.int8)
    generate(params, CFG, prompts, max_new_tokens=12, eos_token_ids=())
    assert [(c.max_len, c.v_block) for c in caches] == [(64, 64), (28, 0)]  # the prompts padded to 16, + 12
    monkeypatch.setattr(model, "INT8_V_BLOCK", False)
    jax.clear_caches()  # the switch is read while tracing: trace anew
    assert generate(params, CFG, prompts, max_new_tokens=12, eos_token_ids=(), cache_dtype=jnp.int8) == out
    assert (caches[-1].max_len, caches[-1].v_block) == (64, 0)
    jax.clear_caches()  # (no later test in this process reuses the position-major program)


def _greedy_in_phases(first, second, prompt, n, switch_after):
    """Greedy decoding token by token through the cache: `first` runs the prompt and the first switch_after decoded
    tokens, `second` the rest (the reference of progressive precision switching)."""
    step = jax.jit(lambda p, t, c: model.forward_step(p, t, CFG, c))
    cache = model.init_cache(CFG, 1, len(prompt) + n, jnp.float32)
    logits, cache = step(first, jnp.asarray([prompt], jnp.int32), cache)
    out = [int(jnp.argmax(logits[0, -1]))]
    while len(out) < n:
        p = first if len(out) <= switch_after else second
        logits, cache = step(p, jnp.asarray([[out[-1]]], jnp.int32), cache)
        out.append(int(jnp.argmax(logits[0, -1])))
    return out


@pytest.mark.parametrize("switch_after", [0, 3])
def test_progressive_switching_hands_the_cache_from_one_model_to_the_other(params, switch_after):
    other = jax.tree.map(lambda a: a * 1.1 if a.ndim > 1 and a.shape[-1] != 1 else a, params)
    prompt = _prompts(11, [7])[0]
    got = generate(params, CFG, [prompt], max_new_tokens=10, eos_token_ids=(), prefill_params=other,
                   switch_after=switch_after)
    assert got == [_greedy_in_phases(other, params, prompt, 10, switch_after)]
    # the two models disagree on this prompt, so the test sees which one ran which token
    plain = generate(params, CFG, [prompt], max_new_tokens=10, eos_token_ids=())
    assert got != plain and got != generate(other, CFG, [prompt], max_new_tokens=10, eos_token_ids=())
    # the same parameters on both sides is plain generation, also with one of them unstacked
    assert generate(params, CFG, [prompt], max_new_tokens=10, eos_token_ids=(), prefill_params=params,
                    switch_after=switch_after) == plain
    assert generate(params, CFG, [prompt], max_new_tokens=10, eos_token_ids=(),
                    prefill_params=model.unstack_layers(other), switch_after=switch_after) == got


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(switch_after=2), "needs prefill_params"),
        (dict(switch_after=-1, prefill_params="same"), "switch_after=-1"),
        (dict(prefill_params="fewer layers"), "not the same model"),
    ],
)
def test_bad_progressive_requests_are_refused(params, kwargs, match):
    variants = {"same": params, "fewer layers": {**params, "layers": jax.tree.map(lambda a: a[:1], params["layers"])}}
    if "prefill_params" in kwargs:
        kwargs = {**kwargs, "prefill_params": variants[kwargs["prefill_params"]]}
    with pytest.raises(ValueError, match=match):
        generate(params, CFG, [[1, 2]], max_new_tokens=4, **kwargs)
