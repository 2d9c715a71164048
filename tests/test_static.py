"""Static activation scales on the kernels (`pallas_kernels.static`, `ActFormat(static=True)` in a kernel config):
the codes are the simulation's, every kernel path takes them, the folded prefill form gives the same bits as the
per-(row, group) form, and quantize → save → load keeps them. Fresh random data each run."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk
from mixjax import model
from mixjax.config import LlamaConfig
from mixjax.quant import FakeQuantWeight, QuantConfig, as_fake_quant, quantize
from mixjax.quant.activations import ActFormat, fake_quant_act
from mixjax.quant.salience import linear_weight
from pallas_kernels import reference as ref
from pallas_kernels import static

CFG = LlamaConfig(vocab_size=61, hidden_size=256, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=64, rope_theta=10000.0)


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _case(rng, m, k, n, share8=0.1):
    """(x [m, k], qw, a_absmax): calibrated maxima of other draws of x, 0.6–1.2× this x's group maxima (so some
    values clip), and one group never seen in calibration (maximum 0: its codes are 0)."""
    x = rng.normal(size=(m, k)).astype(np.float32) * rng.uniform(0.5, 4.0, size=k).astype(np.float32)
    w = rng.normal(size=(n, k)).astype(np.float32) * 0.05
    qw = pk.pack_rtn(w, rng.random(n) < share8)
    g = -(-k // 128)
    xg = np.pad(np.abs(x), ((0, 0), (0, g * 128 - k))).reshape(m, g, 128).max(axis=(0, 2))
    a = xg * rng.uniform(0.6, 1.2, size=g).astype(np.float32)
    a[rng.integers(g)] = 0.0
    return jnp.asarray(x), qw, jnp.asarray(a)


@pytest.mark.parametrize("m, k", [(1, 128), (5, 200), (300, 384)])
def test_codes_are_the_simulations(m, k):
    """`static_codes` dequantized is `fake_quant_act` with the same maxima, bit for bit (K padded to groups)."""
    x, _, a = _case(np.random.default_rng(), m, k, 96)
    codes = static.static_codes(x, a)
    assert codes.x_q.shape == (m, -(-k // 128) * 128) and codes.a_scale.shape == (a.shape[0], m)
    np.testing.assert_array_equal(np.asarray(codes.dequantize()),
                                  np.asarray(fake_quant_act(x, ActFormat(static=True), a)))
    sums = np.asarray(codes.x_q, np.int32).reshape(m, -1, 128).sum(-1).T
    np.testing.assert_array_equal(np.asarray(codes.x_sum), sums)
    unit = static.static_codes(x, a, unit_scale=True)
    assert unit.row_scale and np.all(np.asarray(unit.a_scale) == 1.0)
    np.testing.assert_array_equal(np.asarray(unit.x_q), np.asarray(codes.x_q))


@pytest.mark.parametrize("m", [3, 300])
def test_matmul_equals_the_simulated_linear(m):
    """`StaticMixedWeight.matmul` on the XLA path against `FakeQuantWeight` with the same maxima (f32: summation
    order only); from `FOLD_MIN_M` rows the folded form, which gives the unfolded form's bits."""
    rng = np.random.default_rng()
    x, qw, a = _case(rng, m, 384, 96)
    sw = pk.static_weight(qw, a)
    y = sw.matmul(x.reshape(1, m, 384), implementation="xla")
    fq = FakeQuantWeight(w=qw.dequantize(), a_absmax=a, act=ActFormat(static=True))
    assert y.shape == (1, m, 96)
    assert _rel(y, fq.matmul(x)[None]) < 1e-5
    unfolded = ref.mixed_codes_matmul_ref(static.static_codes(x, a).x_q, static.static_codes(x, a).a_scale.T, qw)
    folded = ref.mixed_codes_matmul_ref(static.static_codes(x, a, unit_scale=True).x_q, jnp.ones((m, a.shape[0])),
                                        static.fold_scales(qw, a))
    np.testing.assert_array_equal(np.asarray(folded), np.asarray(unfolded))
    np.testing.assert_array_equal(np.asarray(y[0]), np.asarray(unfolded))
    # dynamic codes would differ: the static maxima clip and round coarser
    assert _rel(y[0], qw.matmul(x, implementation="xla")) > 1e-3


