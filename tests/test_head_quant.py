"""Quantized token embedding table and LM head (`QuantConfig.head_bits`): `take_rows`, the model's embed /
final_logits on a `MixedWeight`, quantize(), checkpoints and the CLI flag."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixjax import model
from mixjax.config import LlamaConfig
from mixjax.quant import ActFormat, FakeQuantWeight, QuantConfig, WeightFormat, quantize
from pallas_kernels import MixedWeight, dequantize, pack_rtn, take_rows

# V = 200: not a multiple of the 128-row alignment (padding rows); D = 48: K padded to 128.
UNTIED = LlamaConfig(vocab_size=200, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=12, rope_theta=10000.0,
                     tie_word_embeddings=False)
TIED = dataclasses.replace(UNTIED, tie_word_embeddings=True)
FAST = dict(bits=4.0, gptq=False, clip=False)  # RTN W4A8 decoder (no salience): these tests look at the head
forward = jax.jit(model.forward, static_argnames=("cfg", "implementation"))


# --------------------------------------------------------------------------------------------------
# take_rows


@pytest.mark.parametrize("share8", [0.0, 0.1, 1.0])
def test_take_rows_equals_dequantize_rows(share8):
    n, k = 300, 576  # K padded to 640; 8-bit and 4-bit row counts not multiples of 128
    rng = np.random.default_rng(0)
    w = rng.normal(size=(n, k)).astype(np.float32)
    is_int8 = np.zeros(n, bool)
    is_int8[rng.permutation(n)[: int(round(share8 * n))]] = True
    qw = pack_rtn(w, is_int8)
    ids = jnp.asarray(rng.integers(0, n, size=(3, 7)), jnp.int32)  # [B, T]
    got = take_rows(qw, ids)
    assert got.shape == (3, 7, k) and got.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(got), np.asarray(dequantize(qw))[np.asarray(ids)])
    np.testing.assert_array_equal(np.asarray(qw.take_rows(ids[0])), np.asarray(got[0]))  # method, 1-D ids
    # Every row kind is exercised: the 8-bit rows, the 4-bit rows, and first/last channels.
    edge = jnp.asarray([0, n - 1, *np.flatnonzero(is_int8)[:2], *np.flatnonzero(~is_int8)[:2]], jnp.int32)
    np.testing.assert_array_equal(np.asarray(take_rows(qw, edge)), np.asarray(dequantize(qw))[np.asarray(edge)])


def test_take_rows_reads_only_the_requested_rows():
    n, k = 1024, 256
    qw = pack_rtn(np.random.default_rng(1).normal(size=(n, k)), np.arange(n) % 10 == 0)
    jaxpr = jax.make_jaxpr(take_rows)(qw, jnp.zeros((2, 3), jnp.int32))
    sizes = [int(np.prod(v.aval.shape)) for eqn in jaxpr.eqns for v in eqn.outvars]
    # No intermediate is anywhere near the dequantized table (n·Kp elements); dequantize() would make one.
    assert max(sizes) <= 6 * k * 2
    assert max(int(np.prod(v.aval.shape)) for e in jax.make_jaxpr(dequantize)(qw).eqns for v in e.outvars) >= n * k


# --------------------------------------------------------------------------------------------------
# The model with a quantized embedding table / LM head


def _params(cfg):
    params = model.init_params(cfg, jax.random.PRNGKey(0), jnp.float32)
    # Larger than the 0.02 default so the logits depend visibly on the embedding and the head.
    return jax.tree.map(lambda a: a * 6.0 if a.ndim >= 2 else a, params)


def _tokens(cfg):
    return np.asarray(jax.random.randint(jax.random.PRNGKey(1), (2, 12), 0, cfg.vocab_size), np.int32)


@pytest.fixture(scope="module")
def quantized():
    """{(tied, head_bits): (cfg, float params, quantized params)} for tied/untied × None/8/4."""
    out = {}
    for cfg in (UNTIED, TIED):
        params, tokens = _params(cfg), _tokens(cfg)
        for bits in (None, 8, 4):
            out[cfg.tie_word_embeddings, bits] = cfg, params, quantize(
                params, [tokens], cfg, config=QuantConfig(head_bits=bits, **FAST))
    return out


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_head_matches_fake_quant_simulation(quantized, tied, bits):
    cfg, params, qp = quantized[tied, bits]
    names = ("embed_tokens",) if tied else ("embed_tokens", "lm_head")
    for name in names:
        qw = qp[name]
        assert isinstance(qw, MixedWeight) and qw.shape == (cfg.vocab_size, cfg.hidden_size)
        assert qw.n8 == (cfg.vocab_size if bits == 8 else 0)
    assert tied == ("lm_head" not in qp)
    # The decoder is quantized from the float embeddings, so it does not depend on head_bits.
    base = quantized[tied, None][2]
    w, w0 = (qp["layers"][1]["mlp"]["down_proj"]["weight"], base["layers"][1]["mlp"]["down_proj"]["weight"])
    np.testing.assert_array_equal(np.asarray(w.q4), np.asarray(w0.q4))

    # Simulation: a float model whose table is dequantize(qw) and whose head is dequantize(qw) with the
    # same int8 activation fake-quant (an untied config, so the two may be different objects).
    sim_cfg = dataclasses.replace(cfg, tie_word_embeddings=False)
    head = qp["embed_tokens"] if tied else qp["lm_head"]
    sim = {**qp, "embed_tokens": dequantize(qp["embed_tokens"]), "lm_head": FakeQuantWeight(dequantize(head))}
    tokens = jnp.asarray(_tokens(cfg))
    np.testing.assert_array_equal(np.asarray(model.embed(qp, tokens, cfg)), np.asarray(model.embed(sim, tokens, cfg)))
    got = forward(qp, tokens, cfg, implementation="xla")
    want = forward(sim, tokens, sim_cfg, implementation="xla")
    assert got.dtype == jnp.float32 and got.shape == (*tokens.shape, cfg.vocab_size)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4 * float(jnp.std(want)))
    # ...and the head's activations really are int8-rounded: a float head gives other logits.
    f32_head = forward({**sim, "lm_head": dequantize(head)}, tokens, sim_cfg)
    assert float(jnp.max(jnp.abs(f32_head - want))) > 1e-3 * float(jnp.std(want))


@pytest.mark.parametrize("tied", [False, True])
def test_head_error_shrinks_with_bits(quantized, tied):
    cfg, params, _ = quantized[tied, None]
    tokens = jnp.asarray(_tokens(cfg))
    ref = forward(quantized[tied, None][2], tokens, cfg)
    err = {b: float(jnp.mean(jnp.abs(forward(quantized[tied, b][2], tokens, cfg) - ref))) for b in (8, 4)}
    assert 0 < err[8] < 0.25 * err[4]


def test_quantized_table_in_bf16_params_embeds_in_bf16(quantized):
    cfg, _, qp = quantized[True, 4]
    bf16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16) if a.dtype == jnp.float32 and a.ndim == 1 else a, qp)
    x = model.embed(bf16, jnp.asarray(_tokens(cfg)), cfg)
    assert x.dtype == jnp.bfloat16
    fq = {**qp, "embed_tokens": FakeQuantWeight(dequantize(qp["embed_tokens"]))}  # as_fake_quant's form
    np.testing.assert_array_equal(np.asarray(model.embed(fq, jnp.asarray(_tokens(cfg)), cfg)),
                                  np.asarray(model.embed(qp, jnp.asarray(_tokens(cfg)), cfg)))


def test_bad_head_bits():
    for bad in (2, 16, 8.0, True, "8"):
        with pytest.raises(ValueError, match="head_bits"):
            QuantConfig(head_bits=bad)
    with pytest.raises(ValueError, match="head_bits needs the kernel format"):
        QuantConfig(head_bits=8, act=ActFormat(bits=None))
    with pytest.raises(ValueError, match="head_bits needs the kernel format"):
        QuantConfig(head_bits=4, weight=WeightFormat(group_size=None))
    params = _params(UNTIED)
    with pytest.raises(ValueError, match="lm_head contains NaN"):
        quantize({**params, "lm_head": params["lm_head"].at[3, 1].set(jnp.nan)}, [_tokens(UNTIED)], UNTIED,
                 config=QuantConfig(head_bits=8, **FAST))


# --------------------------------------------------------------------------------------------------
# Checkpoints and the CLI


@pytest.mark.parametrize("tied, bits", [(False, 8), (True, 4)])
def test_quantized_head_checkpoint_round_trip(quantized, tmp_path, tied, bits):
    from mixjax.quant.checkpoint import load_quantized, save_quantized

    cfg, _, qp = quantized[tied, bits]
    config = QuantConfig(head_bits=bits, **FAST)
    save_quantized(tmp_path / "ck", qp, cfg, config=config)
    cfg2, restored, config2 = load_quantized(tmp_path / "ck")
    assert cfg2 == cfg and config2 == config
    for name in ("embed_tokens",) if tied else ("embed_tokens", "lm_head"):
        assert isinstance(restored[name], MixedWeight) and restored[name].n8 == qp[name].n8
        for a, b in zip(jax.tree.leaves(qp[name]), jax.tree.leaves(restored[name])):
            assert a.dtype == b.dtype
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    tokens = jnp.asarray(_tokens(cfg))
    np.testing.assert_array_equal(np.asarray(forward(qp, tokens, cfg, implementation="xla")),
                                  np.asarray(forward(restored, tokens, cfg2, implementation="xla")))


def test_checkpoint_config_without_head_bits_loads_as_float_head():
    from mixjax.quant.checkpoint import config_from_dict, config_to_dict

    old = {k: v for k, v in config_to_dict(QuantConfig(bits=4.8)).items() if k != "head_bits"}
    assert config_from_dict(old) == QuantConfig(bits=4.8) and config_from_dict(old).head_bits is None


def test_cli_head_bits(monkeypatch, tmp_path, capsys):
    from mixjax import cli
    from mixjax.quant import pipeline

    seen = []
    monkeypatch.setattr(pipeline, "quantize_model", lambda **kw: seen.append(kw["config"]))
    assert cli.main(["quantize", "--out", str(tmp_path / "a"), "--head-bits", "4", "--quiet"]) == 0
    assert cli.main(["convert", "src", str(tmp_path / "b"), "--quiet"]) == 0
    assert [c.head_bits for c in seen] == [4, None]
    with pytest.raises(SystemExit):
        cli.main(["quantize", "--out", str(tmp_path / "c"), "--head-bits", "6"])
    assert "--head-bits" in capsys.readouterr().err


def test_quantize_head_clip_search_lowers_weight_error():
    from mixjax.quant.api import quantize_head

    params = _params(UNTIED)
    for bits in (8, 4):
        rtn = quantize_head(params, UNTIED, bits=bits, clip=False)
        clip = quantize_head(params, UNTIED, bits=bits, clip=True)
        assert set(clip) == {"embed_tokens", "lm_head"}
        w = params["lm_head"]
        e_rtn, e_clip = (float(jnp.sum((dequantize(q["lm_head"]) - w) ** 2)) for q in (rtn, clip))
        assert e_clip <= e_rtn  # ratio 1.0 is in the grid (and wins ties), so never worse
        if bits == 4:
            assert e_clip < 0.97 * e_rtn  # int4: clipping the tails of Gaussian rows pays
    assert set(quantize_head(_params(TIED), TIED, bits=8)) == {"embed_tokens"}


def test_report_states_head_format_and_weight_bytes():
    from mixjax.quant.report import weight_bytes

    params, tokens = _params(UNTIED), _tokens(UNTIED)
    sizes = {}
    for bits in (None, 8, 4):
        qp, report = quantize(params, [tokens], UNTIED, config=QuantConfig(head_bits=bits, **FAST), return_report=True)
        sizes[bits] = report.weight_bytes
        assert report.head_bits == bits and report.weight_bytes == weight_bytes(qp)
    assert "embedding table / LM head: float" in quantize(params, [tokens], UNTIED, config=QuantConfig(**FAST),
                                                          return_report=True)[1].to_markdown()
    assert "int4 asymmetric g128" in report.to_markdown()
    assert sizes[None] > sizes[8] > sizes[4]
    # Two [V, D] = [200, 48] f32 tables (76.8 kB) become 256 rows × 128 padded columns of int8 codes each.
    assert sizes[None] - sizes[8] == 2 * (200 * 48 * 4 - (256 * 128 + 256 * 4 + 256 * 4 + 200 * 4))


def test_generate_with_quantized_head(quantized):
    from mixjax.generate import generate

    cfg, _, qp = quantized[True, 8]
    new = generate(qp, cfg, [[1, 2, 3], [4]], max_new_tokens=3, eos_token_ids=(), cache_dtype=jnp.float32)
    assert [len(r) for r in new] == [3, 3] and all(0 <= t < cfg.vocab_size for r in new for t in r)


def test_generate_default_cache_dtype_with_quantized_head(quantized):
    from mixjax.generate import generate

    cfg, _, qp = quantized[True, 8]
    generate(qp, cfg, [[1, 2, 3]], max_new_tokens=2, eos_token_ids=())
