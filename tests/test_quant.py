"""MixLLM quantizer: quantizer invariants, GPTQ, clipping, salience, allocation, API and bad input."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixjax import model
from mixjax.config import LlamaConfig
from mixjax.quant import (
    ActFormat,
    FakeQuantWeight,
    QuantConfig,
    WeightFormat,
    allocate,
    average_bits,
    dequantize_rows,
    fake_quant_act,
    gptq_quantize,
    quantize,
    quantize_rows,
)
from mixjax.quant import salience as sal
from mixjax.quant.api import salience
from mixjax.quant.gptq import rtn_clip_quantize
from pallas_kernels import StaticMixedWeight

TINY = LlamaConfig(vocab_size=61, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=12, rope_theta=10000.0)


def _key(seed):
    return jax.random.PRNGKey(seed)


@pytest.fixture(scope="module")
def tiny_params():
    params = model.init_params(TINY, _key(0), jnp.float32)
    # Larger weights than the 0.02 default, so the output depends visibly on every channel.
    return jax.tree.map(lambda a: a * 6.0 if a.ndim == 3 else a, params)


@pytest.fixture(scope="module")
def tiny_tokens():
    return np.asarray(jax.random.randint(_key(1), (4, 16), 0, TINY.vocab_size), np.int32)


def _correlated_inputs(key, t, k):
    mix = jax.random.normal(key, (k, k)) / np.sqrt(k) + jnp.eye(k)
    return jax.random.normal(jax.random.fold_in(key, 1), (t, k)) @ mix * (1.0 + jnp.arange(k) / k)


# --------------------------------------------------------------------------------------------------
# Weight quantizers


@pytest.mark.parametrize("k", [128, 200, 576])
def test_rtn_invariants(k):
    n = 40
    w = jax.random.normal(_key(k), (n, k)) * 0.1
    is_int8 = jax.random.uniform(_key(k + 1), (n,)) < 0.3
    qr = quantize_rows(w, is_int8, WeightFormat())
    g = -(-k // 128)
    assert qr.q.shape == (n, g * 128) and qr.scale.shape == (n, g) and qr.zero.shape == (n, g)
    q = np.asarray(qr.q, np.int32)
    m8 = np.asarray(is_int8)
    assert q[m8].min() >= -127 and q[m8].max() <= 127
    assert q[~m8].min() >= 0 and q[~m8].max() <= 15
    assert np.all(np.asarray(qr.zero)[m8] == 0)
    assert np.all(q[:, k:] == 0)  # K padding holds zero codes
    # w ≈ (q − z)·s to within half a step, element by element
    z = np.repeat(np.asarray(qr.zero, np.int32), 128, axis=1)[:, :k]
    s = np.repeat(np.asarray(qr.scale), 128, axis=1)[:, :k]
    deq = (q[:, :k] - z) * s
    np.testing.assert_allclose(deq, np.asarray(dequantize_rows(qr)), rtol=1e-6, atol=1e-7)
    assert np.all(np.abs(deq - np.asarray(w)) <= 0.5 * s * (1 + 1e-5))


def test_padded_group_is_exact():
    """The last, padded group quantizes exactly like a short group of its real elements."""
    n, k = 24, 200  # last group: 72 real columns + 56 padding
    w = jax.random.normal(_key(3), (n, k))
    is_int8 = jnp.arange(n) % 3 == 0
    full = quantize_rows(w, is_int8, WeightFormat())
    tail = quantize_rows(w[:, 128:], is_int8, WeightFormat(group_size=72))
    np.testing.assert_allclose(np.asarray(full.scale[:, 1]), np.asarray(tail.scale[:, 0]), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(full.zero[:, 1]), np.asarray(tail.zero[:, 0]))
    np.testing.assert_array_equal(np.asarray(full.q[:, 128:200]), np.asarray(tail.q))
    # A weight already on the grid (padded group included) round-trips exactly.
    on_grid = dequantize_rows(full)
    again = quantize_rows(on_grid, is_int8, WeightFormat())
    np.testing.assert_allclose(np.asarray(dequantize_rows(again)), np.asarray(on_grid), rtol=0, atol=1e-6)


def test_pack_mixed_round_trip():
    from pallas_kernels import pack_mixed

    n, k = 200, 576
    w = jax.random.normal(_key(4), (n, k)) * 0.05
    is_int8 = np.asarray(jax.random.uniform(_key(5), (n,)) < 0.15)
    qr = quantize_rows(w, jnp.asarray(is_int8))
    mw = pack_mixed(np.asarray(qr.q), np.asarray(qr.scale), np.asarray(qr.zero), is_int8, k=k)
    np.testing.assert_array_equal(np.asarray(mw.dequantize()), np.asarray(dequantize_rows(qr)))


def test_per_channel_and_symmetric4_formats():
    w = jax.random.normal(_key(6), (16, 96))
    fmt = WeightFormat(group_size=None, symmetric4=True)
    qr = quantize_rows(w, jnp.zeros(16, bool), fmt)
    assert qr.scale.shape == (16, 1)
    q = np.asarray(qr.q)
    assert q.min() >= -7 and q.max() <= 7 and np.all(np.asarray(qr.zero) == 0)
    err = np.abs(np.asarray(dequantize_rows(qr, fmt) - w))
    assert np.all(err <= 0.5 * np.asarray(qr.scale) * (1 + 1e-5))


def test_gptq_lowers_output_error_vs_rtn():
    n, k, t = 96, 256, 2048
    w = jax.random.normal(_key(7), (n, k)) * 0.05
    x = _correlated_inputs(_key(8), t, k)  # [T, K]
    h = 2.0 * x.T @ x
    is_int8 = jnp.arange(n) < 10

    def out_err(qr):
        return float(jnp.sum((x @ (dequantize_rows(qr) - w).T) ** 2))

    rtn = out_err(quantize_rows(w, is_int8))
    gptq = out_err(gptq_quantize(w, h, is_int8))
    gptq_clip = out_err(gptq_quantize(w, h, is_int8, clip=True))
    assert gptq < 0.9 * rtn
    assert gptq_clip < rtn
    # clipping search never loses to no clipping on its own criterion
    assert out_err(rtn_clip_quantize(w, h, is_int8)) <= rtn * (1 + 1e-6)


def test_gptq_subsets_equal_separate_runs():
    """Running GPTQ once on mixed rows equals running it on the 4-bit and the 8-bit subsets separately."""
    n, k = 32, 256
    w = jax.random.normal(_key(9), (n, k))
    x = _correlated_inputs(_key(10), 512, k)
    h = 2.0 * x.T @ x
    is_int8 = jnp.arange(n) % 4 == 0
    both = gptq_quantize(w, h, is_int8)
    only8 = gptq_quantize(w[is_int8], h, is_int8[is_int8])
    only4 = gptq_quantize(w[~is_int8], h, is_int8[~is_int8])
    np.testing.assert_array_equal(np.asarray(both.q)[np.asarray(is_int8)], np.asarray(only8.q))
    np.testing.assert_array_equal(np.asarray(both.q)[~np.asarray(is_int8)], np.asarray(only4.q))


# --------------------------------------------------------------------------------------------------
# Activations


def test_activation_fake_quant_per_token_group():
    x = jax.random.normal(_key(11), (3, 5, 200)) * 4
    xq = fake_quant_act(x, ActFormat())
    xg = np.pad(np.asarray(x), ((0, 0), (0, 0), (0, 56))).reshape(3, 5, 2, 128)
    step = np.abs(xg).max(-1, keepdims=True) / 127
    err = np.abs(np.pad(np.asarray(xq - x), ((0, 0), (0, 0), (0, 56))).reshape(3, 5, 2, 128))
    assert np.all(err <= 0.5 * step * (1 + 1e-5))
    # each (token, group) keeps its max exactly
    np.testing.assert_allclose(np.abs(np.asarray(xq)).max(-1), np.abs(np.asarray(x)).max(-1), rtol=1e-6)
    tok = fake_quant_act(x, ActFormat(granularity="token"))
    assert float(jnp.abs(tok - x).max()) <= float(jnp.abs(x).max()) / 127 * 0.5 * (1 + 1e-5)
    amax = jnp.full((2,), 1.0)
    static = fake_quant_act(x, ActFormat(static=True), amax)
    assert float(jnp.abs(static).max()) <= 1.0 + 1e-6  # clipped to the calibrated range


def test_static_scales_clipped_for_least_squared_error():
    """`static_clip_errors` is Σ (x − fake_quant(x))² per (ratio, group), summed directly here; on inputs where one
    token sets a group's maximum 60× above every other token's, the least-error ratio clips that token and
    more than halves the group's total error, while a group without an outlier keeps most of its maximum;
    `ActFormat` names the two calibrations it takes."""
    from mixjax.quant.activations import STATIC_RATIOS, group_absmax, static_clip_errors

    rng = np.random.default_rng(int(jax.random.randint(_key(12), (), 0, 2**31 - 1)))
    x = rng.standard_normal((2048, 200)).astype(np.float32)
    x[7, 3] = 300.0  # the outlier token, in group 0 only
    fmt = ActFormat(static=True)
    absmax = group_absmax(jnp.asarray(x), fmt)
    errors = np.asarray(static_clip_errors(jnp.asarray(x), absmax, fmt))
    assert errors.shape == (len(STATIC_RATIOS), 2)
    for r in (0, 5, 12):
        xq = np.asarray(fake_quant_act(jnp.asarray(x), fmt, STATIC_RATIOS[r] * absmax))
        direct = np.square(xq - x)
        np.testing.assert_allclose(errors[r], [direct[:, :128].sum(), direct[:, 128:].sum()], rtol=1e-5)
    best = errors.argmin(0)
    assert STATIC_RATIOS[best[0]] < 0.5 and errors[best[0], 0] < errors[0, 0] / 2
    assert STATIC_RATIOS[best[1]] >= 0.35
    with pytest.raises(ValueError, match="static_calib='p99'.*'max' or 'mse'"):
        ActFormat(static=True, static_calib="p99")


def test_static_mse_calibration_reaches_the_simulated_weights():
    """quantize(..., act=ActFormat(static=True, static_calib="mse")): each linear's static maxima are the plain
    calibration's maxima times one of STATIC_RATIOS per group, and the weights the same codes. One calibration
    token whose embedding is a single feature sets q/k/v's maximum alone (√D after the norm, the other tokens'
    features ≈ N(0, 1)); that maximum is clipped."""
    from mixjax.quant.activations import STATIC_RATIOS

    params = model.init_params(TINY, _key(13), jnp.float32)
    params["embed_tokens"] = params["embed_tokens"].at[3].set(jnp.zeros(TINY.hidden_size).at[0].set(1.0))
    calib = [jax.random.randint(_key(14), (8, 128), 4, TINY.vocab_size).at[0, 5].set(3)]
    got = {}
    for kind in ("max", "mse"):
        config = QuantConfig(bits=4, act=ActFormat(static=True, static_calib=kind), gptq=False, clip=False)
        got[kind] = quantize(params, calib, TINY, config=config)
    ratios = {}
    for name in model.LINEAR_NAMES:
        plain, clipped = (sal.linear_weight(got[k]["layers"][0], name) for k in ("max", "mse"))
        np.testing.assert_array_equal(np.asarray(plain.dequantize()), np.asarray(clipped.dequantize()))
        ratios[name] = np.asarray(clipped.a_absmax) / np.asarray(plain.a_absmax)
        assert np.all(np.isclose(ratios[name][:, None], np.asarray(STATIC_RATIOS)[None], rtol=1e-6).any(1))
    assert float(np.asarray(sal.linear_weight(got["max"]["layers"][0], "self_attn.q_proj").a_absmax)[0]) == \
        pytest.approx(TINY.hidden_size ** 0.5, rel=1e-3)
    assert ratios["self_attn.q_proj"][0] < 1.0


# --------------------------------------------------------------------------------------------------
# Allocation


def test_allocation_element_budget_is_exact():
    rng = np.random.default_rng(0)
    scores = {"a": rng.random((3, 50)), "b": rng.random((3, 20)), "c": rng.random((3, 30))}
    k = {"a": 64, "b": 256, "c": 100}
    elements = sum(scores[n].size * k[n] for n in scores)
    for bits in (4.0, 4.2, 4.4, 4.8, 6.3, 8.0):
        chosen = allocate(scores, k, bits)
        got = average_bits(chosen, k)
        assert got <= bits + 1e-12
        assert bits - got < 4 * max(k.values()) / elements + 1e-12
        # the chosen set is a prefix of the global ranking
        flat_s = np.concatenate([scores[n].ravel() for n in scores])
        flat_c = np.concatenate([chosen[n].ravel() for n in scores])
        if flat_c.any() and not flat_c.all():
            assert flat_s[flat_c].min() >= flat_s[~flat_c].max()
    chans = allocate(scores, k, 4.4, budget="channels")
    assert sum(int(m.sum()) for m in chans.values()) == int(300 * 0.1)
    local = allocate(scores, k, 4.4, local=True)
    for n in scores:
        assert np.all(local[n].sum(-1) == int(scores[n].shape[1] * 0.1))


# --------------------------------------------------------------------------------------------------
# Salience


def _split(params):
    p = model.unstack_layers(params)
    return {k: v for k, v in p.items() if k != "layers"}, p["layers"]


def _spearman(a, b):
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def test_salience_ranks_like_brute_force(tiny_params, tiny_tokens):
    rest, layers = _split(tiny_params)
    deltas = sal.rtn4_deltas(layers)
    tokens = jnp.asarray(tiny_tokens)

    def sample_losses(layers_):
        return jax.vmap(lambda t: sal.per_sample_loss(rest, layers_, t[None], TINY))(tokens)  # [B]

    base = sample_losses(layers)
    scores = salience(tiny_params, [tiny_tokens], TINY)
    for i, name in [(0, "self_attn.v_proj"), (1, "mlp.down_proj"), (1, "mlp.gate_proj")]:
        w = sal.linear_weight(layers[i], name)

        def brute(c, i=i, name=name, w=w):
            w_c = w + jnp.zeros_like(w).at[c].set(deltas[i][name][c])
            new = tuple(sal.with_weights(l, {name: w_c}) if j == i else l for j, l in enumerate(layers))
            return jnp.mean(jnp.abs(sample_losses(new) - base))

        truth = np.asarray(jax.jit(jax.vmap(brute))(jnp.arange(w.shape[0])))
        assert _spearman(scores[name][i], truth) > 0.8, name


def test_probe_gradient_and_hvp_match_autodiff(tiny_params, tiny_tokens):
    """g_bᵀΔ_c from the α-probe equals the weight gradient; Δ_cᵀ(HΔ)_c equals jax.hessian's."""
    cfg = dataclasses.replace(TINY, num_hidden_layers=1, hidden_size=8, intermediate_size=12,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=4)
    params = model.init_params(cfg, _key(12), jnp.float32)
    params = jax.tree.map(lambda a: a * 10.0 if a.ndim == 3 else a, params)
    rest, layers = _split(params)
    deltas = sal.rtn4_deltas(layers)
    tokens = jnp.asarray(tiny_tokens[:2, :6])
    u, v = sal.probe_terms(rest, layers, tokens, cfg=cfg, hvp=True)  # each layer's Δ computed where it runs
    held = sal.probe_terms(rest, layers, tokens, cfg=cfg, hvp=True, deltas=deltas)  # every Δ held, as before
    for got, want in zip(jax.tree.leaves((u, v)), jax.tree.leaves(held)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-9)

    names = model.LINEAR_NAMES
    shapes = [sal.linear_weight(layers[0], n).shape for n in names]
    sizes = [a * b for a, b in shapes]

    def unflat(theta):
        parts = jnp.split(theta, np.cumsum(sizes)[:-1])
        return {n: p.reshape(s) for n, p, s in zip(names, parts, shapes)}

    theta0 = jnp.concatenate([sal.linear_weight(layers[0], n).ravel() for n in names])
    delta = jnp.concatenate([deltas[0][n].ravel() for n in names])
    for b in range(1):
        def loss(theta, b=b):
            new = (sal.with_weights(layers[0], unflat(theta)),)
            return sal.per_sample_loss(rest, new, tokens[b : b + 1], cfg)

        g = unflat(jax.jit(jax.grad(loss))(theta0))
        hd = unflat(jax.jit(jax.hessian(loss))(theta0) @ delta)  # H Δ
        for n in names:
            np.testing.assert_allclose(np.asarray(u[0][n][b]), np.asarray(jnp.sum(g[n] * deltas[0][n], -1)),
                                       rtol=1e-3, atol=1e-7)
            np.testing.assert_allclose(np.asarray(v[0][n][b]), np.asarray(jnp.sum(hd[n] * deltas[0][n], -1)),
                                       rtol=2e-3, atol=1e-7)


