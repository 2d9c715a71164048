"""mixjax.nn: the Flax NNX front end against the functional model, salience and quantizer it must agree with."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import mixjax
from mixjax import nn as mnn
from mixjax.config import LlamaConfig
from mixjax.linear import linear
from pallas_kernels import MixedWeight, pack_rtn

TINY = LlamaConfig(vocab_size=300, hidden_size=256, intermediate_size=384, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=64)


def _tokens(seed, shape, vocab=TINY.vocab_size):
    return np.asarray(jax.random.randint(jax.random.key(seed), shape, 0, vocab), np.int32)


def lm_loss(module, tokens):
    """Mean next-token cross-entropy of each row, averaged: a batch of one sample gives that sample's LM loss, as
    `mixjax.salience` defines it."""
    logits = module(tokens)[:, :-1]
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, jnp.asarray(tokens)[:, 1:, None], axis=-1))


def _by_path(scores: dict, n_layers: int) -> dict[str, np.ndarray]:
    """mixjax.salience's {linear: [L, N]} → quantize_linears' {"layers.i.linear": [N]}."""
    return {f"layers.{i}.{name}": np.asarray(s[i]) for name, s in scores.items() for i in range(n_layers)}


def _weight_difference(a: MixedWeight, b: MixedWeight) -> str | None:
    """None where the weights agree, else what differs. Identical on a CPU. On a GPU the two paths' H (f32 at the
    highest precision, but XLA fusions of their own, so other summation orders) differ in the last bits, which GPTQ's
    error feedback may carry across rounding boundaries, into a group's maximum or its clipping choice: there ≤ 1 %
    of the codes and ≤ 1 % of the scales may differ (by more than 1e-4 relative), wherever the scales are close
    (an H200 measured up to 0.26 % of a linear's codes, and one up_proj group scale 1.3 % apart, a clipping step;
    a wrong H or channel order moves tens of % of them)."""
    if jax.default_backend() == "cpu":
        same = all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
        return None if same else "not identical"
    if not (np.array_equal(a.channel, b.channel) and a.n8 == b.n8):
        return f"8-bit channels differ ({a.n8} against {b.n8})"
    codes = {f: float(np.mean(np.asarray(getattr(a, f)) != np.asarray(getattr(b, f)))) for f in ("q8", "q4", "zero4")
             if getattr(a, f).size}
    scales = {f: float(np.mean(np.abs(np.asarray(getattr(a, f)) - np.asarray(getattr(b, f))) >
                               1e-4 * np.abs(np.asarray(getattr(b, f))))) for f in ("scale8", "scale4") if getattr(a, f).size}
    ok = max(codes.values()) <= 1e-2 and max(scales.values(), default=0.0) <= 1e-2
    return None if ok else f"codes differing {codes}, scales differing {scales}"


@pytest.fixture(scope="module")
def tiny_params():
    return mixjax.init_params(TINY, jax.random.key(0), dtype=jnp.float32)


@pytest.fixture(scope="module")
def calib():
    return [_tokens(10 + i, (4, 32)) for i in range(2)]


# ----------------------------------------------------------------------------------------------------
# MixedLinear


@pytest.mark.parametrize("k,with_bias", [(256, True), (200, False)])  # 200: a padded last group of 128
def test_mixed_linear_from_linear_is_the_rtn_weight(k, with_bias):
    """RTN without calibration equals `pack_rtn` on the transposed kernel, through `mixjax.linear`, on [B, T, K]
    inputs; with h the GPTQ weight has a smaller output error on those inputs than RTN."""
    rng = np.random.default_rng(k)
    lin = nnx.Linear(k, 96, use_bias=with_bias, rngs=nnx.Rngs(int(rng.integers(1 << 30))))
    if with_bias:
        lin.bias[...] = jnp.asarray(rng.normal(size=96), jnp.float32)
    mask = rng.random(96) < 0.1
    x = jnp.asarray(rng.normal(size=(2, 5, k)), jnp.float32)
    q = mnn.MixedLinear.from_linear(lin, mask, implementation="xla")
    w = jnp.asarray(lin.kernel[...]).T  # [N, K]
    ref = pack_rtn(w, jnp.asarray(mask))
    got = q.weight.get_value()
    for field in ("q8", "q4", "zero4", "channel", "row_of_channel"):  # codes exact; scales within an f32 ulp
        np.testing.assert_array_equal(np.asarray(getattr(got, field)), np.asarray(getattr(ref, field)), err_msg=field)
    for field in ("scale8", "scale4"):
        np.testing.assert_allclose(np.asarray(getattr(got, field)), np.asarray(getattr(ref, field)), rtol=1e-6)
    want = linear(x, ref, lin.bias[...] if with_bias else None, implementation="xla")
    np.testing.assert_allclose(np.asarray(q(x)), np.asarray(want), rtol=1e-5, atol=1e-5)
    assert isinstance(nnx.state(q, mnn.QuantizedWeight), nnx.State) and not jax.tree.leaves(
        nnx.state(q, lambda path, v: isinstance(v, nnx.Param) and "weight" in path))  # the codes are no nnx.Param
    np.testing.assert_allclose(np.asarray(nnx.jit(lambda m, x: m(x))(q, x)), np.asarray(want), rtol=1e-5, atol=1e-5)

    xs = x.reshape(-1, k)
    h = 2.0 * xs.T @ xs
    g = mnn.MixedLinear.from_linear(lin, mask, h=h, implementation="xla")
    exact = x @ lin.kernel[...] + (lin.bias[...] if with_bias else 0.0)
    err_rtn = float(jnp.sum((q(x) - exact) ** 2))
    err_gptq = float(jnp.sum((g(x) - exact) ** 2))
    assert err_gptq < err_rtn, (err_gptq, err_rtn)
    assert err_rtn < 0.05 * float(jnp.sum(exact**2))


def test_mixed_linear_refuses_bad_input():
    lin = nnx.Linear(128, 32, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="quantized weight"):
        mnn.MixedLinear(jnp.zeros((32, 128)))
    with pytest.raises(TypeError, match="nnx.Linear"):
        mnn.MixedLinear.from_linear(mnn.RMSNorm(jnp.ones(8), 1e-6))
    with pytest.raises(ValueError, match="is_int8 has shape"):
        mnn.MixedLinear.from_linear(lin, np.zeros(31, bool))
    q = mnn.MixedLinear.from_linear(lin)
    with pytest.raises(ValueError, match="takes 128"):
        q(jnp.ones((2, 64)))


# ----------------------------------------------------------------------------------------------------
# Llama as NNX modules


@pytest.mark.parametrize("variant", ["plain", "qwen2_tied_window", "qwen3", "smollm3", "gemma3", "gemma2"])
def test_llama_logits_equal_the_functional_model(variant):
    cfg = TINY
    if variant == "qwen2_tied_window":  # q/k/v biases, tied embeddings, a sliding window shorter than the sequence
        cfg = dataclasses.replace(TINY, attention_bias=True, tie_word_embeddings=True, sliding_window=8)
    elif variant == "qwen3":  # query/key head norms, heads wider than hidden / heads
        cfg = dataclasses.replace(TINY, model_type="qwen3", qk_norm=True, head_dim=96)
    elif variant == "smollm3":  # layer 1 without RoPE
        cfg = dataclasses.replace(TINY, model_type="smollm3", nope_layers=(1,), tie_word_embeddings=True)
    elif variant == "gemma3":  # sandwich norms, GeGLU, scaled embeddings, layer 0 with a window of 8 and RoPE of its own
        cfg = dataclasses.replace(TINY, model_type="gemma3_text", qk_norm=True, mlp_act="gelu_tanh", embed_scale=3.0,
                                  sandwich_norms=True, sliding_window=8, global_layers=(1,), rope_local_theta=100.0,
                                  tie_word_embeddings=True, final_logit_softcap=2.0)
    elif variant == "gemma2":  # soft-capped attention scores, another attention scale, no head norms
        cfg = dataclasses.replace(TINY, model_type="gemma2", mlp_act="gelu_tanh", embed_scale=3.0, sandwich_norms=True,
                                  sliding_window=8, global_layers=(1,), attn_logit_softcap=1.5, query_pre_attn_scalar=20.0)
    params = mixjax.init_params(cfg, jax.random.key(1), dtype=jnp.float32)
    norms = (("q_norm", "k_norm") if cfg.qk_norm else ()) + (("attn_output_norm", "mlp_output_norm")
                                                             if cfg.sandwich_norms else ())
    if norms:  # norm weights away from 1, so that a dropped norm fails
        for name in norms:
            params["layers"][name] = 1 + 0.5 * jax.random.normal(jax.random.key(5), params["layers"][name].shape)
    if cfg.attention_bias:  # non-zero biases, so that a dropped bias fails
        attn = params["layers"]["self_attn"]
        for name in ("q_proj", "k_proj", "v_proj"):
            attn[name]["bias"] = 0.1 * jax.random.normal(jax.random.key(2), attn[name]["bias"].shape)
    llama = mnn.Llama(cfg, params)
    tokens = _tokens(3, (2, 24))
    with jax.default_matmul_precision("highest"):  # f32 products exact on a GPU too (its default is TF32)
        want = mixjax.forward(params, tokens, cfg, implementation="xla")
        got = llama(tokens)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5 * float(jnp.max(jnp.abs(want))))
    back = llama.to_params()
    assert jax.tree.structure(back) == jax.tree.structure(params)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)))


def test_llama_from_quantized_params(tiny_params, calib):
    """mixjax.quantize's params (a tuple of layers of MixedWeights) become MixedLinears and run as the functional
    model runs them; to_params gives them back as they were."""
    qparams = mixjax.quantize(tiny_params, calib, TINY, config=mixjax.QuantConfig(gptq=False, clip=False))
    llama = mnn.Llama(TINY, qparams)
    assert isinstance(llama.layers[1].mlp.down_proj, mnn.MixedLinear)
    tokens = _tokens(4, (2, 16))
    np.testing.assert_allclose(np.asarray(llama(tokens)),
                               np.asarray(mixjax.forward(qparams, tokens, TINY, implementation="xla")), rtol=1e-5, atol=1e-5)
    back = llama.to_params()
    assert jax.tree.structure(back) == jax.tree.structure(qparams)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(qparams)))
    prompts = [[5, 9, 2], [7, 1, 3, 3, 8]]  # decoding through the KV cache: mixjax.generate's tokens
    kw = dict(max_new_tokens=4, eos_token_ids=(), implementation="xla")
    assert llama.generate(prompts, **kw) == mixjax.generate(qparams, TINY, prompts, **kw)
    table = tiny_params["embed_tokens"]  # an int8 embedding table, as QuantConfig(head_bits=8) makes it
    with pytest.raises(ValueError, match="head_bits"):
        mnn.Llama(TINY, {**qparams, "embed_tokens": pack_rtn(table, jnp.ones(table.shape[0], bool))})


# ----------------------------------------------------------------------------------------------------
# Salience and quantization against the functional quantizer


@pytest.mark.parametrize("kind", ["fisher", "first-order-off", "diag"])
def test_linear_salience_equals_mixjax_salience(tiny_params, calib, kind):
    """Per-sample weight gradients here, the α-probe (one backward a batch) in `mixjax.salience`: the same S_c."""
    llama = mnn.Llama(TINY, tiny_params)
    with jax.default_matmul_precision("highest"):  # f32 products exact on a GPU too (its default is TF32)
        got = mnn.linear_salience(llama, calib, lm_loss, select=mnn.Llama.decoder_linears, kind=kind, batch_size=3)
        want = _by_path(mixjax.salience(tiny_params, calib, TINY, config=mixjax.QuantConfig(salience=kind)), 2)
    assert set(got) == set(want)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-6 * np.max(np.abs(want[name])),
                                   err_msg=name)


def test_quantize_linears_equals_quantize(tiny_params, calib, tmp_path):
    """With mixjax.salience's scores: RTN gives mixjax.quantize's weights in every layer; GPTQ + clipping in the
    first layer, whose calibration inputs both take from the float embedding (later layers: the float model's
    inputs here, the quantized layers' outputs in mixjax.quantize)."""
    scores = mixjax.salience(tiny_params, calib, TINY)
    for config, layers in ((mixjax.QuantConfig(gptq=False, clip=False), (0, 1)), (mixjax.QuantConfig(), (0,))):
        llama = mnn.Llama(TINY, tiny_params)
        with jax.default_matmul_precision("highest"):  # H in f32 on a GPU too (its default is TF32)
            want = mixjax.quantize(tiny_params, calib, TINY, config=config, scores=scores)
            report = mnn.quantize_linears(llama, calib, lm_loss, config=config, select=mnn.Llama.decoder_linears,
                                          scores=_by_path(scores, 2), implementation="xla")
        got = llama.to_params()
        assert isinstance(got["layers"], tuple)
        for i in layers:
            for name in mixjax.LINEAR_NAMES:
                group, proj = name.split(".")
                difference = _weight_difference(got["layers"][i][group][proj]["weight"],
                                                want["layers"][i][group][proj]["weight"])
                assert difference is None, (config.gptq, i, name, difference)
        assert abs(report.bits - 4.4) < 0.05
        if config.gptq:  # the quantized NNX Llama as a mixjax checkpoint: saved, loaded, rebuilt, the same logits
            import convert
            from mixjax.quant.checkpoint import save_quantized

            save_quantized(tmp_path / "nnx-w4.4a8", got, TINY, config=config)
            cfg, loaded = convert.load(tmp_path / "nnx-w4.4a8")
            tokens = _tokens(8, (1, 16))
            np.testing.assert_array_equal(np.asarray(mnn.Llama(cfg, loaded)(tokens)), np.asarray(llama(tokens)))
        tokens = _tokens(7, (2, 32))
        np.testing.assert_allclose(np.asarray(llama(tokens)),
                                   np.asarray(mixjax.forward(got, tokens, TINY, implementation="xla")),
                                   rtol=1e-5, atol=1e-5)


class _Regressor(nnx.Module):
    """Not a language model: three linears and a GELU, a hidden width that is no multiple of 128."""

    def __init__(self, rngs):
        self.inp = nnx.Linear(256, 200, rngs=rngs)
        self.hidden = nnx.Linear(200, 256, rngs=rngs)
        self.out = nnx.Linear(256, 64, use_bias=False, rngs=rngs)

    def __call__(self, x):
        return self.out(jax.nn.gelu(self.hidden(jax.nn.gelu(self.inp(x)))))


def test_quantize_linears_on_any_model():
    """A model mixjax does not know, with a regression loss of its own: at 4.4 bits (global salience, GPTQ,
    clipping) its held-out outputs stay closer to the float model's than plain 4-bit RTN's, 8 bits closer still,
    and the quantized module runs jitted."""
    scale = jnp.linspace(0.2, 3.0, 256)  # uneven input channels
    x = jax.random.normal(jax.random.key(0), (1024, 256)) * scale
    held = jax.random.normal(jax.random.key(1), (256, 256)) * scale
    mix = jax.random.normal(jax.random.key(2), (256, 64)) / 16.0
    batches = [(x[i : i + 256], jnp.sin(x[i : i + 256] @ mix)) for i in range(0, 1024, 256)]

    def loss_fn(module, batch):
        inputs, labels = batch
        return jnp.mean((module(inputs) - labels) ** 2)

    teacher = _Regressor(nnx.Rngs(0))(held)
    errors = {}
    for label, config in (("rtn4", mixjax.QuantConfig(bits=4.0, gptq=False, clip=False)),
                          ("w4.4", mixjax.QuantConfig(bits=4.4, batch_size=64)), ("w8", mixjax.QuantConfig(bits=8.0))):
        student = _Regressor(nnx.Rngs(0))
        report = mnn.quantize_linears(student, batches, loss_fn, config=config, implementation="xla",
                                      progress=label == "w4.4")  # the bars' path once
        assert all(isinstance(getattr(student, n), mnn.MixedLinear) for n in ("inp", "hidden", "out"))
        errors[label] = float(jnp.mean((nnx.jit(lambda m, x: m(x))(student, held) - teacher) ** 2))
        assert report.bits == pytest.approx({"rtn4": 4.0, "w4.4": 4.4, "w8": 8.0}[label], abs=0.05)
        if label == "w4.4":  # H recorded for two linears a pass (three passes' worth of groups: 2 + 1): the same weights
            again = _Regressor(nnx.Rngs(0))
            mnn.quantize_linears(again, batches, loss_fn, config=config, implementation="xla", linears_per_pass=2)
            for n in ("inp", "hidden", "out"):
                assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(_get_weight(again, n)),
                                                                jax.tree.leaves(_get_weight(student, n))))
    assert errors["w8"] < errors["w4.4"] < errors["rtn4"], errors


