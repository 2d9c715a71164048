"""Several devices (`mixjax.parallel`): the same salience, quantized weights and perplexity as on one device,
padding samples counted nowhere, and bad meshes or device counts refused with the fix named.

Several devices on a CPU need XLA's host device count before jax starts, so the comparison runs in a
subprocess with three CPU devices (five samples in batches of four: both batches padded)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from mixjax import cli
from mixjax.parallel import data_mesh, shard_samples
from mixjax.quant.api import salience

THREE_DEVICES = textwrap.dedent("""
    import json
    import jax, jax.numpy as jnp, numpy as np
    from mixjax import model
    from mixjax.config import LlamaConfig
    from mixjax.parallel import data_mesh, shard_samples
    from mixjax.quant import QuantConfig, quantize
    from mixjax.quant.api import salience
    from mixjax.quant.salience import linear_weight

    cfg = LlamaConfig(vocab_size=61, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=12, rope_theta=10000.0)
    params = jax.tree.map(lambda a: a * 6.0 if a.ndim == 3 else a, model.init_params(cfg, jax.random.PRNGKey(0), jnp.float32))
    tokens = np.asarray(jax.random.randint(jax.random.PRNGKey(1), (5, 16), 0, cfg.vocab_size), np.int32)
    mesh = data_mesh()
    out = {"devices": mesh.size}
    sharded, mask, n = shard_samples(tokens[:4], mesh)
    out["shard"] = [len(sharded.sharding.device_set), list(sharded.shape), np.asarray(mask).tolist(), n]
    for kind in ("fisher", "hvp"):
        one = salience(params, [tokens], cfg, config=QuantConfig(salience=kind))
        many = salience(params, [tokens], cfg, config=QuantConfig(salience=kind), mesh=mesh)
        out[kind] = max(float(np.max(np.abs(one[k] - many[k]) / np.max(one[k]))) for k in one)
    one, many = quantize(params, [tokens], cfg), quantize(params, [tokens], cfg, mesh=mesh)
    out["weights"] = max(
        float(np.mean(np.asarray(linear_weight(a, k).dequantize()) != np.asarray(linear_weight(b, k).dequantize())))
        for a, b in zip(one["layers"], many["layers"]) for k in model.LINEAR_NAMES)
    from mixjax.evaluate import perplexity
    windows = np.asarray(jax.random.randint(jax.random.PRNGKey(2), (7, 16), 0, cfg.vocab_size), np.int32)
    out["ppl"] = [[perplexity(p, cfg, windows), perplexity(p, cfg, windows, mesh=mesh)] for p in (params, one)]
    from mixjax.evaluate import phased_nll
    phases = [(params, 9), (one, 16)]
    out["phased"] = float(np.max(np.abs(phased_nll(phases, cfg, windows, prompt=5)
                                        - phased_nll(phases, cfg, windows, prompt=5, mesh=mesh))))
    # FSDP: the float weights split over the devices too (`shard_weights`), loaded straight into their slices
    import tempfile, convert
    from mixjax.parallel import has_split_weights, replicate, shard_weights
    from mixjax.quant.salience import probe_terms
    split = shard_weights(params, mesh)
    specs = lambda p: [str(tuple(a.sharding.spec)) for a in (p["layers"]["mlp"]["gate_proj"]["weight"],
                       p["layers"]["mlp"]["down_proj"]["weight"], p["layers"]["input_layernorm"],
                       p["embed_tokens"])]
    out["split_specs"] = specs(split)
    from mixjax.parallel import weight_sharding  # neither matrix dimension divisible by 3: replicated
    out["indivisible_spec"] = str(tuple(weight_sharding((2, 5, 7), mesh, layer_axis=True).spec))
    fisher = salience(params, [tokens], cfg)
    out["split_fisher"] = max(float(np.max(np.abs(fisher[k] - v) / np.max(fisher[k])))
                              for k, v in salience(split, [tokens], cfg, mesh=mesh).items())
    q_split = quantize(split, [tokens], cfg, mesh=mesh)
    out["split_weights"] = max(
        float(np.mean(np.asarray(linear_weight(a, k).dequantize()) != np.asarray(linear_weight(b, k).dequantize())))
        for a, b in zip(one["layers"], q_split["layers"]) for k in model.LINEAR_NAMES)
    out["split_rest"] = [has_split_weights(split, mesh), has_split_weights(q_split, mesh),
                         q_split["embed_tokens"].sharding.is_fully_replicated]
    out["split_ppl"] = [perplexity(params, cfg, windows), perplexity(split, cfg, windows, mesh=mesh)]
    tok = shard_samples(tokens, mesh)[0]
    arg_bytes = lambda p: probe_terms.lower({k: v for k, v in p.items() if k != "layers"}, p["layers"], tok,
                                            cfg=cfg).compile().memory_analysis().argument_size_in_bytes
    out["arg_bytes"] = [arg_bytes(replicate(params, mesh)), arg_bytes(split)]
    with tempfile.TemporaryDirectory() as d:
        convert.save_hf(d + "/hf", params, cfg)
        convert.save_checkpoint(d + "/ckpt", params, cfg)
        loaded = [convert.load(d + "/hf", mesh=mesh)[1], convert.load(d + "/ckpt", mesh=mesh)[1]]
    out["load"] = [[specs(p) == out["split_specs"],
                    max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in
                        zip(jax.tree.leaves(p), jax.tree.leaves(params)))] for p in loaded]
    from mixjax.evaluate import evaluate_model  # the embedded model, its float weights split over the devices
    out["eval_split"] = [evaluate_model(seq_len=64, max_tokens=256, devices=d, shard_weights=d > 1)["perplexity"]
                         for d in (1, 3)]
    from mixjax import assets, data as data_lib  # and those split weights cut again by heads (tensor parallel)
    from mixjax.parallel import model_mesh, shard_model
    path = assets.resolve_model_path(None)
    ecfg, eparams = convert.load(path, mesh=mesh)
    ewindows = data_lib.eval_windows(convert.load_tokenizer(path), "wikipedia", 64, 256)
    out["tp_from_fsdp"] = perplexity(shard_model(eparams, ecfg, model_mesh()), ecfg, ewindows, mesh=model_mesh())
    from mixjax.generate import generate
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, cfg.vocab_size, n).tolist() for n in (3, 9, 5, 12, 7)]  # five rows, three devices
    kw = dict(max_new_tokens=6, eos_token_ids=(7,))  # rows stop at different steps
    out["generate"] = [
        generate(params, cfg, prompts, **kw) == generate(params, cfg, prompts, mesh=mesh, **kw),
        generate(params, cfg, prompts, temperature=1.3, seed=4, **kw)
        == generate(params, cfg, prompts, temperature=1.3, seed=4, mesh=mesh, **kw),
        generate(params, cfg, prompts, prefill_params=one, switch_after=2, **kw)
        == generate(params, cfg, prompts, prefill_params=one, switch_after=2, mesh=mesh, **kw),
        generate(params, cfg, prompts, **kw) == generate(params, cfg, prompts, mesh=mesh, sync_every=4, **kw),  # chunks
    ]
    from mixjax.generate import generate_text  # the embedded SmolLM2: 9 heads and 3 KV heads, 3 a device
    stats = []  # with `--stats`: one device streams (a time to the first token), three do not
    out["text"] = [generate_text(prompt="The capital of France is", max_new_tokens=6, tensor_parallel=n,
                                 on_stats=stats.append) for n in (1, 3)]
    out["first_token_timed"] = [[s.first_token_seconds is not None, s.new_tokens] for s in stats]
    print("RESULT", json.dumps(out))