@pytest.mark.parametrize("kind", ["fisher", "hvp"])
def test_salience_on_stacked_layers_equals_the_layer_loop(tiny_params, tiny_tokens, kind):
    """Stacked params run under lax.scan with each layer's Δ computed in its iteration (quantize's form); a tuple
    of layers runs the Python loop with every Δ held. The same scores up to f32 summation order."""
    assert not isinstance(tiny_params["layers"], tuple)
    stacked = salience(tiny_params, [tiny_tokens], TINY, config=QuantConfig(salience=kind))
    looped = salience(model.unstack_layers(tiny_params), [tiny_tokens], TINY, config=QuantConfig(salience=kind))
    for name in model.LINEAR_NAMES:
        np.testing.assert_allclose(stacked[name], looped[name], rtol=1e-5, atol=1e-6 * np.max(looped[name]))


def test_salience_variants(tiny_params, tiny_tokens):
    out = {}
    for kind in ("fisher", "first-order-off", "diag", "hvp"):
        s = salience(tiny_params, [tiny_tokens[:2]], TINY, config=QuantConfig(salience=kind))
        assert set(s) == set(model.LINEAR_NAMES)
        for n, arr in s.items():
            n_out = sal.linear_weight(model.unstack_layers(tiny_params)["layers"][0], n).shape[0]
            assert arr.shape == (2, n_out) and np.all(np.isfinite(arr)) and np.all(arr >= 0)
        out[kind] = np.concatenate([a.ravel() for a in s.values()])
    assert _spearman(out["fisher"], out["first-order-off"]) > 0.5
    assert not np.allclose(out["fisher"], out["diag"])