def _get_weight(module, name):
    return mnn._get(getattr(module, name).weight)


def _linears_unchanged(llama, before):
    after = mnn.find_linears(llama)
    assert [p for p, _ in after] == [p for p, _ in before]
    for (_, a), (_, b) in zip(after, before):
        assert a is b


def test_quantize_linears_refuses_and_leaves_the_model(tiny_params, calib):
    llama = mnn.Llama(TINY, tiny_params)
    before = mnn.find_linears(llama)
    with pytest.raises(ValueError, match="no nnx.Linear"):
        mnn.quantize_linears(llama, calib, lm_loss, select=lambda path, m: False)
    with pytest.raises(ValueError, match="calibration batches and a loss_fn"):
        mnn.quantize_linears(llama, None, None, select=mnn.Llama.decoder_linears)
    with pytest.raises(ValueError, match="expected a scalar or shape"):
        mnn.quantize_linears(llama, calib, lambda m, t: m(t)[..., 0], select=mnn.Llama.decoder_linears)
    with pytest.raises(ValueError, match=r"scores\['layers.0.mlp.down_proj'\] has shape"):
        mnn.quantize_linears(llama, calib, lm_loss, select=mnn.Llama.decoder_linears,
                             scores={p: np.zeros(3) for p in _by_path(mixjax.salience(tiny_params, calib, TINY), 2)})
    with pytest.raises(ValueError, match="dynamic activation scales only"):
        mnn.quantize_linears(llama, calib, lm_loss, config=mixjax.QuantConfig(
            act=dataclasses.replace(mixjax.QuantConfig().act, static=True)))
    with pytest.raises(ValueError, match="head_bits"):
        mnn.quantize_linears(llama, calib, lm_loss, config=mixjax.QuantConfig(head_bits=8))
    with pytest.raises(ValueError, match="leading sample axis"):
        mnn.quantize_linears(llama, [(calib[0], calib[0][:2])], lm_loss, select=mnn.Llama.decoder_linears)
    with pytest.raises(ValueError, match="linears_per_pass=0; expected a positive int"):
        mnn.quantize_linears(llama, calib, lm_loss, linears_per_pass=0)
    _linears_unchanged(llama, before)

    bad = jax.tree.map(lambda a: a, tiny_params)
    bad["layers"]["mlp"]["up_proj"]["weight"] = bad["layers"]["mlp"]["up_proj"]["weight"].at[1, 3, 5].set(jnp.nan)
    broken = mnn.Llama(TINY, bad)
    with pytest.raises(ValueError, match=r"layers.1.mlp.up_proj.kernel contains NaN"):
        mnn.quantize_linears(broken, calib, lm_loss, select=mnn.Llama.decoder_linears)

    class Shared(nnx.Module):
        def __init__(self):
            self.a = nnx.Linear(128, 128, rngs=nnx.Rngs(0))
            self.b = self.a

        def __call__(self, x):
            return self.b(self.a(x))

    shared = Shared()
    with pytest.raises(ValueError, match="another path"):
        mnn.quantize_linears(shared, None, None, config=mixjax.QuantConfig(bits=4.0, gptq=False, clip=False))
    assert isinstance(shared.a, nnx.Linear) and shared.b is shared.a