@pytest.mark.parametrize("m, fold", [(1, False), (5, False), (5, True)])
def test_kernels_take_static_codes(m, fold):
    """The Pallas GEMV (M = 1) and MMA kernel (interpret mode on a CPU) on static codes, per-(row, group) or folded
    (scale 1 a row, the weight's scales multiplied): the reference's result to f32 rounding."""
    x, qw, a = _case(np.random.default_rng(), m, 200, 96)
    want = ref.mixed_codes_matmul_ref(static.static_codes(x, a).x_q, static.static_codes(x, a).a_scale.T, qw)
    codes, w = static.static_codes(x, a, unit_scale=fold), static.fold_scales(qw, a) if fold else qw
    y = pk.mixed_matmul(codes, w, interpret=jax.default_backend() != "gpu")  # the real kernels on a GPU
    assert y.shape == (m, 96) and y.dtype == jnp.float32
    assert _rel(y, want) < 1e-5


def test_dequant_dot_reads_codes_as_they_are():
    """The non-Hopper prefill path ("dequant_dot") on static codes: x̂ = bf16(x_q · s_a) as given, within the bf16
    bound of the exact reference. Dequantizing and quantizing them again (what it did before) moves the codes of
    every group whose largest code is below 127 and misses that bound."""
    from pallas_kernels.dequant_dot import dequant_dot_matmul

    x, qw, a = _case(np.random.default_rng(), 40, 384, 96)
    a = a.at[:].set(jnp.where(a > 0, a * 1.5, 0.0))  # no group reaches code 127
    codes = static.static_codes(x.astype(jnp.bfloat16), a)
    want = ref.mixed_codes_matmul_ref(codes.x_q, codes.a_scale.T, qw)
    y = dequant_dot_matmul(codes, qw)
    assert y.dtype == jnp.bfloat16 and _rel(y, want) < 5e-3
    requantized = dequant_dot_matmul(codes.dequantize(), qw)
    assert _rel(requantized, want) > _rel(y, want)


def test_static_weight_refuses_bad_maxima():
    _, qw, a = _case(np.random.default_rng(), 4, 384, 96)
    with pytest.raises(ValueError, match=r"shape \(2,\).*expected \(3,\)"):
        pk.static_weight(qw, a[:2])
    with pytest.raises(ValueError, match="finite and ≥ 0"):
        pk.static_weight(qw, a.at[1].set(jnp.nan))
    with pytest.raises(ValueError, match="finite and ≥ 0"):
        pk.static_weight(qw, a.at[1].set(-1.0))
    with pytest.raises(ValueError, match="x has 200 features, the weight takes 384"):
        pk.static_weight(qw, a).matmul(jnp.zeros((2, 200)))


@pytest.fixture(scope="module")
def static_model():
    params = jax.tree.map(lambda v: v * 6.0 if v.ndim == 3 else v,
                          model.init_params(CFG, jax.random.PRNGKey(0), jnp.float32))
    tokens = np.asarray(jax.random.randint(jax.random.PRNGKey(1), (4, 64), 0, CFG.vocab_size), np.int32)
    config = QuantConfig(bits=4.4, act=ActFormat(static=True, static_calib="mse"), gptq=False)
    return params, tokens, config, quantize(params, [tokens], CFG, config=config)


def test_quantize_gives_static_kernel_weights(static_model):
    """A static kernel-format config quantizes to `StaticMixedWeight`s holding the simulation's maxima and codes:
    the model's logits are `as_fake_quant`'s to f32 summation order, far closer than to the dynamic model's."""
    params, tokens, config, qp = static_model
    assert config.kernel_compatible
    for name in model.LINEAR_NAMES:
        w = linear_weight(qp["layers"][1], name)
        assert isinstance(w, pk.StaticMixedWeight) and w.a_absmax.shape == (w.qw.num_groups,)
    sim = as_fake_quant(qp)
    fq = linear_weight(sim["layers"][0], "mlp.down_proj")
    assert isinstance(fq, FakeQuantWeight) and fq.act.static and fq.a_absmax is not None
    t = jnp.asarray(tokens)
    logits = model.forward(qp, t, CFG, implementation="xla")
    simulated = model.forward(sim, t, CFG, implementation="xla")
    dynamic = model.forward(quantize(params, [tokens], CFG, config=QuantConfig(bits=4.4, gptq=False)), t, CFG,
                            implementation="xla")
    # a code that rounds the other way in one layer (f32 summation order upstream) moves every later logit a little,
    # so compare medians: most positions agree to f32 rounding, and the whole is far closer than the dynamic model
    near = np.median(np.abs(np.asarray(logits) - np.asarray(simulated)), axis=-1)
    assert np.median(near) < 1e-5 and _rel(logits, simulated) < 0.15 * _rel(logits, dynamic)
    with pytest.raises(ValueError, match="static scales; the two-step dequantization ablation"):
        from mixjax.quant import as_one_step
        as_one_step(qp)