# --------------------------------------------------------------------------------------------------
# End to end on the tiny model


def test_quantize_kernel_format_matches_simulation(tiny_params, tiny_tokens):
    from pallas_kernels import MixedWeight

    qp, report = quantize(tiny_params, [tiny_tokens], TINY, config=QuantConfig(), return_report=True)
    w = qp["layers"][1]["mlp"]["down_proj"]["weight"]
    assert isinstance(w, MixedWeight) and len(qp["layers"]) == 2
    assert abs(report.bits_achieved - 4.4) < 4 * 80 / report.num_channels
    sim = {**qp, "layers": tuple(
        sal.with_weights(l, {n: FakeQuantWeight(sal.linear_weight(l, n).dequantize()) for n in model.LINEAR_NAMES})
        for l in qp["layers"])}
    a = model.forward(qp, jnp.asarray(tiny_tokens), TINY, implementation="xla")
    b = model.forward(sim, jnp.asarray(tiny_tokens), TINY)
    fp = model.forward(tiny_params, jnp.asarray(tiny_tokens), TINY)
    # Same codes and the same activation rounding rule: only float summation order differs (rare
    # rounding-boundary flips), far below the quantization error itself.
    assert float(jnp.mean(jnp.abs(a - b))) < 0.05 * float(jnp.mean(jnp.abs(a - fp)))
    assert "8-bit share" in report.to_markdown()