""")


def test_three_devices_give_one_devices_salience_and_weights():
    out = _run_on_cpu_devices(THREE_DEVICES, 3)
    assert out["devices"] == 3
    # four samples over three devices: padded to six, split over all three, the two copies masked out
    assert out["shard"] == [3, [6, 16], [1, 1, 1, 1, 0, 0], 4]
    assert out["fisher"] < 1e-5 and out["hvp"] < 1e-5  # summation order only
    # the same codes up to rounding ties: H = 2·XᵀX without the padding samples (counting them moves 22–39 % of
    # a linear's codes). A 2-core host gives identical codes; the H200's 16-core host moved a few by one step
    # (summation order in H through GPTQ's rounding)
    assert out["weights"] < 0.05
    # seven windows in batches of four (six over three devices): float and quantized model, the same perplexity
    for single, split in out["ppl"]:
        assert split == pytest.approx(single, rel=1e-5)
    assert out["phased"] < 1e-4  # per-position NLL through the KV cache, two models (`ablate progressive`)
    # FSDP: decoder matrices split along K (gate [L, 80, 48]) or, where 3 does not divide K, along N (down
    # [L, 48, 80]); norms replicated; the embedding along D (61 rows). The same salience, codes and perplexity,
    # and each device holds about a third of the weights in the salience pass
    assert out["split_specs"] == ["(None, None, 'data')", "(None, 'data', None)", "(None, None)", "(None, 'data')"]
    assert out["indivisible_spec"] == "(None, None, None)"  # neither matrix dimension divisible: replicated
    assert out["split_fisher"] < 1e-5 and out["split_weights"] < 0.05
    assert out["split_rest"] == [True, False, True]  # the quantized model's embedding gathered, its codes per device
    assert out["split_ppl"][1] == pytest.approx(out["split_ppl"][0], rel=1e-5)
    replicated, split = out["arg_bytes"]
    assert split < 0.45 * replicated, out["arg_bytes"]
    assert out["eval_split"][1] == pytest.approx(out["eval_split"][0], rel=1e-5)  # `mixjax eval --shard-weights`
    assert out["tp_from_fsdp"] == pytest.approx(out["eval_split"][0], rel=1e-5)
    # a Hugging Face directory and a float checkpoint, each read straight into the same slices
    assert [ok for ok, _ in out["load"]] == [True, True] and max(err for _, err in out["load"]) == 0.0
    # generation with the rows split: greedy, sampled (a key a row), and progressive, the same tokens
    assert out["generate"] == [True, True, True, True]
    # `generate --tensor-parallel 3` on the embedded model: the same greedy text as one device
    single, split = out["text"]
    assert split == single and "Paris" in single
    (one, one_new), (three, three_new) = out["first_token_timed"]
    assert one and not three and one_new == three_new > 0


TWO_DEVICES_TENSOR_PARALLEL = textwrap.dedent("""
    import json
    import jax, jax.numpy as jnp, numpy as np
    from mixjax import model
    from mixjax.config import LlamaConfig
    from mixjax.evaluate import perplexity
    from mixjax.generate import generate
    from mixjax.parallel import model_mesh, shard_model
    from mixjax.quant import quantize

    cfg = LlamaConfig(vocab_size=61, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=64, rope_theta=10000.0)
    params = jax.tree.map(lambda a: a * 6.0 if a.ndim == 3 else a, model.init_params(cfg, jax.random.PRNGKey(0), jnp.float32))
    tokens = np.asarray(jax.random.randint(jax.random.PRNGKey(1), (4, 16), 0, cfg.vocab_size), np.int32)
    quantized = quantize(params, [tokens], cfg)
    mesh = model_mesh()
    out = {"devices": mesh.size}
    split = {"float": shard_model(params, cfg, mesh), "quantized": shard_model(quantized, cfg, mesh)}
    qkv = split["quantized"]["layers"][0]["self_attn"]["qkv_proj"]["weight"]
    down = split["quantized"]["layers"][0]["mlp"]["down_proj"]["weight"]
    out["layout"] = [type(qkv).__name__, int(qkv.q8.shape[0]), len(qkv.q8.sharding.device_set), qkv.n,
                     type(down).__name__, down.w.k]
    windows = np.asarray(jax.random.randint(jax.random.PRNGKey(2), (3, 16), 0, cfg.vocab_size), np.int32)
    whole = {"float": params, "quantized": quantized}
    from mixjax.quant import QuantConfig
    from mixjax.quant.activations import ActFormat
    whole["static"] = quantize(params, [tokens], cfg, config=QuantConfig(act=ActFormat(static=True), gptq=False))
    split["static"] = shard_model(whole["static"], cfg, mesh)
    out["static_down"] = type(split["static"]["layers"][0]["mlp"]["down_proj"]["weight"].w).__name__
    out["ppl"] = {k: [perplexity(whole[k], cfg, windows), perplexity(split[k], cfg, windows, mesh=mesh)]
                  for k in whole}
    from mixjax.parallel import data_mesh, shard_weights  # FSDP-split float weights, cut again by heads
    out["ppl_from_fsdp"] = perplexity(shard_model(shard_weights(params, data_mesh()), cfg, mesh), cfg, windows,
                                      mesh=mesh)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, cfg.vocab_size, n).tolist() for n in (3, 9, 5)]
    kw = dict(max_new_tokens=6, eos_token_ids=(7,))
    out["generate"] = [
        generate(quantized, cfg, prompts, **kw) == generate(split["quantized"], cfg, prompts, mesh=mesh, **kw),
        generate(quantized, cfg, prompts, temperature=1.2, seed=3, **kw)
        == generate(split["quantized"], cfg, prompts, temperature=1.2, seed=3, mesh=mesh, **kw),
        generate(quantized, cfg, prompts, prefill_params=params, switch_after=2, **kw)
        == generate(split["quantized"], cfg, prompts, prefill_params=split["float"], switch_after=2, mesh=mesh, **kw),
        generate(params, cfg, prompts, cache_dtype=jnp.int8, **kw)
        == generate(split["float"], cfg, prompts, cache_dtype=jnp.int8, mesh=mesh, **kw),
        generate(quantized, cfg, prompts, **kw) == generate(split["quantized"], cfg, prompts, mesh=mesh, sync_every=4,
                                                            **kw),  # decoding in chunks of 4 steps
    ]
    print("RESULT", json.dumps(out))