# ----------------------------------------------------------------------------------------------------
# The embedded real model


@pytest.mark.slow
def test_embedded_model_through_nnx(embedded_mixjax):
    """SmolLM2-135M as NNX modules: the functional model's logits; then global-salience W4.4 (RTN, 2 × 128
    calibration tokens) over its 210 linears puts the most 8-bit channels in v_proj, as `mixjax.quantize` does on
    this model (results/accuracy.md: v_proj 72.5 %, next down_proj 20.9 %). The perplexity that follows from those
    channels is `mixjax.quantize`'s (test_quant_embedded), which the tiny-model tests above tie this path to."""
    cfg, params, tokenizer = embedded_mixjax
    llama = mnn.Llama(cfg, params)
    tokens = np.asarray([tokenizer.encode("The capital of France is Paris, and the capital of Italy is")])
    want = mixjax.forward(params, tokens, cfg, implementation="xla")
    np.testing.assert_allclose(np.asarray(llama(tokens)), np.asarray(want), atol=1e-4 * float(jnp.max(jnp.abs(want))))

    calib = list(mixjax.calibration_batches(tokenizer, n_samples=2, seq_len=128, batch_size=2))
    report = mnn.quantize_linears(llama, calib, lm_loss, config=mixjax.QuantConfig(gptq=False, clip=False),
                                  select=mnn.Llama.decoder_linears, implementation="xla")
    assert len(report.int8_share) == 7 * cfg.num_hidden_layers and abs(report.bits - 4.4) < 0.01
    share = {name: np.mean([v for k, v in report.int8_share.items() if k.endswith(name)]) for name in mixjax.LINEAR_NAMES}
    assert max(share, key=share.get) == "self_attn.v_proj" and share["self_attn.v_proj"] > 0.4, share
    assert isinstance(llama.layers[0].self_attn.v_proj.weight.get_value(), MixedWeight)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="runs the compiled Pallas kernels: needs a GPU")
def test_nnx_llama_on_the_kernels(tiny_params, calib):
    """On a GPU, the quantized NNX Llama's MixedLinears run the Pallas kernels ("auto") and give the XLA reference's
    logits; its params generate through the decode kernels the same greedy tokens as through the reference."""
    llama = mnn.Llama(TINY, tiny_params)
    mnn.quantize_linears(llama, calib, lm_loss, select=mnn.Llama.decoder_linears)
    tokens = _tokens(5, (2, 24))
    got = llama(tokens)  # MixedLinear(implementation="auto") → the kernels
    want = mixjax.forward(llama.to_params(), tokens, TINY, implementation="xla")
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-3 * float(jnp.max(jnp.abs(want))))
    prompts = [list(tokens[0, :8]), list(tokens[1, :5])]
    fast = mixjax.generate(llama.to_params(), TINY, prompts, max_new_tokens=6)
    ref = mixjax.generate(llama.to_params(), TINY, prompts, max_new_tokens=6, implementation="xla")
    assert sum(a == b for x, y in zip(fast, ref) for a, b in zip(x, y)) >= 10  # of 12: a near-tie may flip