def test_static_checkpoint_round_trip_and_older_form(static_model, tmp_path):
    """save → load gives the same `StaticMixedWeight`s bit for bit ("linear_form": "static_mixed" recorded); a
    checkpoint of a static config written before the form was recorded holds `FakeQuantWeight`s and still loads
    as such; an unknown form names the fix; `mixjax info` calls the static checkpoint a kernel format."""
    from convert import orbax_io
    from mixjax.info import model_info
    from mixjax.quant.checkpoint import load_quantized, save_quantized

    _, tokens, config, qp = static_model
    save_quantized(tmp_path / "s", qp, CFG, config=config)
    meta = orbax_io.read_metadata(tmp_path / "s")
    assert meta["extra"]["quantization"]["linear_form"] == "static_mixed"
    assert meta["extra"]["quantization"]["a_groups"]["mlp.down_proj"] == 3
    cfg, restored, config2 = load_quantized(tmp_path / "s")
    assert config2 == config
    assert jax.tree.structure(restored) == jax.tree.structure(qp)
    for x, y in zip(jax.tree.leaves(restored), jax.tree.leaves(qp)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    info = model_info(tmp_path / "s")
    assert info.quantization["kernel_format"]

    save_quantized(tmp_path / "old", as_fake_quant(qp), CFG, config=config)
    path = tmp_path / "old" / orbax_io.METADATA_FILE
    old = json.loads(path.read_text())
    assert old["extra"]["quantization"].pop("linear_form") == "fake_quant"
    path.write_text(json.dumps(old))
    _, restored, _ = load_quantized(tmp_path / "old")
    assert isinstance(linear_weight(restored["layers"][0], "self_attn.q_proj"), FakeQuantWeight)
    assert not model_info(tmp_path / "old").quantization["kernel_format"]
    old["extra"]["quantization"]["linear_form"] = "nf4"
    path.write_text(json.dumps(old))
    with pytest.raises(ValueError, match="unknown linear_form 'nf4'.*upgrade mixjax"):
        load_quantized(tmp_path / "old")


def test_cli_act_scales_option():
    from mixjax.quant.cli import act_format

    assert act_format("dynamic") == ActFormat()
    assert act_format("static") == ActFormat(static=True)
    assert act_format("static-mse") == ActFormat(static=True, static_calib="mse")
    with pytest.raises(ValueError, match="--act-scales 'minmax'"):
        act_format("minmax")


def test_fused_projections_share_one_quantization(static_model):
    """q/k/v and gate/up read one input, so `quantize` gives them one set of maxima and `fuse_projections` fuses
    them into one `StaticMixedWeight`: the same logits as unfused (prefill and a cached step). Weights whose maxima
    differ stay unfused."""
    from helpers import prefill_then_step

    _, tokens, _, qp = static_model
    fused = model.fuse_projections(qp)
    layer = fused["layers"][0]
    assert isinstance(layer["self_attn"]["qkv_proj"]["weight"], pk.StaticMixedWeight)
    assert isinstance(layer["mlp"]["gate_up_proj"]["weight"], pk.StaticMixedWeight)
    t = jnp.asarray(tokens[:2, :24])
    for a, b in zip(prefill_then_step(fused, CFG, t, prompt=20, cache_len=32),
                    prefill_then_step(qp, CFG, t, prompt=20, cache_len=32)):
        assert _rel(a, b) < 1e-5
    k = qp["layers"][0]["self_attn"]["k_proj"]["weight"]
    odd = {**qp["layers"][0], "self_attn": {**qp["layers"][0]["self_attn"],
                                            "k_proj": {"weight": pk.StaticMixedWeight(k.qw, k.a_absmax * 2.0)}}}
    kept = model.fuse_projections({**qp, "layers": (odd,)})["layers"][0]
    assert "qkv_proj" not in kept["self_attn"] and "gate_up_proj" in kept["mlp"]