""")


def test_two_devices_tensor_parallel_give_one_devices_perplexity_and_tokens():
    out = _run_on_cpu_devices(TWO_DEVICES_TENSOR_PARALLEL, 2)
    assert out["devices"] == 2
    # each device: its heads of q/k/v fused (8-bit rows padded to 128), the layer's leaves on both devices; and
    # down_proj's half of the MLP features behind the psum
    assert out["layout"][0] == "MixedWeight" and out["layout"][2] == 2 and out["layout"][3] == (4 + 2 + 2) * 64 // 2
    assert out["layout"][4:] == ["RowParallel", 256]
    assert out["static_down"] == "StaticMixedWeight"  # static scales: each device its groups' maxima
    assert set(out["ppl"]) == {"float", "quantized", "static"}
    for single, split in out["ppl"].values():
        assert split == pytest.approx(single, rel=1e-5)
    assert out["ppl_from_fsdp"] == pytest.approx(out["ppl"]["float"][0], rel=1e-5)
    # greedy, sampled, progressive (float prompt, quantized decode) and an int8 cache: the same tokens
    assert out["generate"] == [True, True, True, True, True]


GEMMA3_TENSOR_PARALLEL = textwrap.dedent("""
    import json, jax, jax.numpy as jnp, numpy as np
    from mixjax import model
    from mixjax.config import LlamaConfig
    from mixjax.evaluate import perplexity
    from mixjax.generate import generate
    from mixjax.parallel import model_mesh, shard_model
    from mixjax.quant import quantize

    cfg = LlamaConfig(vocab_size=61, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=64, rope_theta=1e6, model_type="gemma3_text", qk_norm=True,
                      mlp_act="gelu_tanh", embed_scale=16.0, sandwich_norms=True, sliding_window=5, global_layers=(1,),
                      rope_local_theta=1e4, tie_word_embeddings=True, final_logit_softcap=5.0)
    params = jax.tree.map(lambda a: a * 6.0 if a.ndim == 3 else a, model.init_params(cfg, jax.random.PRNGKey(0), jnp.float32))
    rng = np.random.default_rng(0)
    params["layers"] = {k: jnp.asarray(rng.uniform(0.5, 2, v.shape), jnp.float32) if "norm" in k else v
                        for k, v in params["layers"].items()}
    tokens = np.asarray(jax.random.randint(jax.random.PRNGKey(1), (4, 16), 0, cfg.vocab_size), np.int32)
    quantized = quantize(params, [tokens], cfg)
    mesh = model_mesh()
    windows = np.asarray(jax.random.randint(jax.random.PRNGKey(2), (3, 16), 0, cfg.vocab_size), np.int32)
    out = {name: [perplexity(p, cfg, windows), perplexity(shard_model(p, cfg, mesh), cfg, windows, mesh=mesh)]
           for name, p in (("float", params), ("quantized", quantized))}
    prompts = [rng.integers(0, cfg.vocab_size, n).tolist() for n in (3, 9, 5)]
    kw = dict(max_new_tokens=8, eos_token_ids=())
    out["generate"] = generate(quantized, cfg, prompts, **kw) == generate(shard_model(quantized, cfg, mesh), cfg,
                                                                         prompts, mesh=mesh, sync_every=3, **kw)
    print("RESULT", json.dumps(out))