def test_one_step_weight_is_the_bf16_dequantized_product():
    """`OneStepWeight` (`ablate dequant`'s two-step dequantization off): on fresh random weights and inputs of an
    awkward width (K = 200, a [2, 3] lead), the activations quantized as the kernels do, then W and x in bf16 and
    one dot: within the bf16 bound of the exact integer product, yet not equal to it; `as_one_step` wraps every
    MixedWeight and nothing else."""
    import pallas_kernels as pk
    from mixjax.quant.fakequant import OneStepWeight, as_one_step
    from pallas_kernels import MixedWeight, reference

    rng = np.random.default_rng()
    n, k = 96, 200
    qw = pk.pack_rtn(rng.normal(size=(n, k)).astype(np.float32), rng.random(n) < 0.2)
    x = jnp.asarray(rng.normal(size=(2, 3, k)), jnp.float32)
    y = OneStepWeight(qw).matmul(x)
    exact = reference.mixed_matmul_ref(x.reshape(6, k), qw).reshape(2, 3, n)
    assert y.shape == (2, 3, n) and y.dtype == jnp.float32 and OneStepWeight(qw).shape == (n, k)
    rel = float(jnp.linalg.norm(y - exact) / jnp.linalg.norm(exact))
    assert 1e-5 < rel < 5e-3
    params = {"a": qw, "b": jnp.ones(3), "c": [qw]}
    wrapped = as_one_step(params)
    assert isinstance(wrapped["a"], OneStepWeight) and isinstance(wrapped["c"][0], OneStepWeight)
    assert wrapped["b"] is params["b"] and not any(isinstance(leaf, MixedWeight) for leaf in jax.tree.leaves(
        wrapped, is_leaf=lambda v: isinstance(v, (MixedWeight, OneStepWeight))))


