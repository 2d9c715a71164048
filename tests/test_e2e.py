"""End to end: a tiny random Llama quantized by `mixjax.quantize` (W4.4A8, kernel format) runs through
the model and generation unchanged; the kernels' XLA reference equals the fake-quant simulation and the
Pallas kernels (interpret mode) equal the XLA reference through the whole model."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixjax import model
from mixjax.config import LlamaConfig
from mixjax.generate import generate
from mixjax.quant import QuantConfig, as_fake_quant, quantize
from mixjax.quant.api import salience

CFG = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_theta=10000.0,
                  max_position_embeddings=64)

# MixedWeight through implementation="xla" vs FakeQuantWeight (dequantized weight, same int8 activation
# rounding per (token, group of 128)): identical codes, only the float summation order differs. Where no
# activation lands on a rounding boundary the logits agree to ~5e-7 of their max |logit|; a boundary flip
# changes that token's logits (and the later positions of its row) by up to ~1e-2. Measured on 5 seeds:
# 4 of 5 batches without any flip, the fifth with one.
EXACT_RTOL = 1e-5  # per (row, position): max |Δ| relative to the reference's max |logit|
MIN_EXACT_FRACTION = 0.8  # of (row, position) pairs within EXACT_RTOL
MAX_MEAN_DIFF = 0.05  # mean |Δ| relative to the mean quantization error |quantized − float|
# Pallas interpret mode vs the XLA reference: same integer products per group, f32 scale/accumulate
# order differs (measured 2e-7).
PALLAS_RTOL = 1e-4


@pytest.fixture(scope="module")
def float_params():
    p = model.init_params(CFG, jax.random.key(0), jnp.float32)
    return jax.tree.map(lambda a: a * 6.0 if a.ndim == 3 else a, p)  # decisive, input-dependent logits


@pytest.fixture(scope="module")
def qparams(float_params):
    calib = [np.asarray(jax.random.randint(jax.random.key(1), (4, 16), 0, CFG.vocab_size), np.int32)]
    return quantize(float_params, calib, CFG, config=QuantConfig())


def _tokens(seed, shape):
    return jax.random.randint(jax.random.key(seed), shape, 0, CFG.vocab_size, dtype=jnp.int32)


_forward = jax.jit(model.forward, static_argnames=("cfg", "implementation"))


def _rel_err_per_position(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return np.max(np.abs(a - b), axis=-1) / np.max(np.abs(b))  # [B, T]


def test_quantized_params_are_mixed_weights_in_tuple_layers(qparams):
    from pallas_kernels import MixedWeight

    assert isinstance(qparams["layers"], tuple) and len(qparams["layers"]) == CFG.num_hidden_layers
    leaves = jax.tree.leaves(qparams["layers"], is_leaf=lambda x: isinstance(x, MixedWeight))
    assert sum(isinstance(x, MixedWeight) for x in leaves) == 7 * CFG.num_hidden_layers
    assert sum(x.n8 for x in leaves if isinstance(x, MixedWeight)) > 0  # some 8-bit channels were chosen


def test_xla_kernel_reference_equals_fake_quant_simulation(float_params, qparams):
    sim = as_fake_quant(qparams)
    tokens = _tokens(10, (3, 12))
    got = _forward(qparams, tokens, CFG, implementation="xla")
    ref = _forward(sim, tokens, CFG)
    fp = _forward(float_params, tokens, CFG)
    err = _rel_err_per_position(got, ref)
    assert np.mean(err <= EXACT_RTOL) >= MIN_EXACT_FRACTION, np.round(err, 6)
    quant_err = float(jnp.mean(jnp.abs(ref - fp)))
    assert quant_err > 1e-3  # the quantization is visible, so the comparison means something
    assert float(jnp.mean(jnp.abs(got - ref))) <= MAX_MEAN_DIFF * quant_err
    # The cached path (prefill with forward_step) runs the same maths.
    cache = model.init_cache(CFG, 3, 16, jnp.float32)
    step, _ = jax.jit(model.forward_step, static_argnames=("cfg", "implementation"))(
        qparams, tokens, CFG, cache, implementation="xla")
    assert np.mean(_rel_err_per_position(step, got) <= EXACT_RTOL) >= MIN_EXACT_FRACTION


def test_jitted_generate_runs_quantized_params_deterministically(qparams):
    rng = np.random.default_rng(3)
    prompts = [rng.integers(0, CFG.vocab_size, n).tolist() for n in (5, 11, 3)]
    kw = dict(max_new_tokens=10, eos_token_ids=(), implementation="xla")
    greedy = generate(qparams, CFG, prompts, **kw)
    assert generate(qparams, CFG, prompts, **kw) == greedy
    assert [len(r) for r in greedy] == [10, 10, 10] and len(set(sum(greedy, []))) > 3
    padded = np.zeros((3, 11), np.int32)
    for b, prompt in enumerate(prompts):
        padded[b, : len(prompt)] = prompt
    logits = _forward(qparams, jnp.asarray(padded), CFG, implementation="xla")  # causal: padding is harmless
    first = [int(jnp.argmax(logits[b, len(p) - 1])) for b, p in enumerate(prompts)]
    assert [row[0] for row in greedy] == first  # the first token is the argmax of the full forward
    int8_cache = generate(qparams, CFG, prompts, cache_dtype=jnp.int8, **kw)
    assert np.mean(np.asarray(int8_cache) == np.asarray(greedy)) >= 0.7


class _Interpreted:
    """Runs a MixedWeight through the Pallas kernel in interpret mode (CPU), whatever `implementation`."""

    def __init__(self, qw):
        self.qw = qw

    @property
    def shape(self):
        return self.qw.shape

    def matmul(self, x, *, implementation="auto"):
        from pallas_kernels import mixed_matmul

        lead = x.shape[:-1]
        y = mixed_matmul(x.reshape(-1, x.shape[-1]), self.qw, interpret=True)
        return y.reshape(*lead, self.qw.n)


def test_pallas_interpret_mode_through_the_model_equals_xla(qparams):
    """≈15 s on 2 CPU cores (each distinct weight shape compiles its interpreted kernel once)."""
    from pallas_kernels import MixedWeight

    interpreted = jax.tree.map(lambda w: _Interpreted(w) if isinstance(w, MixedWeight) else w, qparams,
                               is_leaf=lambda x: isinstance(x, MixedWeight))
    tokens = _tokens(11, (2, 8))
    got = model.forward(interpreted, tokens, CFG)
    ref = _forward(qparams, tokens, CFG, implementation="xla")
    err = _rel_err_per_position(got, ref)
    assert np.mean(err <= PALLAS_RTOL) >= MIN_EXACT_FRACTION, np.round(err, 6)


@pytest.mark.parametrize("arch", ["qwen3", "smollm3", "gemma3", "gemma2"])
def test_other_architectures_quantize_save_and_generate(tmp_path, arch):
    """Qwen3 (query/key head norms, H·Dh ≠ D), SmolLM3 (its second layer without RoPE) and Gemma 3 (head norms,
    sandwich norms, GeGLU, a sliding-window layer and a global one; Gemma 2 the same with soft-capped attention scores
    and another attention scale instead of head norms): the quantized logits track the fake-quant
    simulation, so the norms and the NoPE layer run in both (the quantizer's layer pass included), and a path without
    them would be off by far more than that tolerance; the norms come through `quantize` as they were; SmolLM3's NoPE
    layer got its own weights in the layer pass; the saved checkpoint reloads to the same logits; jitted generation's
    first token is the forward's argmax."""
    import dataclasses

    from mixjax.quant.checkpoint import load_quantized, save_quantized

    if arch == "qwen3":
        cfg = dataclasses.replace(CFG, model_type="qwen3", qk_norm=True, head_dim=32, rms_norm_eps=1e-6)
    elif arch == "gemma3":
        cfg = dataclasses.replace(CFG, model_type="gemma3_text", qk_norm=True, head_dim=32, rms_norm_eps=1e-6,
                                  mlp_act="gelu_tanh", embed_scale=8.0, sandwich_norms=True, sliding_window=4,
                                  global_layers=(1,), rope_local_theta=1e4, tie_word_embeddings=True)
    elif arch == "gemma2":
        cfg = dataclasses.replace(CFG, model_type="gemma2", head_dim=32, rms_norm_eps=1e-6, mlp_act="gelu_tanh",
                                  embed_scale=8.0, sandwich_norms=True, sliding_window=4, global_layers=(1,),
                                  attn_logit_softcap=3.0, final_logit_softcap=5.0, query_pre_attn_scalar=24.0,
                                  tie_word_embeddings=True)
    else:
        cfg = dataclasses.replace(CFG, model_type="smollm3", nope_layers=(1,), tie_word_embeddings=True)
    p = jax.tree.map(lambda a: a * 6.0 if a.ndim == 3 else a, model.init_params(cfg, jax.random.key(5), jnp.float32))
    if cfg.qk_norm or cfg.sandwich_norms:
        rng = np.random.default_rng(5)
        norms = (("q_norm", "k_norm") if cfg.qk_norm else ()) + (
            ("attn_output_norm", "mlp_output_norm") if cfg.sandwich_norms else ())
        for name in norms:
            p["layers"][name] = jnp.asarray(rng.uniform(0.5, 2.0, p["layers"][name].shape), jnp.float32)
        first = norms[0]  # a path without this norm (its weights at 1) would be far off
        bare_p, bare_cfg = {**p, "layers": {**p["layers"], first: jnp.ones_like(p["layers"][first])}}, cfg
    else:
        bare_p, bare_cfg = p, dataclasses.replace(cfg, nope_layers=())
    calib = [np.asarray(jax.random.randint(jax.random.key(6), (4, 16), 0, cfg.vocab_size), np.int32)]
    scores = salience(p, calib, cfg)
    q = quantize(p, calib, cfg, config=QuantConfig(), scores=scores)
    tokens = _tokens(12, (2, 12))
    got = _forward(q, tokens, cfg, implementation="xla")
    ref = _forward(as_fake_quant(q), tokens, cfg)
    fp = _forward(p, tokens, cfg)
    quant_err = float(jnp.mean(jnp.abs(ref - fp)))
    assert quant_err > 1e-3 and float(jnp.mean(jnp.abs(got - ref))) <= MAX_MEAN_DIFF * quant_err
    assert float(jnp.mean(jnp.abs(_forward(bare_p, tokens, bare_cfg) - fp))) > 5 * MAX_MEAN_DIFF * quant_err
    if cfg.qk_norm or cfg.sandwich_norms:
        for i, layer in enumerate(q["layers"]):
            for name in norms:
                np.testing.assert_array_equal(np.asarray(layer[name]), np.asarray(p["layers"][name][i]))
    else:  # with the same 8-bit channels, quantizing under RoPE everywhere gives layer 0 (the same inputs) the same
        # weights and layer 1 (o_proj's and the MLP's inputs moved) others
        other = quantize(p, calib, bare_cfg, config=QuantConfig(), scores=scores)
        same = [all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in
                    zip(jax.tree.leaves(q["layers"][i]), jax.tree.leaves(other["layers"][i]))) for i in (0, 1)]
        assert same == [True, False]
    cfg2, q2, _ = load_quantized(save_quantized(tmp_path / "q", q, cfg, config=QuantConfig()))
    assert cfg2 == cfg
    np.testing.assert_array_equal(np.asarray(_forward(q2, tokens, cfg2, implementation="xla")), np.asarray(got))
    first = generate(q2, cfg2, [tokens[0].tolist()], max_new_tokens=3, eos_token_ids=(), implementation="xla")[0][0]
    assert first == int(jnp.argmax(got[0, -1]))