""")


def test_two_devices_tensor_parallel_run_gemma3():
    """Gemma 3 split by heads over two devices (the sandwich norms after o_proj's and down_proj's psum, a window on
    layer 0): the float and quantized perplexities and the greedy tokens of one device."""
    out = _run_on_cpu_devices(GEMMA3_TENSOR_PARALLEL, 2)
    for name in ("float", "quantized"):
        single, split = out[name]
        assert split == pytest.approx(single, rel=1e-5)
    assert out["generate"] is True


def _run_on_cpu_devices(script: str, devices: int) -> dict:
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip()
    env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                         timeout=600, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.split("RESULT ", 1)[1])


def test_split_mixed_weights_hold_the_same_values():
    from pallas_kernels import pack_rtn
    from pallas_kernels.format import pack_mixed
    from pallas_kernels.shard import channel_codes, split_channels, split_groups

    rng = np.random.default_rng(5)
    w = rng.normal(size=(384, 512)).astype(np.float32)
    qw = pack_rtn(w, rng.random(384) < 0.15)
    back = pack_mixed(*channel_codes(qw), k=512)  # channel_codes inverts pack_mixed
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(qw), jax.tree.leaves(back)))
    full = np.asarray(qw.dequantize())
    rows = split_channels(qw, 3)
    # equal 8-bit counts (4-bit channels re-stored as 8-bit rows where a part had fewer), the same values
    assert len({(p.n8, p.q8.shape, p.q4.shape) for p in rows}) == 1 and rows[0].n8 >= qw.n8 / 3
    np.testing.assert_array_equal(np.concatenate([np.asarray(p.dequantize()) for p in rows]), full)
    groups = split_groups(qw, 4)
    np.testing.assert_array_equal(np.concatenate([np.asarray(p.dequantize()) for p in groups], axis=1), full)
    x = jnp.asarray(rng.normal(size=(3, 512)).astype(np.float32))
    parts = sum(p.matmul(x[:, 128 * d : 128 * (d + 1)], implementation="xla").astype(jnp.float32)
                for d, p in enumerate(groups))
    np.testing.assert_allclose(parts, qw.matmul(x, implementation="xla"), rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="do not divide"):
        split_channels(qw, 5)
    with pytest.raises(ValueError, match="whole groups"):
        split_groups(qw, 3)
    with pytest.raises(ValueError, match="whole groups"):
        split_groups(pack_rtn(w[:, :500], np.zeros(384, bool)), 2)  # K padded to 512


def test_shard_model_refuses_what_it_cannot_split():
    from mixjax import model
    from mixjax.config import LlamaConfig
    from mixjax.parallel import model_mesh, shard_model

    cfg = LlamaConfig(vocab_size=61, hidden_size=48, intermediate_size=80, num_hidden_layers=1,
                      num_attention_heads=3, num_key_value_heads=1, head_dim=16, rope_theta=10000.0)
    params = model.init_params(cfg, jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="one-axis mesh named 'model'"):
        shard_model(params, cfg, data_mesh(1))
    with pytest.raises(ValueError, match="unfused params"):
        shard_model(model.fuse_projections(params), cfg, model_mesh(1))
    from mixjax.parallel import check_tensor_parallel
    with pytest.raises(ValueError, match="num_attention_heads=3"):
        check_tensor_parallel(cfg, 2)
    # split params and meshes go together: each without the other is named before any work
    from mixjax.evaluate import perplexity
    from mixjax.generate import generate

    mesh = model_mesh(1)
    sharded = shard_model(params, cfg, mesh)
    windows = np.zeros((1, 8), np.int32)
    with pytest.raises(ValueError, match="pass mesh= the 'model' mesh"):
        generate(sharded, cfg, [[1, 2]], max_new_tokens=2)
    with pytest.raises(ValueError, match="pass mesh= the 'model' mesh"):
        perplexity(sharded, cfg, windows)
    with pytest.raises(ValueError, match=r"not split over this 1-device 'model' mesh"):
        perplexity(params, cfg, windows, mesh=mesh)
    with pytest.raises(ValueError, match="prefill_params are not split"):
        generate(sharded, cfg, [[1, 2]], max_new_tokens=2, mesh=mesh, prefill_params=params)


def test_one_device_mesh_is_the_plain_path():
    from mixjax import model
    from mixjax.config import LlamaConfig

    cfg = LlamaConfig(vocab_size=61, hidden_size=48, intermediate_size=80, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=12, rope_theta=10000.0)
    params = model.init_params(cfg, jax.random.PRNGKey(0))
    tokens = np.asarray(jax.random.randint(jax.random.PRNGKey(1), (3, 8), 0, cfg.vocab_size), np.int32)
    plain = salience(params, [tokens], cfg)
    meshed = salience(params, [tokens], cfg, mesh=data_mesh(1))
    for k in plain:
        np.testing.assert_allclose(meshed[k], plain[k], rtol=1e-6)
    t, mask, n = shard_samples(tokens, None)
    assert mask is None and n == 3 and t.shape == (3, 8)


def test_bad_meshes_and_device_counts_are_refused():
    n = len(jax.local_devices())
    with pytest.raises(ValueError, match=f"ask for 1..{n}"):
        data_mesh(n + 1)
    with pytest.raises(ValueError, match="ask for"):
        data_mesh(0)
    with pytest.raises(ValueError, match="names no device"):
        data_mesh([])
    wrong_axis = Mesh(np.array(jax.local_devices()[:1]), ("model",))
    with pytest.raises(ValueError, match="named 'data'"):
        salience({}, [np.zeros((1, 4), np.int32)], None, mesh=wrong_axis)
    with pytest.raises(TypeError, match="jax.sharding.Mesh"):
        salience({}, [np.zeros((1, 4), np.int32)], None, mesh="gpu:0,1")
    from mixjax.parallel import shard_weights

    params = {"embed_tokens": jnp.zeros((8, 4)), "layers": {"w": jnp.zeros((2, 4, 4))}}
    with pytest.raises(ValueError, match="named 'data'"):
        shard_weights(params, wrong_axis)
    with pytest.raises(ValueError, match="float params"):  # quantized codes: shard_model is their split
        shard_weights({**params, "layers": {"q": jnp.zeros((2, 4, 4), jnp.int8)}}, data_mesh(1))
    assert shard_weights(params, None) is params


@pytest.mark.parametrize("value", ["0", "two", str(len(jax.local_devices()) + 1)])
def test_clis_refuse_bad_device_counts(value, tmp_path, capsys):
    out = tmp_path / "q"
    assert cli.main(["quantize", "--out", str(out), "--devices", value]) == 2
    err = capsys.readouterr().err
    assert "--devices" in err or "local device" in err
    assert not out.exists()
    assert cli.main(["eval", "--devices", value]) == 2
    err = capsys.readouterr().err
    assert "--devices" in err or "local device" in err
    assert cli.main(["generate", "--prompt", "hi", "--tensor-parallel", value]) == 2
    err = capsys.readouterr().err
    assert "--tensor-parallel" in err or "local device" in err


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="the Pallas kernels under shard_map need an NVIDIA GPU")
def test_pallas_kernels_run_under_shard_map_on_a_gpu():
    """The kernels' custom calls inside `shard_map` (what several GPUs run), on a one-GPU mesh: the same
    perplexity as the plain jitted call, data parallel and tensor parallel (o_proj and down_proj behind
    `RowParallel`'s psum, off the fused kernels' paths), and tensor-parallel generation the same tokens."""
    from helpers import tiny_mixed_model

    from mixjax import model
    from mixjax.evaluate import perplexity
    from mixjax.generate import generate
    from mixjax.parallel import model_mesh, shard_model

    cfg, params = tiny_mixed_model(11, np.random.default_rng(11), fuse=False)
    fused = model.fuse_projections(params)
    windows = np.asarray(jax.random.randint(jax.random.PRNGKey(3), (3, 64), 0, cfg.vocab_size), np.int32)
    plain = perplexity(fused, cfg, windows, batch_size=2, implementation="pallas")
    split = perplexity(fused, cfg, windows, batch_size=2, implementation="pallas", mesh=data_mesh(1))
    assert split == pytest.approx(plain, rel=1e-5)
    mesh = model_mesh(1)
    tp = shard_model(params, cfg, mesh)
    assert perplexity(tp, cfg, windows, batch_size=2, implementation="pallas", mesh=mesh) == pytest.approx(plain, rel=2e-3)
    prompts = [list(range(1, 9)), list(range(3, 40))]
    got = np.array(generate(tp, cfg, prompts, max_new_tokens=8, eos_token_ids=(), mesh=mesh))
    want = np.array(generate(fused, cfg, prompts, max_new_tokens=8, eos_token_ids=()))
    assert np.mean(got == want) >= 0.8  # other kernels after o_proj (f32 psum, no fused partials): rare flips