def test_quantize_ablation_configs_give_fake_quant(tiny_params, tiny_tokens):
    fp = model.forward(tiny_params, jnp.asarray(tiny_tokens), TINY)
    errs = {}
    for name, cfg in {
        "w8a16": QuantConfig(bits=8, act=ActFormat(bits=None), gptq=False, clip=False),
        "w4a16": QuantConfig(bits=4, act=ActFormat(bits=None), gptq=False, clip=False),
        "w4a4": QuantConfig(bits=4, act=ActFormat(bits=4, granularity="token"), gptq=False, clip=False,
                            weight=WeightFormat(group_size=None, symmetric4=True)),
        "static": QuantConfig(bits=4.4, act=ActFormat(static=True), local=True),
    }.items():
        qp = quantize(tiny_params, [tiny_tokens], TINY, config=cfg)
        kind = StaticMixedWeight if name == "static" else FakeQuantWeight  # static g128 runs on the kernels
        w = qp["layers"][0]["self_attn"]["q_proj"]["weight"]
        assert isinstance(w, kind)
        if kind is FakeQuantWeight:  # the simulation keeps f32 products exact on a GPU too (the calibration pass's
            # propagation copies take the backend's default)
            assert w.exact and "HIGHEST" in str(jax.make_jaxpr(w.matmul)(jnp.ones((2, w.shape[1]))))
            loose = dataclasses.replace(w, exact=False)
            assert "HIGHEST" not in str(jax.make_jaxpr(loose.matmul)(jnp.ones((2, w.shape[1]))))
        errs[name] = float(jnp.mean(jnp.abs(model.forward(qp, jnp.asarray(tiny_tokens), TINY) - fp)))
    assert errs["w8a16"] < errs["w4a16"] < errs["w4a4"]


