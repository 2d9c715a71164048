"""mixjax.evaluate.perplexity: the definition, batching, bad windows, and transformers parity on the
embedded real model."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixjax import model
from mixjax.config import LlamaConfig
from mixjax.evaluate import perplexity, phased_nll, phased_perplexity

CFG = LlamaConfig(vocab_size=67, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=1, head_dim=8, max_position_embeddings=32,
                  tie_word_embeddings=True)


@pytest.fixture(scope="module")
def params():
    p = model.init_params(CFG, jax.random.key(3), jnp.float32)
    return jax.tree.map(lambda a: a * 10.0 if a.ndim > 1 else a, p)


def _reference_ppl(params, windows):
    """exp of the mean NLL, computed with numpy in float64 from the model's logits."""
    logits = np.asarray(model.forward(params, jnp.asarray(windows), CFG), np.float64)[:, :-1]  # [N, T-1, V]
    shifted = logits - logits.max(-1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, windows[:, 1:, None], axis=-1)
    return math.exp(nll.mean())


def test_perplexity_matches_definition_for_any_batch_size(params):
    windows = np.random.default_rng(0).integers(0, CFG.vocab_size, (5, 16)).astype(np.int32)
    ref = _reference_ppl(params, windows)
    for batch_size in (2, 5):  # 2 leaves a padded last batch that must not count
        assert perplexity(params, CFG, windows, batch_size=batch_size) == pytest.approx(ref, rel=1e-5)
    assert 1.0 < ref < 1e4


def test_uniform_model_has_perplexity_vocab_size(params):
    zero = {**params, "embed_tokens": jnp.zeros_like(params["embed_tokens"])}  # tied head → logits 0
    windows = np.random.default_rng(1).integers(0, CFG.vocab_size, (3, 9))
    assert perplexity(zero, CFG, windows, batch_size=2) == pytest.approx(CFG.vocab_size, rel=1e-5)


def _nll_after(params_at, windows, prompt):
    """Reference for phased_nll: the windows run one token at a time through the KV cache, position t by
    params_at(t); the mean NLL over windows of every token after the prompt, from the step before it."""
    T = windows.shape[1]
    step = jax.jit(lambda p, tok, cache: model.forward_step(p, tok, CFG, cache))
    cache = model.init_cache(CFG, windows.shape[0], T, jnp.float32)
    nll = []
    for t in range(T - 1):
        out, cache = step(params_at(t), jnp.asarray(windows[:, t : t + 1]), cache)
        if t >= prompt - 1:  # the prediction of token t + 1
            logits = np.asarray(out, np.float64)[:, -1]
            shifted = logits - logits.max(-1, keepdims=True)
            logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
            nll.append(-np.take_along_axis(logp, windows[:, t + 1, None], axis=-1).mean())
    return np.array(nll)


def test_phased_perplexity_switches_params_where_asked(params):
    rng = np.random.default_rng()
    windows = rng.integers(0, CFG.vocab_size, (3, 12)).astype(np.int32)
    other = jax.tree.map(lambda a: a * 0.7 if a.ndim > 1 else a, params)
    # one phase: the predictions after the prompt; prompt 1 is all of them, as perplexity counts
    assert phased_perplexity([(params, 12)], CFG, windows, prompt=1, batch_size=2) == pytest.approx(
        perplexity(params, CFG, windows, batch_size=2), rel=1e-5)
    # three phases against the token-by-token reference: prompt on `params`, 3 tokens more, then `other`
    phases = [(params, 4), (params, 7), (other, 12)]
    want = _nll_after(lambda t: params if t < 7 else other, windows, prompt=4)  # [8]: positions 4 … 11
    np.testing.assert_allclose(phased_nll(phases, CFG, windows, prompt=4, batch_size=2), want, rtol=1e-4)
    got = phased_perplexity(phases, CFG, windows, prompt=4, batch_size=2)
    assert got == pytest.approx(math.exp(want.mean()), rel=1e-4)
    assert got != pytest.approx(phased_perplexity([(params, 12)], CFG, windows, prompt=4), rel=1e-3)
    with pytest.raises(ValueError, match="must increase"):
        phased_perplexity([(params, 7), (other, 4)], CFG, windows, prompt=4)
    with pytest.raises(ValueError, match="prompt=12"):
        phased_perplexity([(params, 12)], CFG, windows, prompt=12)


@pytest.mark.parametrize(
    "windows, kwargs, match",
    [
        (np.zeros((0, 8), np.int32), {}, "N ≥ 1"),
        (np.zeros((2, 1), np.int32), {}, "T ≥ 2"),
        (np.zeros(8, np.int32), {}, r"\[N, T\]"),
        (np.full((1, 8), 67, np.int32), {}, "vocab_size=67"),
        (np.zeros((1, 40), np.int32), {}, "max_position_embeddings=32"),
        (np.zeros((1, 8), np.float32), {}, "integer"),
        (np.zeros((1, 8), np.int32), {"batch_size": 0}, "batch_size=0"),
    ],
)
def test_bad_windows_are_refused(params, windows, kwargs, match):
    with pytest.raises(ValueError, match=match):
        perplexity(params, CFG, windows, **kwargs)


@pytest.mark.slow
def test_perplexity_matches_transformers_loss_on_embedded_model(embedded_mixjax, embedded_hf_model):
    import torch

    from mixjax import data

    cfg, params, tokenizer = embedded_mixjax
    windows = data.eval_windows(tokenizer, "wikipedia", seq_len=256, max_tokens=512)  # [2, 256]
    ours = perplexity(params, cfg, windows, batch_size=2)
    with torch.no_grad():
        ids = torch.tensor(windows, dtype=torch.long)
        loss = embedded_hf_model(input_ids=ids, labels=ids).loss.item()  # mean NLL of all N·(T-1) predictions
    assert ours == pytest.approx(math.exp(loss), rel=5e-3)
    assert 5 < ours < 60  # a real model on real English text