# --------------------------------------------------------------------------------------------------
# Bad input


def test_bad_inputs(tiny_params, tiny_tokens):
    with pytest.raises(ValueError, match="bits"):
        QuantConfig(bits=3.5)
    with pytest.raises(ValueError, match="bits"):
        QuantConfig(bits=8.5)
    with pytest.raises(ValueError, match="empty"):
        quantize(tiny_params, [], TINY)
    with pytest.raises(ValueError, match="T ≥ 2"):
        quantize(tiny_params, [tiny_tokens[:, :1]], TINY)
    with pytest.raises(ValueError, match="vocabulary"):
        quantize(tiny_params, [tiny_tokens + TINY.vocab_size], TINY)
    bad = jax.tree_util.tree_map_with_path(
        lambda p, a: a.at[1, 0, 0].set(jnp.nan) if "down_proj" in jax.tree_util.keystr(p) else a, tiny_params)
    with pytest.raises(ValueError, match=r"layers\.1\.mlp\.down_proj"):
        quantize(bad, [tiny_tokens], TINY)
    wrong = dataclasses.replace(TINY, intermediate_size=64)
    with pytest.raises(ValueError, match="shape"):
        quantize(tiny_params, [tiny_tokens], wrong)
    nan_embed = {**tiny_params, "embed_tokens": tiny_params["embed_tokens"].at[:].set(jnp.inf)}
    with pytest.raises(FloatingPointError, match=r"layers\.\d+\."):
        salience(nan_embed, [tiny_tokens], TINY)


def test_quantize_cli_bad_input_writes_nothing(tmp_path, capsys):
    from mixjax import cli

    out = tmp_path / "q"
    assert cli.main(["quantize", "--out", str(out), "--bits", "9"]) == 2
    assert "bits" in capsys.readouterr().err and not out.exists()
    assert cli.main(["quantize", "--out", str(out), "--samples", "0"]) == 2
    assert not out.exists()
    out.mkdir()
    assert cli.main(["quantize", "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err and not any(out.iterdir())


def test_quantized_checkpoint_round_trip(tiny_params, tiny_tokens, tmp_path):
    from mixjax.quant.checkpoint import load_quantized, save_quantized

    for i, config in enumerate([QuantConfig(bits=4.0, gptq=False, clip=False),
                                QuantConfig(bits=4.4, gptq=False, clip=False, act=ActFormat(static=True))]):
        qp = quantize(tiny_params, [tiny_tokens], TINY, config=config)
        save_quantized(tmp_path / f"ck{i}", qp, TINY, config=config)
        cfg, restored, config2 = load_quantized(tmp_path / f"ck{i}")
        assert cfg == TINY and config2 == config
        a = model.forward(qp, jnp.asarray(tiny_tokens), TINY, implementation="xla")
        b = model.forward(restored, jnp.asarray(tiny_tokens), cfg, implementation="xla")
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # the runtime-only int8 prefill matrices are not saved: the checkpoint is the one without them
    from pallas_kernels import MixedWeight

    qp = quantize(tiny_params, [tiny_tokens], TINY, config=QuantConfig(bits=4.4, gptq=False, clip=False))
    held = model.int8_prefill(qp)
    mixed = [w for w in jax.tree.leaves(held["layers"], is_leaf=lambda x: isinstance(x, MixedWeight))
             if isinstance(w, MixedWeight)]
    assert mixed and all(w.prefill_w is not None or w.n8 == w.n for w in mixed)
    save_quantized(tmp_path / "held", held, TINY, config=QuantConfig(bits=4.4, gptq=False, clip=False))
    save_quantized(tmp_path / "plain", qp, TINY, config=QuantConfig(bits=4.4, gptq=False, clip=False))
    _, restored, _ = load_quantized(tmp_path / "held")
    assert len(jax.tree.leaves(restored)) == len(jax.tree.leaves(qp))
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(qp)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_checkpoints_in_the_seven_array_layout_still_load(tiny_params, tiny_tokens, tmp_path):
    """Every quantized checkpoint so far stores a `MixedWeight` as its seven arrays (q8 … row_of_channel), the
    layout `MixedWeight` had before it gained runtime-only fields. A checkpoint written with exactly that
    layout must load, bit for bit (session 21: the new fields had made Orbax refuse such checkpoints)."""
    import convert
    from mixjax.quant.checkpoint import load_quantized, quantization_metadata
    from pallas_kernels import MixedWeight

    fields = ["q8", "scale8", "q4", "scale4", "zero4", "channel", "row_of_channel"]

    @dataclasses.dataclass(frozen=True)
    class SevenArrays:
        q8: object
        scale8: object
        q4: object
        scale4: object
        zero4: object
        channel: object
        row_of_channel: object
        n: int
        k: int
        n8: int

    jax.tree_util.register_dataclass(SevenArrays, data_fields=fields, meta_fields=["n", "k", "n8"])
    config = QuantConfig(bits=4.4, gptq=False, clip=False)
    qp = quantize(tiny_params, [tiny_tokens], TINY, config=config)
    old = jax.tree.map(lambda w: SevenArrays(*(getattr(w, f) for f in fields), n=w.n, k=w.k, n8=w.n8)
                       if isinstance(w, MixedWeight) else w, qp, is_leaf=lambda x: isinstance(x, MixedWeight))
    stored = jax.tree.map(lambda a: None if a.size == 0 else a, old)
    convert.save_checkpoint(tmp_path / "old", stored, TINY,
                            extra_metadata={"quantization": quantization_metadata(qp, config)})
    _, restored, _ = load_quantized(tmp_path / "old")
    assert jax.tree.structure(restored) == jax.tree.structure(qp)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(qp)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_kv_cache_study_prices_the_int8_cache():
    """`ablate(study="kv-cache")`: one quantization and the float model through float and int8 KV caches. The first
    row is the quantized model through a float cache (what `perplexity` scores: every position after the first);
    the int8 rows differ from the float-cache runs of their weights, and their paired differences are those rows'
    mean-NLL gaps in perplexity units; the float model's int8 row is that model's alone."""
    import math

    from mixjax.evaluate import perplexity, phased_nll
    from mixjax.quant import as_fake_quant
    from mixjax.quant.ablate import ablate, to_markdown

    cfg = LlamaConfig(vocab_size=61, hidden_size=256, intermediate_size=384, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=64, rope_theta=10000.0)
    params = jax.tree.map(lambda a: a * 6.0 if a.ndim == 3 else a, model.init_params(cfg, _key(8), jnp.float32))
    calib = [np.asarray(jax.random.randint(_key(9), (4, 16), 0, cfg.vocab_size), np.int32)]
    windows = np.asarray(jax.random.randint(_key(10), (3, 64), 0, cfg.vocab_size), np.int32)  # 64: value blocks
    result = ablate(params, cfg, calib, windows, study="kv-cache", bits=4.4, batch_size=4, eval_batch_size=3,
                    log=lambda *a: None)
    first, int8, float_int8 = result["rows"]
    assert result["fp"] == pytest.approx(perplexity(params, cfg, windows, batch_size=1), rel=1e-5)
    qp = as_fake_quant(quantize(params, calib, cfg, config=QuantConfig(bits=4.4, batch_size=4)))
    assert first["perplexity"] == pytest.approx(perplexity(qp, cfg, windows, batch_size=1), rel=1e-5)
    assert "paired" not in first
    want = np.mean([phased_nll([(qp, 64)], cfg, windows[i:i + 1], prompt=1, batch_size=1,
                               cache_dtype=jnp.int8).mean() for i in range(3)])
    assert int8["perplexity"] == pytest.approx(math.exp(want), rel=1e-6)
    assert len({round(r["perplexity"], 6) for r in (first, int8, float_int8)}) == 3
    assert round(float_int8["perplexity"], 6) != round(result["fp"], 6)
    for row, base in ((int8, first["perplexity"]), (float_int8, result["fp"])):
        gap = base * (math.log(row["perplexity"]) - math.log(base))
        assert row["paired"]["delta"] == pytest.approx(gap, rel=1e-6, abs=1e-9)
        assert row["paired"]["stderr"] > 0 and row["paired"]["windows"] == 3
    table = to_markdown(result)
    assert "int8 KV cache (--kv-int8)" in table and "float-cache run of the same weights" in table


def test_prompt_scales_study_prices_per_token_prompts():
    """`ablate(study="prompt-scales")` on a model with K = 256 (two groups a row, so one scale a token is not one
    a group): MixLLM's row is the quantized model through `phased_nll`; the per-token and selective rows run only the
    prompt on other activation codes and differ from it and from each other; each paired difference is, with equal
    windows, the rows' mean-NLL gap in perplexity units, with a positive standard error."""
    import math

    from mixjax.evaluate import phased_nll
    from mixjax.quant import as_fake_quant
    from mixjax.quant.ablate import ablate

    cfg = LlamaConfig(vocab_size=61, hidden_size=256, intermediate_size=384, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=64, rope_theta=10000.0)
    params = jax.tree.map(lambda a: a * 6.0 if a.ndim == 3 else a, model.init_params(cfg, _key(5), jnp.float32))
    calib = [np.asarray(jax.random.randint(_key(6), (4, 16), 0, cfg.vocab_size), np.int32)]
    windows = np.asarray(jax.random.randint(_key(7), (3, 24), 0, cfg.vocab_size), np.int32)
    result = ablate(params, cfg, calib, windows, study="prompt-scales", bits=4.4, batch_size=4, eval_batch_size=3,
                    prompt=8, log=lambda *a: None)
    first, token, selective = result["rows"]
    qp = quantize(params, calib, cfg, config=QuantConfig(bits=4.4, batch_size=4))
    # one window at a time, as the study runs them (for the pairs): a batch of three is another program, whose
    # last-bit differences can flip an activation code (3e-4 in perplexity at XLA's -O0, 2026-12-06)
    nll = phased_nll([(as_fake_quant(qp), 24)], cfg, windows, prompt=8, batch_size=1)
    assert first["perplexity"] == pytest.approx(math.exp(nll.mean()), rel=1e-6) and "paired" not in first
    ppls = [first["perplexity"], token["perplexity"], selective["perplexity"]]
    assert len({round(p, 6) for p in ppls}) == 3
    for row in (token, selective):
        gap = first["perplexity"] * (math.log(row["perplexity"]) - math.log(first["perplexity"]))
        assert row["paired"]["delta"] == pytest.approx(gap, rel=1e-6, abs=1e-9)
        assert row["paired"]["stderr"] > 0 and row["paired"]["windows"] == 3
