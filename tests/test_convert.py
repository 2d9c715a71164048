"""convert.load: Hugging Face directories and GGUF files against transformers; Orbax; bad input."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import convert
from mixjax.config import ConfigError, LlamaConfig
from mixjax.model import forward

HF_RTOL = 1e-4  # f32 on both sides: only summation order differs


def _hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(tokens).long()).logits.float().numpy()


def _rel_err(ours, ref) -> float:
    return float(np.max(np.abs(np.asarray(ours) - ref)) / np.max(np.abs(ref)))


def _tokens(rng, vocab, shape=(2, 11)):
    return rng.integers(0, vocab, size=shape).astype(np.int32)


LLAMA3_ROPE = dict(
    rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
    original_max_position_embeddings=8,
)

GRANITE = dict(tie_word_embeddings=True, embedding_multiplier=3.0, logits_scaling=2.5, residual_multiplier=0.4,
               attention_multiplier=0.1)

# Gemma 3: layer 1 global (no window, RoPE base 1e6 with linear scaling), layers 0, 2, 3 a window of 4 with base 1e4;
# sandwich norms, q/k head norms, GeGLU, embeddings × √D, tied head; soft-capped logits
GEMMA3 = dict(head_dim=32, query_pre_attn_scalar=32, num_hidden_layers=4, sliding_window=4,
              layer_types=["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"],
              rope_scaling={"rope_type": "linear", "factor": 4.0}, final_logit_softcapping=3.0)
# Gemma 2: windows on every other layer, soft-capped attention scores (a cap low enough to bite) and logits, an
# attention scale of its own (gemma-2-27b's kind), no head norms
GEMMA2 = dict(head_dim=32, query_pre_attn_scalar=24, num_hidden_layers=4, sliding_window=4, attn_logit_softcapping=2.0,
              final_logit_softcapping=3.0)

HF_CASES = {
    "llama_gqa_untied": ("llama", {}, {}),
    "llama3_rope_tied": ("llama", dict(tie_word_embeddings=True, rope_parameters=LLAMA3_ROPE), {}),
    "qwen2_bias_tied": ("qwen2", dict(tie_word_embeddings=True), {}),
    "qwen3_head_dim_tied": ("qwen3", dict(tie_word_embeddings=True, head_dim=32), {}),  # q/k head norms; H·Dh > D
    "smollm3_nope_tied": ("smollm3", dict(num_hidden_layers=4), {}),  # layer 3 without RoPE
    "phi3_fused_window": ("phi3", dict(sliding_window=4), {}),  # q/k/v and gate/up stored fused
    "granite_multipliers_tied": ("granite", GRANITE, {}),  # its four scalars folded into the weights
    "gemma_geglu_tied": ("gemma", dict(head_dim=32), {}),  # (1 + w) norms folded on load, embeddings × √D, GeGLU
    "gemma3_windows_sandwich": ("gemma3_text", GEMMA3, {}),
    "gemma2_softcaps": ("gemma2", GEMMA2, {}),
    "gemma3_query_scalar": ("gemma3_text", {**GEMMA3, "query_pre_attn_scalar": 48}, {}),  # (gemma-3-27b's kind)
    "mistral_window_sharded": ("mistral", dict(sliding_window=4), dict(max_shard_size="40KB")),
    "llama_bin": ("llama", dict(num_key_value_heads=1), dict(bin=True)),
}


@pytest.mark.parametrize("case", list(HF_CASES))
def test_hf_logits_match_transformers(case, make_tiny_hf):
    arch, overrides, save_kwargs = HF_CASES[case]
    directory, model = make_tiny_hf(arch, save_kwargs=save_kwargs, **overrides)
    if "max_shard_size" in save_kwargs:
        assert len(list(directory.glob("*.safetensors"))) > 1
    if save_kwargs.get("bin"):
        assert list(directory.glob("pytorch_model*.bin")) and not list(directory.glob("*.safetensors"))
    cfg, params = convert.load(directory)
    tokens = _tokens(np.random.default_rng(0), cfg.vocab_size)
    ours = forward(params, tokens, cfg, implementation="xla")
    assert ours.dtype == np.float32 and ours.shape == (*tokens.shape, cfg.vocab_size)
    assert _rel_err(ours, _hf_logits(model, tokens)) < HF_RTOL


def test_gemma3_image_text_checkpoint_loads_its_language_model(tmp_path):
    """gemma-3-4b/12b ship as Gemma3ForConditionalGeneration: the language model's config sits in `text_config` (the
    fields left at transformers' defaults filled in) and its tensors under `language_model.`; the vision tower and
    projector are skipped. Text-only logits equal transformers' image-text model's."""
    import transformers

    text = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, head_dim=32, query_pre_attn_scalar=32, sliding_window=4, sliding_window_pattern=2,
                rope_scaling={"rope_type": "linear", "factor": 4.0})
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)
    config = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                       image_token_index=127, boi_token_index=125, eoi_token_index=126)
    torch.manual_seed(0)
    model = transformers.Gemma3ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(tmp_path)
    cfg, params = convert.load(tmp_path)
    assert cfg.model_type == "gemma3_text" and cfg.global_layers == (1,) and cfg.max_position_embeddings == 131072
    tokens = _tokens(np.random.default_rng(5), 120)  # (below the image tokens' ids)
    assert _rel_err(forward(params, tokens, cfg, implementation="xla"), _hf_logits(model, tokens)) < HF_RTOL


def test_hf_load_bf16(make_tiny_hf):
    """dtype=bf16 rounds each f32 weight to the nearest bf16."""
    directory, model = make_tiny_hf("llama")
    cfg, params = convert.load(directory, dtype=jnp.bfloat16)
    assert {a.dtype for a in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    w = np.asarray(params["layers"]["self_attn"]["k_proj"]["weight"][1], np.float32)
    ref = model.state_dict()["model.layers.1.self_attn.k_proj.weight"].numpy()
    assert np.array_equal(w, ref.astype(jnp.bfloat16).astype(np.float32))
    assert forward(params, _tokens(np.random.default_rng(2), cfg.vocab_size), cfg).dtype == jnp.float32


# ----------------------------------------------------------------------------------------------------
# GGUF


def _permute_like_llama_cpp(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf row interleave of q/k (the inverse of what convert undoes)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _llama_cpp_rope_factors(c) -> np.ndarray:
    """llama.cpp's per-frequency divisors for Llama-3 RoPE scaling (its convert_hf_to_gguf rule)."""
    r = c.rope_parameters
    dim = c.head_dim
    freqs = 1.0 / (r["rope_theta"] ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    low_wavelen = r["original_max_position_embeddings"] / r["low_freq_factor"]
    high_wavelen = r["original_max_position_embeddings"] / r["high_freq_factor"]
    factors = []
    for freq in freqs:
        wavelen = 2 * np.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(r["factor"])
        else:
            smooth = (r["original_max_position_embeddings"] / wavelen - r["low_freq_factor"]) / (
                r["high_freq_factor"] - r["low_freq_factor"])
            factors.append(1 / ((1 - smooth) / r["factor"] + smooth))
    return np.asarray(factors, np.float32)


def write_tiny_gguf(path, model, arch="llama", *, drop=(), linear_type="F32", rope_dims=None, extra_tensors=()):
    """Writes a tiny HF model as a GGUF file the way llama.cpp lays it out; decoder linears stored as
    `linear_type` (a GGMLQuantizationType name), everything else F32. rope_dims: a `rope.dimension_count` to record;
    extra_tensors: (name, array) pairs written too."""
    import gguf

    from convert.layout import NAME_TABLE, gemma_hf_name, is_norm_name

    c = model.config
    gemma = arch in ("gemma2", "gemma3")  # norms stored as 1 + w, Hugging Face's Gemma 2/3 norm names
    rope = c.rope_parameters["full_attention"] if arch == "gemma3" else c.rope_parameters  # (the global layers')
    hf_to_gguf = {}
    for _, hf_name, gguf_name in NAME_TABLE:
        for i in range(c.num_hidden_layers) if "{i}" in hf_name else [None]:
            hf_to_gguf[hf_name.format(i=i)] = gguf_name.format(i=i)
    for i in range(c.num_hidden_layers):  # llama.cpp's phi3: q/k/v in attn_qkv, gate and up in ffn_up
        hf_to_gguf[f"model.layers.{i}.self_attn.qkv_proj.weight"] = f"blk.{i}.attn_qkv.weight"
        hf_to_gguf[f"model.layers.{i}.mlp.gate_up_proj.weight"] = f"blk.{i}.ffn_up.weight"
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_rope_freq_base(rope["rope_theta"])
    if arch == "gemma2":
        writer.add_attn_logit_softcapping(c.attn_logit_softcapping)
        writer.add_final_logit_softcapping(c.final_logit_softcapping)
    if gemma and rope.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    writer.add_vocab_size(c.vocab_size)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    if head_dim * c.num_attention_heads != c.hidden_size:  # as llama.cpp's converter records it
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if getattr(c, "sliding_window", None):
        writer.add_sliding_window(c.sliding_window)
    if rope_dims is not None:
        writer.add_rope_dimension_count(rope_dims)
    for name, array in extra_tensors:
        writer.add_tensor(name, array)
    if c.rope_parameters.get("rope_type") == "llama3":
        writer.add_rope_scaling_orig_ctx_len(c.rope_parameters["original_max_position_embeddings"])
        writer.add_tensor("rope_freqs.weight", _llama_cpp_rope_factors(c))
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        gguf_name = hf_to_gguf[gemma_hf_name(name) if gemma else name]
        if gguf_name in drop:
            continue
        w = tensor.float().numpy() + (1.0 if gemma and is_norm_name(name) else 0.0)
        if arch in ("llama", "smollm3") and ".attn_q." in gguf_name:
            w = _permute_like_llama_cpp(w, c.num_attention_heads)
        elif arch in ("llama", "smollm3") and ".attn_k." in gguf_name:
            w = _permute_like_llama_cpp(w, c.num_key_value_heads)
        if linear_type != "F32" and w.ndim == 2 and gguf_name.startswith("blk."):
            qtype = gguf.GGMLQuantizationType[linear_type]
            q = gguf.quants.quantize(w, qtype)
            writer.add_tensor(gguf_name, q, raw_shape=q.shape, raw_dtype=qtype)
        else:
            writer.add_tensor(gguf_name, w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "smollm3", "phi3", "llama3", "gemma3", "gemma2"])
def test_gguf_logits_match_transformers(arch, make_tiny_hf, tmp_path):
    """GGUF name mapping, tied-embedding detection, llama's q/k un-permutation, qwen2's biases, qwen3's head norms
    and key length, smollm3's NoPE layers (llama.cpp's every fourth), and Llama-3 RoPE scaling recovered from
    llama.cpp's rope_freqs; gemma3's norms stored as 1 + w, its sliding window and every sixth layer global (the
    file written here in that layout: transformers' own GGUF loader computes the model's logits from it, at the
    head width where its default attention scale is the model's)."""
    extra = {"llama3": dict(rope_parameters=LLAMA3_ROPE), "qwen3": dict(head_dim=32),
             "smollm3": dict(num_hidden_layers=8), "phi3": dict(sliding_window=4),
             "gemma3": dict(head_dim=256, query_pre_attn_scalar=256, num_hidden_layers=7, sliding_window=4),
             # (transformers' GGUF loader holds Gemma 2's default soft caps, 50 and 30)
             "gemma2": dict(head_dim=256, query_pre_attn_scalar=256, num_hidden_layers=3, sliding_window=4)}.get(arch, {})
    arch = arch.replace("llama3", "llama")
    tied = arch in ("llama", "smollm3", "gemma3", "gemma2")
    _, model = make_tiny_hf(arch.replace("gemma3", "gemma3_text"), tie_word_embeddings=tied, **extra)
    path = write_tiny_gguf(tmp_path / "tiny.gguf", model, arch)
    cfg, params = convert.load(path)
    assert cfg.model_type == arch.replace("gemma3", "gemma3_text") and cfg.tie_word_embeddings == tied
    assert cfg.attention_bias == (arch == "qwen2") and ("lm_head" in params) == (not tied)
    assert cfg.qk_norm == (arch in ("qwen3", "gemma3")) and cfg.head_dim == extra.get("head_dim", 16)
    assert cfg.attn_logit_softcap == (50.0 if arch == "gemma2" else None)
    assert cfg.nope_layers == ((3, 7) if arch == "smollm3" else ())
    assert cfg.sliding_window == (4 if arch in ("phi3", "gemma3", "gemma2") else None)  # phi3: q/k/v, gate/up split
    assert cfg.global_layers == {"gemma3": (5,), "gemma2": (1,)}.get(arch, ())
    assert (cfg.rope_scaling is not None) == ("rope_parameters" in extra)
    tokens = _tokens(np.random.default_rng(1), cfg.vocab_size)
    ours = forward(params, tokens, cfg, implementation="xla")
    want = _hf_logits(model, tokens)
    assert _rel_err(ours, want) < HF_RTOL
    if arch in ("gemma3", "gemma2"):
        import transformers

        theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf", dtype=torch.float32)
        assert _rel_err(_hf_logits(theirs.eval(), tokens), want) < HF_RTOL


def test_gguf_q8_0_dequantized(make_tiny_hf, tmp_path):
    """Q8_0 linears dequantize to within half an int8 step of each block of 32 (+ f16 rounding of the scale)."""
    _, model = make_tiny_hf("llama")
    cfg, params = convert.load(write_tiny_gguf(tmp_path / "q8.gguf", model, linear_type="Q8_0"))
    w = params["layers"]["mlp"]["up_proj"]["weight"][1]
    ref = model.state_dict()["model.layers.1.mlp.up_proj.weight"].numpy()
    step = np.abs(ref).reshape(ref.shape[0], -1, 32).max(-1, keepdims=True) / 127  # Q8_0: blocks of 32
    assert np.all(np.abs(np.asarray(w) - ref).reshape(step.shape[0], -1, 32) <= step * 0.6)


@pytest.mark.parametrize("linear_type", ["F16", "Q4_1", "Q8_0"])
def test_gguf_quant_types_land_in_place(make_tiny_hf, tmp_path, linear_type):
    """Each stored type reaches its params slot as gguf's own dequantization of it, un-permuted for q/k."""
    import gguf

    _, model = make_tiny_hf("llama")
    _, params = convert.load(write_tiny_gguf(tmp_path / "t.gguf", model, linear_type=linear_type))
    qtype = gguf.GGMLQuantizationType[linear_type]
    state = model.state_dict()
    for hf_name, ours in [
        ("model.layers.1.mlp.down_proj.weight", params["layers"]["mlp"]["down_proj"]["weight"][1]),
        ("model.layers.0.self_attn.k_proj.weight", params["layers"]["self_attn"]["k_proj"]["weight"][0]),
    ]:
        w = state[hf_name].numpy()
        heads = model.config.num_key_value_heads
        stored = w if "k_proj" not in hf_name else _permute_like_llama_cpp(w, heads)
        ref = gguf.quants.dequantize(gguf.quants.quantize(stored, qtype), qtype).reshape(w.shape)
        if "k_proj" in hf_name:
            from convert.gguf import _unpermute_rows

            ref = _unpermute_rows(ref, heads)
        np.testing.assert_array_equal(np.asarray(ours), ref)


def test_hf_bf16_checkpoint_loads_exactly(make_tiny_hf, tmp_path):
    """Real checkpoints are usually bf16 safetensors: they widen to f32 exactly."""
    from safetensors.numpy import load_file

    _, model = make_tiny_hf("llama")
    model.to(torch.bfloat16).save_pretrained(tmp_path)
    _, params = convert.load(tmp_path)
    stored = load_file(tmp_path / "model.safetensors")["model.layers.1.mlp.gate_proj.weight"]
    assert str(stored.dtype) == "bfloat16"
    np.testing.assert_array_equal(np.asarray(params["layers"]["mlp"]["gate_proj"]["weight"][1]), stored.astype(np.float32))


@pytest.mark.slow
def test_embedded_smollm2_matches_transformers(embedded_mixjax, embedded_hf_model):
    """Both sides dequantize the same Q4_1/Q8_0 file to f32 and run f32 maths, so only summation order
    differs: measured 4.5e-6 relative max-abs over 30 layers; 1e-4 leaves 20x margin yet catches any
    layout error (leaving q/k in GGML's interleaved order measured 0.78)."""
    cfg, params, tokenizer = embedded_mixjax
    model = embedded_hf_model
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 576, 9, 3)
    assert cfg.tie_word_embeddings and cfg.vocab_size == 49152
    text = "The quick brown fox jumps over the lazy dog near the river bank."
    tokens = np.asarray(tokenizer(text)["input_ids"], np.int32)[None]
    assert tokens.shape[1] > 8
    ours = forward(params, tokens, cfg, implementation="xla")
    ref = _hf_logits(model, tokens)
    assert _rel_err(ours, ref) < HF_RTOL
    assert np.array_equal(np.argmax(ours, -1), np.argmax(ref, -1))


def test_embedded_smollm2_exports_to_hugging_face(embedded_mixjax, embedded_hf_model, tmp_path):
    """The real model, GGUF → mixjax → `convert.save_hf` (bf16, its tokenizer): transformers runs the written
    directory with the logits of transformers' own GGUF load (bf16 weights: within their rounding, the same
    greedy tokens), and the written tokenizer encodes as the GGUF's does."""
    import transformers

    cfg, params, tokenizer = embedded_mixjax
    out = convert.save_hf(tmp_path / "smollm2", params, cfg, dtype=jnp.bfloat16, tokenizer=tokenizer)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    exported = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    text = "The capital of France is Paris, and the capital of Italy is"
    tokens = np.asarray(tokenizer(text)["input_ids"], np.int64)[None]
    got, want = _hf_logits(exported, tokens), _hf_logits(embedded_hf_model, tokens)
    assert _rel_err(got, want) < 0.05 and np.array_equal(np.argmax(got, -1), np.argmax(want, -1))
    assert transformers.AutoTokenizer.from_pretrained(out)(text)["input_ids"] == tokenizer(text)["input_ids"]


# ----------------------------------------------------------------------------------------------------
# Orbax checkpoints


@pytest.fixture(scope="module")
def tiny_params():
    from mixjax.model import init_params

    cfg = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=8, attention_bias=True)
    return cfg, init_params(cfg, jax.random.key(3), jnp.float32)


def _same_tree(a, b) -> bool:
    return jax.tree.structure(a) == jax.tree.structure(b) and all(
        x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    )


@pytest.mark.parametrize("layers", ["stacked", "tuple"])
def test_orbax_round_trip(tiny_params, tmp_path, layers):
    from mixjax.model import unstack_layers

    cfg, params = tiny_params
    params = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
    if layers == "tuple":
        params = unstack_layers(params)
    note = tmp_path / "note.txt"
    note.write_text("hello")
    out = convert.save_checkpoint(tmp_path / "ckpt", params, cfg, extra_metadata={"source": "test"},
                                  files={"tokenizer/note.txt": note})
    assert (out / "tokenizer" / "note.txt").read_text() == "hello"
    cfg2, restored = convert.restore_checkpoint(out)
    assert cfg2 == cfg and _same_tree(restored, params)
    from convert.orbax_io import read_metadata

    meta = read_metadata(out)
    assert meta["format_version"] == 1 and meta["extra"] == {"source": "test"} and meta["layers"] == layers
    # convert.load reads checkpoints too, casting to the requested dtype.
    cfg3, as_f32 = convert.load(out, dtype=jnp.float32)
    assert cfg3 == cfg and {a.dtype for a in jax.tree.leaves(as_f32)} == {jnp.dtype(jnp.float32)}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_orbax_round_trip_quantized_tree(tiny_params, tmp_path):
    """The quantized layout (tuple layers, MixedWeight leaves) saves through the same path and restores
    against an abstract tree supplied by the caller."""
    from pallas_kernels import MixedWeight, pack_rtn

    from mixjax.model import unstack_layers

    cfg, params = tiny_params
    qparams = unstack_layers(params)
    w = np.asarray(qparams["layers"][1]["mlp"]["down_proj"]["weight"])
    is_int8 = np.arange(w.shape[0]) % 3 == 0
    qparams["layers"][1]["mlp"]["down_proj"]["weight"] = pack_rtn(w, is_int8)
    target = convert.save_checkpoint(tmp_path / "q", qparams, cfg, extra_metadata={"quant": {"bits": 4.4}})
    with pytest.raises(ValueError, match="abstract_params"):
        convert.restore_checkpoint(target)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), qparams)
    cfg2, restored = convert.restore_checkpoint(target, abstract_params=abstract)
    assert cfg2 == cfg and isinstance(restored["layers"][1]["mlp"]["down_proj"]["weight"], MixedWeight)
    assert _same_tree(restored, qparams)


def test_orbax_refuses_overwrite_and_bad_params(tiny_params, tmp_path):
    cfg, params = tiny_params
    target = convert.save_checkpoint(tmp_path / "ckpt", params, cfg)
    with pytest.raises(FileExistsError, match="force=True"):
        convert.save_checkpoint(target, params, cfg)
    as_bf16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
    convert.save_checkpoint(target, as_bf16, cfg, force=True)
    assert _same_tree(convert.restore_checkpoint(target)[1], as_bf16)
    bad = {**params, "norm": jnp.ones((3,))}
    with pytest.raises(ValueError, match=r"\['norm'\].*\(3,\).*\(16,\)"):
        convert.save_checkpoint(tmp_path / "bad", bad, cfg)
    with pytest.raises(ValueError, match="JSON"):
        convert.save_checkpoint(tmp_path / "bad", params, cfg, extra_metadata={"x": object()})
    assert not (tmp_path / "bad").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_orbax_damaged_data_file_is_named(tiny_params, tmp_path, damage):
    """A data file of the params store cut short or with a byte changed: one ConvertError naming the params folder
    and the fix (orbax raises a bare Exception for a short read; a changed byte fails the read or the digest)."""
    cfg, params = tiny_params
    target = convert.save_checkpoint(tmp_path / "ckpt", params, cfg)
    data = max((p for p in (target / "params").rglob("*") if p.is_file() and p.parent.name == "d"),
               key=lambda p: p.stat().st_size)
    raw = bytearray(data.read_bytes())
    if damage == "truncate":
        data.write_bytes(raw[: len(raw) // 2])
    else:
        raw[len(raw) // 2] ^= 0xFF
        data.write_bytes(raw)
    with pytest.raises(convert.ConvertError, match=r"params.*(cannot restore|do not match).*re-create"):
        convert.restore_checkpoint(target)


def test_orbax_damaged_checkpoint_prints_one_error(tmp_path):
    """A params store cut short, restored in a process of its own (pytest takes over `sys.unraisablehook`): the
    ConvertError, and none of the "Event loop is closed" tracebacks that orbax's other reads raise when they finish
    after the failed one (10–20 of them for this 17 MB checkpoint without the filter, hundreds for a real model)."""
    from mixjax import model

    cfg = LlamaConfig(vocab_size=4096, hidden_size=256, intermediate_size=1024, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=64)
    target = convert.save_checkpoint(tmp_path / "ckpt", model.init_params(cfg, jax.random.PRNGKey(0), jnp.float32), cfg)
    data = max((p for p in (target / "params").rglob("*") if p.is_file() and p.parent.name == "d"),
               key=lambda p: p.stat().st_size)
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    script = ("import sys, time, convert\nfor _ in range(3):\n    try:\n        convert.restore_checkpoint(sys.argv[1])\n"
              "    except convert.ConvertError as e:\n        print(e)\n    time.sleep(0.3)\n")
    run = subprocess.run([sys.executable, "-c", script, str(target)], capture_output=True, text=True, timeout=300,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert run.stdout.count("cannot restore params") == 3, run.stdout
    assert "Traceback" not in run.stderr and "never retrieved" not in run.stderr, run.stderr[-2000:]


def test_orbax_straggler_filters_drop_only_orbax_reads():
    """The three channels orbax's leftover reads print through (sys.excepthook, sys.unraisablehook, asyncio's logger)
    drop exactly those: a closed loop refusing a callback, a read coroutine's or task's read error; anything else
    still prints. (The subprocess test above sees the races; this pins what is dropped.)"""
    import asyncio
    import logging

    from convert import orbax_io

    loop = asyncio.new_event_loop()
    loop.close()
    try:
        loop.call_soon_threadsafe(print)
    except RuntimeError as e:
        refused = e
    assert orbax_io._is_straggler(refused)
    assert not orbax_io._is_straggler(RuntimeError("Event loop is closed"))  # raised by a program itself
    assert not orbax_io._is_straggler(ValueError("Encountered error while reading"))  # not from an orbax coroutine

    read_error = Exception("Encountered error while reading array index: (slice(0, 2, 1),)")
    ts_error = ValueError('OUT_OF_RANGE: Error reading "w/0.0" in OCDBT database at local file "/x/params/"')
    keep = orbax_io._StragglerLogFilter().filter
    record = lambda msg, exc: logging.LogRecord("asyncio", logging.ERROR, "", 0, msg, None,  # noqa: E731
                                                (type(exc), exc, None))
    assert not keep(record("Task exception was never retrieved\nfuture: <Task …>", read_error))
    assert not keep(record("_GatheringFuture exception was never retrieved\nfuture: <…>", read_error))
    assert not keep(record("Future exception was never retrieved\nfuture: <Future …>", ts_error))
    assert keep(record("Task exception was never retrieved\nfuture: <Task …>", ValueError("a user's own task")))
    assert keep(record("Unclosed client session", read_error))


def test_orbax_rejects_foreign_format_version(tiny_params, tmp_path):
    cfg, params = tiny_params
    target = convert.save_checkpoint(tmp_path / "ckpt", params, cfg)
    meta = json.loads((target / "mixjax.json").read_text())
    (target / "mixjax.json").write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(ValueError, match="format_version=99"):
        convert.restore_checkpoint(target)




# ----------------------------------------------------------------------------------------------------
# Bad input: one clear error naming the file or tensor, raised before anything is built


@pytest.fixture
def tiny_llama_dir(make_tiny_hf):
    directory, _ = make_tiny_hf("llama", num_hidden_layers=1)
    return directory


@pytest.mark.parametrize("read", [convert.load, convert.load_tokenizer])
def test_missing_path_and_non_model_file(tmp_path, read):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        read(tmp_path / "nowhere")
    text = tmp_path / "notes.txt"
    text.write_text("hi")
    with pytest.raises(convert.ConvertError, match="notes.txt: not a model"):
        read(text)


@pytest.mark.parametrize("read", [convert.load, convert.load_tokenizer])
def test_single_weight_file_points_to_its_directory(tiny_llama_dir, read):
    """The CLI reads the tokenizer first: both readers point from one weight file to its directory."""
    with pytest.raises(convert.ConvertError, match="pass the model directory that holds it"):
        read(tiny_llama_dir / "model.safetensors")


def test_directory_without_config_or_weights(tiny_llama_dir, tmp_path):
    with pytest.raises(convert.ConvertError, match="no config.json"):
        convert.load(tmp_path)
    (tmp_path / "config.json").write_text((tiny_llama_dir / "config.json").read_text())
    with pytest.raises(convert.ConvertError, match="no weights found"):
        convert.load(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(convert.ConvertError, match="config.json: not valid JSON"):
        convert.load(tmp_path)


def test_truncated_safetensors(tiny_llama_dir):
    weights = tiny_llama_dir / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(convert.ConvertError, match="model.safetensors: truncated or corrupt"):
        convert.load(tiny_llama_dir)


def test_corrupt_bin(make_tiny_hf):
    directory, _ = make_tiny_hf("llama", num_hidden_layers=1, save_kwargs=dict(bin=True))
    (directory / "pytorch_model.bin").write_bytes(b"\x00garbage" * 50)
    with pytest.raises(convert.ConvertError, match="pytorch_model.bin: truncated or corrupt"):
        convert.load(directory)


def test_missing_shard(make_tiny_hf):
    directory, _ = make_tiny_hf("llama", save_kwargs=dict(max_shard_size="40KB"))
    shard = sorted(directory.glob("*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(convert.ConvertError, match=f"missing.*{shard.name}"):
        convert.load(directory)


def _edit_config(directory, **changes):
    path = directory / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_shape_mismatch_names_tensor(tiny_llama_dir):
    _edit_config(tiny_llama_dir, intermediate_size=100)
    with pytest.raises(convert.ConvertError, match=r"'model.layers.0.mlp.\w+_proj.weight' has shape \((96, 64|64, 96)\), but the config implies \((100, 64|64, 100)\)"):
        convert.load(tiny_llama_dir)


def test_missing_tensors_named(tiny_llama_dir):
    from safetensors.numpy import load_file, save_file

    weights = tiny_llama_dir / "model.safetensors"
    tensors = load_file(weights)
    del tensors["model.layers.0.mlp.up_proj.weight"]
    save_file(tensors, weights)
    with pytest.raises(convert.ConvertError, match="missing tensors 'model.layers.0.mlp.up_proj.weight'"):
        convert.load(tiny_llama_dir)
    _edit_config(tiny_llama_dir, num_hidden_layers=2)
    with pytest.raises(convert.ConvertError, match="model.layers.1.input_layernorm.weight.* and \\d+ more"):
        convert.load(tiny_llama_dir)


def test_unexpected_tensor_named(tiny_llama_dir):
    from safetensors.numpy import load_file, save_file

    weights = tiny_llama_dir / "model.safetensors"
    tensors = load_file(weights)
    tensors["model.layers.0.mlp.gate_proj.bias"] = np.zeros(96, np.float32)
    save_file(tensors, weights)
    with pytest.raises(convert.ConvertError, match="unexpected tensor 'model.layers.0.mlp.gate_proj.bias'"):
        convert.load(tiny_llama_dir)


def test_phi3_checkpoints_that_do_not_fit_are_named(make_tiny_hf):
    """A fused q/k/v whose rows are not the config's q + k + v, Phi-4-mini's partial RoPE and Phi-3.5's long RoPE
    are refused with the tensor or field named."""
    from safetensors.numpy import load_file, save_file

    directory, _ = make_tiny_hf("phi3")
    weights = directory / "model.safetensors"
    tensors = load_file(weights)
    tensors["model.layers.1.self_attn.qkv_proj.weight"] = tensors["model.layers.1.self_attn.qkv_proj.weight"][:-16]
    save_file(tensors, weights)
    with pytest.raises(convert.ConvertError, match=r"'model.layers.1.self_attn.qkv_proj.weight' has shape \(112, 64\), "
                                                   r"but the config implies \(128, K\): 64 \+ 32 \+ 32 rows"):
        convert.load(directory)
    config = json.loads((directory / "config.json").read_text())
    rope = config.get("rope_parameters") or {}
    _edit_config(directory, rope_parameters={**rope, "partial_rotary_factor": 0.75})
    with pytest.raises(ConfigError, match="partial_rotary_factor=0.75"):
        convert.load(directory)
    _edit_config(directory, rope_parameters={**rope, "rope_type": "longrope"})
    with pytest.raises(ConfigError, match="rope_scaling type 'longrope' is not supported"):
        convert.load(directory)


@pytest.mark.parametrize("field, value, match", [
    ("attn_logit_softcapping", 50.0, "attn_logit_softcapping=50.0 .*Gemma 2's; mixjax does not run it in a gemma3_text"),
    ("use_bidirectional_attention", True, "use_bidirectional_attention=true"),
    ("layer_types", ["full_attention", "chunked_attention", "full_attention", "full_attention"],
     "layer_types must name 'full_attention' or 'sliding_attention' for each of the 4 layers"),
    ("hidden_activation", "relu", "hidden_activation='relu' is not supported")])
def test_gemma_variants_mixjax_lacks_are_refused(make_tiny_hf, field, value, match):
    directory, _ = make_tiny_hf("gemma3_text", **GEMMA3)
    _edit_config(directory, **{field: value})
    with pytest.raises(ConfigError, match=match):
        convert.load(directory)


@pytest.mark.parametrize("model_type", ["gemma3", "mixtral", "bert"])
def test_unsupported_hf_architecture(tiny_llama_dir, model_type):
    _edit_config(tiny_llama_dir, model_type=model_type)
    with pytest.raises(ConfigError, match=f"model_type='{model_type}' is not supported"):
        convert.load(tiny_llama_dir)


def test_bad_gguf_files(make_tiny_hf, tmp_path):
    _, model = make_tiny_hf("llama", num_hidden_layers=1)
    path = write_tiny_gguf(tmp_path / "tiny.gguf", model)
    data = path.read_bytes()
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(data[: len(data) - 100])
    with pytest.raises(convert.ConvertError, match="truncated.gguf: truncated or corrupt GGUF"):
        convert.load(truncated)
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(convert.ConvertError, match="garbage.gguf: truncated or corrupt GGUF"):
        convert.load(garbage)
    gemma = write_tiny_gguf(tmp_path / "gemma.gguf", model, arch="gemma")
    with pytest.raises(ConfigError, match="general.architecture='gemma' is not supported"):
        convert.load(gemma)
    missing = write_tiny_gguf(tmp_path / "missing.gguf", model, drop=("blk.0.ffn_up.weight",))
    with pytest.raises(convert.ConvertError, match="missing tensors 'blk.0.ffn_up.weight'"):
        convert.load(missing)
    partial = write_tiny_gguf(tmp_path / "partial.gguf", model, rope_dims=12)  # heads of 16: Phi-4-mini's kind
    with pytest.raises(ConfigError, match=r"llama.rope.dimension_count=12 rotates part of each 16-wide head"):
        convert.load(partial)
    long_rope = write_tiny_gguf(tmp_path / "long.gguf", model, extra_tensors=[("rope_factors_long.weight",
                                                                               np.ones(8, np.float32))])
    with pytest.raises(ConfigError, match="rope_factors_long.weight holds long-context RoPE factors"):
        convert.load(long_rope)


def test_bad_dtype(tiny_llama_dir):
    with pytest.raises(convert.ConvertError, match="dtype=int8"):
        convert.load(tiny_llama_dir, dtype=jnp.int8)


def test_load_tokenizer_errors(tiny_llama_dir):
    with pytest.raises(convert.ConvertError, match="no tokenizer files"):
        convert.load_tokenizer(tiny_llama_dir)


def test_checkpoint_without_tokenizer_names_the_fix_and_the_fix_works(make_tiny_hf, tmp_path):
    """A checkpoint saved without a tokenizer: the error gives the call that stores the original's in it, and
    after that call the checkpoint's tokenizer encodes like the original."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    directory, _ = make_tiny_hf("llama", num_hidden_layers=1)
    backend = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))},
                                   merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    transformers.PreTrainedTokenizerFast(tokenizer_object=backend).save_pretrained(str(directory))
    cfg, params = convert.load(directory)
    target = convert.save_checkpoint(tmp_path / "ckpt", params, cfg)
    with pytest.raises(convert.ConvertError, match=r"holds no tokenizer.*load_tokenizer\(ORIGINAL\)\.save_pretrained"):
        convert.load_tokenizer(target)
    original = convert.load_tokenizer(directory)
    original.save_pretrained(str(target / "tokenizer"))
    assert convert.load_tokenizer(target)("the river bank").input_ids == original("the river bank").input_ids


def test_no_torch_advice_is_dropped_and_other_transformers_messages_pass():
    """transformers logs "PyTorch was not found..." at import on machines without torch (the demo's); mixjax
    needs no torch for tokenizers, so `load_tokenizer` drops that one record and nothing else."""
    import logging

    from convert.tokenizer import _DropNoTorchAdvice, quiet_no_torch_advice

    logger = logging.getLogger("transformers")
    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger.addHandler(handler)
    before = list(logger.filters)
    logger.filters[:] = [f for f in before if not isinstance(f, _DropNoTorchAdvice)]  # an earlier test's load
    try:
        logger.warning("PyTorch was not found (before)")
        quiet_no_torch_advice()
        quiet_no_torch_advice()
        assert sum(isinstance(f, _DropNoTorchAdvice) for f in logger.filters) == 1
        logger.warning("PyTorch was not found. Models won't be available and only tokenizers, configuration and "
                       "file/data utilities can be used.")
        logger.warning("something else")
        assert seen == ["PyTorch was not found (before)", "something else"]
    finally:
        logger.removeHandler(handler)
        logger.filters[:] = before


def test_gguf_tokenizer_is_built_without_torch_and_matches_transformers(embedded_model_path):
    """The embedded GGUF's byte-level BPE tokenizer is built from its metadata (transformers' GGUF path
    needs torch). It equals transformers' on text without digits; digits are split one by one, as the
    GGUF's `smollm` pre-tokenizer says (transformers' conversion drops that split)."""
    import json

    from transformers import AutoTokenizer

    from mixjax import assets

    ours = convert.load_tokenizer(embedded_model_path)
    ref = AutoTokenizer.from_pretrained(str(embedded_model_path.parent), gguf_file=embedded_model_path.name)
    with open(assets.evals_data_file("wikipedia_5.jsonl")) as f:
        texts = [json.loads(line)["0"] for _, line in zip(range(200), f)]
    texts = ["".join(c for c in t if not c.isdigit()) for t in texts] + ["naïve café — “quotes”\n\n  x\ty"]
    assert [ours.encode(t) for t in texts] == [ref.encode(t) for t in texts]
    assert ours.encode("in 1906") == ours.encode("in ") + [ours.convert_tokens_to_ids(d) for d in "1906"]
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (ref.bos_token_id, ref.eos_token_id,
                                                                         ref.pad_token_id)
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    assert ours.apply_chat_template(chat, add_generation_prompt=True) == ref.apply_chat_template(
        chat, add_generation_prompt=True)
    ids = ours.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == ours.convert_tokens_to_ids("<|im_start|>") and ours.decode(ids, skip_special_tokens=True) == "user\nhi"


# ------------------------------------------------------------------------------------------------ export

EXPORT_CASES = {  # (arch, config overrides, dtype, shard bytes): tied and untied heads, Llama-3 RoPE, biases, a window
    "llama3_rope_untied_sharded": ("llama", dict(rope_parameters=LLAMA3_ROPE), None, 20_000),
    "qwen2_bias_tied": ("qwen2", dict(tie_word_embeddings=True), None, None),
    "mistral_window_bf16": ("mistral", dict(sliding_window=4), jnp.bfloat16, None),
    "qwen3_head_dim": ("qwen3", dict(head_dim=32), None, None),
    "smollm3_nope": ("smollm3", dict(num_hidden_layers=4), None, None),
    "phi3_fused_window": ("phi3", dict(sliding_window=4), None, None),
    "granite_as_llama": ("granite", GRANITE, None, None),  # written as the Llama its folded weights make
    "gemma_bf16": ("gemma", dict(head_dim=32), jnp.bfloat16, None),  # norms written back as w (1 + w folded on load)
    "gemma3_windows_sandwich": ("gemma3_text", GEMMA3, None, None),
    "gemma2_softcaps": ("gemma2", GEMMA2, None, None),
    "gemma3_query_scalar": ("gemma3_text", {**GEMMA3, "query_pre_attn_scalar": 48}, None, None),
}


@pytest.mark.parametrize("case", list(EXPORT_CASES))
def test_hf_export_round_trip(case, make_tiny_hf, tmp_path):
    """`convert.save_hf`: transformers loads the written directory and computes the original model's logits (the
    same float32 weights: exactly; bf16: within its rounding), and `convert.load` reads back the same config and
    weights (bf16: the originals rounded once); small shards come with their index."""
    import transformers

    arch, overrides, dtype, shard = EXPORT_CASES[case]
    directory, model = make_tiny_hf(arch, **overrides)
    cfg, params = convert.load(directory)
    out = convert.save_hf(tmp_path / "out", params, cfg, dtype=dtype, max_shard_bytes=shard,
                          tokenizer=None)
    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert (len(files) > 1) == (shard is not None) and (out / "model.safetensors.index.json").exists() == (shard is not None)
    exported = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokens = _tokens(np.random.default_rng(2), cfg.vocab_size)
    err = _rel_err(_hf_logits(exported, tokens), _hf_logits(model, tokens))
    if arch == "granite":  # exported as a Llama: the multipliers folded in round differently from Granite's own
        assert err < 1e-5, err
    elif arch in ("gemma2", "gemma3_text"):  # (1 + w) − 1 in f32 gives back w to within an ulp of 1
        assert err < 1e-6, err
    else:
        assert err == 0.0 if dtype is None else 1e-4 < err < 0.05
    cfg2, params2 = convert.load(out)
    assert cfg2 == cfg
    rounded = params if dtype is None else jax.tree.map(lambda a: a.astype(dtype).astype(jnp.float32), params)
    if arch in ("gemma", "gemma3_text"):  # norms (1 + w) written as w and folded again: within an ulp of 1 (of bf16's
        # w's rounding), the rest as for the others
        is_norm = lambda path, _: "norm" in jax.tree_util.keystr(path)  # noqa: E731
        for (path, a), b, c in zip(jax.tree_util.tree_leaves_with_path(params2), jax.tree.leaves(rounded),
                                   jax.tree.leaves(params)):
            if is_norm(path, a):
                np.testing.assert_allclose(np.asarray(a), np.asarray(c), rtol=0, atol=2e-7 if dtype is None else 4e-3)
            else:
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        return
    assert _same_tree(params2, rounded)


def test_gguf_exports_in_hugging_face_layout(make_tiny_hf, tmp_path):
    """A llama GGUF (q/k rows permuted by llama.cpp, tied head) exported: transformers runs the written directory
    with the original model's logits (the rows are back in Hugging Face's order)."""
    import transformers

    _, model = make_tiny_hf("llama", tie_word_embeddings=True)
    cfg, params = convert.load(write_tiny_gguf(tmp_path / "tiny.gguf", model, "llama"))
    out = convert.save_hf(tmp_path / "out", params, cfg)
    exported = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokens = _tokens(np.random.default_rng(3), cfg.vocab_size)
    assert _rel_err(_hf_logits(exported, tokens), _hf_logits(model, tokens)) < HF_RTOL


def test_hf_export_refuses_bad_params_before_writing(tiny_params, make_tiny_hf, tmp_path, monkeypatch):
    """Quantized or fused linears, params that do not match the config, a config no Hugging Face class holds and
    an existing target each stop the export with the fix named, before a file is written; so do a NaN and a
    weight beyond float16's range, found while writing; a write that fails midway leaves neither the target nor
    its temporary directory."""
    import pallas_kernels as pk
    from convert import orbax_io
    from mixjax import model as mx

    directory, _ = make_tiny_hf("llama")
    cfg, params = convert.load(directory)
    layers = mx.unstack_layers(params)
    w = np.asarray(layers["layers"][0]["mlp"]["down_proj"]["weight"])
    layers["layers"][0]["mlp"]["down_proj"]["weight"] = pk.pack_rtn(w, np.zeros(w.shape[0], bool))
    cases = [
        (layers, cfg, "quantized linears.*dequantize_params"),
        (mx.fuse_projections(mx.unstack_layers(params)), cfg, "fused projections.*before `model.fuse_projections`"),
        ({**params, "norm": jnp.ones(3)}, cfg, r"norm \(model.norm.weight\) is float32 \(3,\)"),
        (params, tiny_params[0], "attention_bias.*Qwen2's layout"),
    ]
    for bad, bad_cfg, match in cases:
        with pytest.raises(ValueError, match=match):
            convert.save_hf(tmp_path / "out", bad, bad_cfg)
    with pytest.raises(ValueError, match="float dtype"):
        convert.save_hf(tmp_path / "out", params, cfg, dtype=jnp.int8)
    big, nan = ({**params, "norm": params["norm"].at[0].set(v)} for v in (1e6, jnp.nan))
    with pytest.raises(ValueError, match=r"model.norm.weight overflows float16 \(\|w\| up to 1e\+06\).*bfloat16"):
        convert.save_hf(tmp_path / "out", big, cfg, dtype=jnp.float16)
    with pytest.raises(ValueError, match="model.norm.weight holds NaN or Inf: fix the model"):
        convert.save_hf(tmp_path / "out", nan, cfg)
    assert list(tmp_path.iterdir()) == []
    target = convert.save_hf(tmp_path / "out", params, cfg)
    before = sorted((p.name, p.stat().st_mtime_ns) for p in target.iterdir())
    with pytest.raises(FileExistsError, match="force=True"):
        convert.save_hf(target, params, cfg)

    def interrupted(tmp, target):
        raise KeyboardInterrupt

    monkeypatch.setattr(orbax_io, "_replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert.save_hf(tmp_path / "other", params, cfg)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert sorted((p.name, p.stat().st_mtime_ns) for p in target.iterdir()) == before


# ------------------------------------------------------------------------------------------------ GGUF export

GGUF_EXPORT_CASES = {  # (arch, config overrides, weight type, does transformers' GGUF loader hold this model?)
    "llama_untied_f32": ("llama", dict(num_key_value_heads=1), "float32", True),
    "qwen2_bias_tied_f32": ("qwen2", dict(tie_word_embeddings=True), "float32", True),
    # (transformers' GGUF loader takes Qwen3's head_dim as 128 whatever the file's key_length says; real ones are 128)
    "qwen3_head_dim_f32": ("qwen3", dict(head_dim=128), "float32", True),
    "llama_tied_f16": ("llama", dict(tie_word_embeddings=True), "float16", True),
    "llama_q8_0": ("llama", {}, "q8_0", True),
    # transformers' GGUF loader ignores rope_freqs and has no window: mixjax's reader is the check here
    "llama3_rope_bf16": ("llama", dict(rope_parameters=LLAMA3_ROPE), "bfloat16", False),
    "mistral_window_f32": ("mistral", dict(sliding_window=4), "float32", False),
    "smollm3_nope_f32": ("smollm3", dict(num_hidden_layers=8), "float32", False),  # no SmolLM3 in its GGUF loader
    # (its loader scales attention by 256^-1/2 whatever the heads: heads of 256 here, as in the real models)
    "gemma3_window_f32": ("gemma3_text", dict(head_dim=256, query_pre_attn_scalar=256, num_hidden_layers=7,
                                              sliding_window=4), "float32", True),
    "gemma2_softcaps_f32": ("gemma2", dict(head_dim=256, query_pre_attn_scalar=256, num_hidden_layers=3,
                                           sliding_window=4), "float32", True),
    "gemma3_linear_rope_f32": ("gemma3_text", dict(head_dim=32, query_pre_attn_scalar=32, num_hidden_layers=6,
                                                   sliding_window=4, rope_scaling={"rope_type": "linear",
                                                                                   "factor": 8.0}), "float32", False),
}


def _gguf_stored(w: np.ndarray, weight_type: str) -> np.ndarray:
    """A 2-D weight as a GGUF of `weight_type` stores it, read back with gguf's own dequantization."""
    import gguf

    qtype = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "q8_0": "Q8_0"}[weight_type]
    qtype = gguf.GGMLQuantizationType[qtype]
    return gguf.quants.dequantize(gguf.quants.quantize(w.astype(np.float32), qtype), qtype).reshape(w.shape)


@pytest.mark.parametrize("case", list(GGUF_EXPORT_CASES))
def test_gguf_export_round_trip(case, make_tiny_hf, tmp_path):
    """`convert.save_gguf`: `convert.load` reads back the same config (Mistral's window and Llama-3 scaling
    included) and each tensor as gguf stores its type (norms and biases F32, exactly; Q8_0 blocks along K, so the
    q/k row interleave commutes with them); transformers' own GGUF loader (independent of mixjax's reader: its q/k
    un-permutation, its tied-head rule) computes the original model's logits, exactly in float32; and the
    rope_freqs tensor equals llama.cpp's rule for Llama-3 scaling."""
    import gguf
    import transformers

    arch, overrides, weight_type, transformers_reads = GGUF_EXPORT_CASES[case]
    directory, model = make_tiny_hf(arch, **overrides)
    cfg, params = convert.load(directory)
    out = convert.save_gguf(tmp_path / "m.gguf", params, cfg, dtype=weight_type)
    cfg2, params2 = convert.load(out)
    assert cfg2 == cfg
    stored = jax.tree.map(lambda a: np.stack([_gguf_stored(np.asarray(w), weight_type) for w in a])
                          if a.ndim == 3 else np.asarray(a), params)
    stored["embed_tokens"] = _gguf_stored(np.asarray(params["embed_tokens"]), weight_type)
    if "lm_head" in params:
        stored["lm_head"] = _gguf_stored(np.asarray(params["lm_head"]), weight_type)
    assert _same_tree(params2, jax.tree.map(jnp.asarray, stored))
    tokens = _tokens(np.random.default_rng(4), cfg.vocab_size)
    ours = forward(params2, tokens, cfg2, implementation="xla")
    if weight_type == "float32":
        assert _rel_err(ours, _hf_logits(model, tokens)) < HF_RTOL
    if transformers_reads:
        loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name,
                                                                  dtype=torch.float32).eval()
        err = _rel_err(_hf_logits(loaded, tokens), _hf_logits(model, tokens))
        assert err == 0.0 if weight_type == "float32" else err < 0.05
    reader = gguf.GGUFReader(str(out))
    freqs = [t for t in reader.tensors if t.name == "rope_freqs.weight"]
    assert bool(freqs) == (cfg.rope_scaling is not None and cfg.rope_scaling.rope_type == "llama3")  # (linear: two
    # keys, which the config's round trip above checks)
    if freqs:
        np.testing.assert_allclose(np.asarray(freqs[0].data), _llama_cpp_rope_factors(model.config), rtol=1e-6)
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    want = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "q8_0": "Q8_0"}[weight_type]
    assert types["blk.1.ffn_down.weight"] == want and types["blk.1.attn_norm.weight"] == "F32"


@pytest.mark.slow
def test_embedded_smollm2_exports_to_gguf(embedded_mixjax, embedded_model_path, tmp_path):
    """The real model, GGUF → mixjax → `convert.save_gguf` (float32) → mixjax: the same config and weights, and
    every tokenizer field of the shipped file (tokens, types, merges, `pre`, special ids, chat template) written
    back unchanged from the Hugging Face tokenizer mixjax built out of it."""
    from convert import gguf as gguf_reader
    from convert.gguf_tokenizer import read_tokenizer_fields

    cfg, params, tokenizer = embedded_mixjax
    out = convert.save_gguf(tmp_path / "smollm2.gguf", params, cfg, tokenizer=tokenizer)
    cfg2, params2 = convert.load(out)
    assert cfg2 == cfg and _same_tree(params2, params)
    assert read_tokenizer_fields(gguf_reader._open(out)) == read_tokenizer_fields(gguf_reader._open(embedded_model_path))
    text = "<|im_start|>user\nIn 1906, naïve “quotes”<|im_end|>"
    assert convert.load_tokenizer(out).encode(text) == tokenizer.encode(text)


def _tokenizer_from(pre: str, extra_tokens=()):
    """A byte-level BPE tokenizer with `pre` (a `tokenizer.ggml.pre` name), built as mixjax builds GGUF ones."""
    from tokenizers import pre_tokenizers

    from convert.gguf_tokenizer import build_tokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = alphabet + ["Ġt", "Ġth", "<s>", *extra_tokens]
    return build_tokenizer({"tokenizer.ggml.tokens": tokens, "tokenizer.ggml.merges": ["Ġ t", "Ġt h"],
                            "tokenizer.ggml.pre": pre, "tokenizer.ggml.bos_token_id": len(alphabet) + 2,
                            "tokenizer.ggml.add_bos_token": True,
                            "tokenizer.ggml.token_type": [1] * (len(alphabet) + 2) + [3] + [4] * len(extra_tokens)},
                           source="test")


def _wikipedia_texts(n: int) -> list[str]:
    from mixjax import assets

    with open(assets.evals_data_file("wikipedia_5.jsonl")) as f:
        return [json.loads(line)["0"] for _, line in zip(range(n), f)]


# Text a sentencepiece vocabulary meets badly: leading, doubled and trailing spaces, newlines and tabs, digits, and
# characters outside a 500-token vocabulary (byte fallback: accents, a snowman, an emoji, CJK).
AWKWARD_TEXTS = [" leading space", "two  spaces and\nnewlines\n\n", "\ttab\t", "trailing ", "   ", "", "a",
                 "naïve café — “quotes” ☃ 😀 東京 1906"]


@pytest.fixture(scope="module", params=[True, False], ids=["space_prefix", "no_space_prefix"])
def sentencepiece_gguf(request, tmp_path_factory):
    """(sentencepiece processor, path of a vocabulary-only GGUF written from it as llama.cpp's converter writes a
    Llama-2 vocabulary: tokens, scores, token types, bos/eos/unk ids; `add_space_prefix` left out (llama.cpp's default,
    true) or false). A 500-piece BPE with byte fallback, trained on Wikipedia passages like Llama 2's: identity
    normalization, digits split, whitespace kept."""
    import gguf
    import sentencepiece as spm

    prefix = request.param
    folder = tmp_path_factory.mktemp("spm")
    (folder / "corpus.txt").write_text("\n".join(_wikipedia_texts(300)))
    spm.SentencePieceTrainer.train(
        input=str(folder / "corpus.txt"), model_prefix=str(folder / "m"), vocab_size=500, model_type="bpe",
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True,
        add_dummy_prefix=prefix, character_coverage=0.995, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=str(folder / "m.model"))
    ids = range(sp.get_piece_size())
    kinds = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1 for i in ids]
    writer = gguf.GGUFWriter(str(folder / "vocab.gguf"), "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list([sp.id_to_piece(i) for i in ids])
    writer.add_token_scores([sp.get_score(i) for i in ids])
    writer.add_token_types(kinds)
    writer.add_bos_token_id(1), writer.add_eos_token_id(2), writer.add_unk_token_id(0)
    if not prefix:
        writer.add_add_space_prefix(False)
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file()
    writer.close()
    return sp, folder / "vocab.gguf"


def _assert_encodes_as_sentencepiece(tokenizer, sp, texts):
    """Every text: the ids sentencepiece gives after the bos, and back to sentencepiece's decoding."""
    for text in texts:
        ids = tokenizer.encode(text)
        assert ids == [1, *sp.encode(text)], text
        assert tokenizer.decode(ids, skip_special_tokens=True) == sp.decode(ids[1:]), text


def test_gguf_sentencepiece_tokenizer_is_built_without_torch(sentencepiece_gguf, monkeypatch):
    """A GGUF's sentencepiece (`llama`) vocabulary, tokens with scores and no merges, is built into a tokenizer
    without torch that encodes and decodes as sentencepiece does: 200 Wikipedia passages and awkward text."""
    from convert import gguf as gguf_reader
    from convert.gguf_tokenizer import build_tokenizer, can_build, read_tokenizer_fields

    sp, path = sentencepiece_gguf
    monkeypatch.setitem(__import__("sys").modules, "torch", None)  # transformers' GGUF path would import it
    ours = convert.load_tokenizer(path)
    assert (ours.bos_token, ours.eos_token, ours.unk_token) == ("<s>", "</s>", "<unk>")
    _assert_encodes_as_sentencepiece(ours, sp, _wikipedia_texts(200) + AWKWARD_TEXTS)
    fields = read_tokenizer_fields(gguf_reader._open(path))
    assert can_build(fields) and not can_build({**fields, "tokenizer.ggml.remove_extra_whitespaces": True})
    fields["tokenizer.ggml.scores"] = fields["tokenizer.ggml.scores"][:-1]
    with pytest.raises(ValueError, match="500 tokens but 499 scores.*damaged"):
        build_tokenizer(fields, source=path)


def test_sentencepiece_model_directory(sentencepiece_gguf, tmp_path, monkeypatch):
    """A directory with a sentencepiece tokenizer.model and no tokenizer.json loads through transformers' conversion;
    where that cannot run (no sentencepiece or protobuf package: transformers' own error then names tiktoken) the
    error names the fix."""
    import shutil
    import sys

    sp, path = sentencepiece_gguf
    shutil.copy(path.parent / "m.model", tmp_path / "tokenizer.model")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
    assert convert.load_tokenizer(tmp_path).convert_tokens_to_ids(sp.id_to_piece(300)) == 300
    for module in [m for m in sys.modules if m.startswith(("sentencepiece", "google.protobuf", "transformers"))]:
        monkeypatch.delitem(sys.modules, module)  # imported afresh, without the two packages
    for module in ("sentencepiece", "google.protobuf"):
        monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(convert.ConvertError, match="tokenizer.model without a tokenizer.json.*pip install sentencepiece "
                                                   "protobuf"):
        convert.load_tokenizer(tmp_path)


def test_gguf_export_writes_a_sentencepiece_vocabulary(sentencepiece_gguf, tmp_path):
    """A sentencepiece-style Hugging Face tokenizer is exported as llama.cpp's `llama` vocabulary: the original file's
    token types (unknown, control, byte, normal), its bos/eos/unk ids and space prefix, scores that order the merges
    as the original's did, the vocabulary padded to the model's; read back, it encodes as sentencepiece. transformers'
    own form of the same tokenizer (a Metaspace pre-tokenizer instead of the normalizer) is written alike."""
    from tokenizers import normalizers, pre_tokenizers

    from convert import gguf as gguf_reader
    from convert.gguf_tokenizer import read_tokenizer_fields
    from convert.tokenizer import tokenizer_kind
    from mixjax.model import init_params

    sp, path = sentencepiece_gguf
    tokenizer = convert.load_tokenizer(path)
    n = len(tokenizer)
    cfg = LlamaConfig(vocab_size=n + 2, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    params = init_params(cfg, jax.random.key(0), jnp.float32)
    original = read_tokenizer_fields(gguf_reader._open(path))
    metaspace = convert.load_tokenizer(path)
    prefix = original.get("tokenizer.ggml.add_space_prefix", True)
    metaspace.backend_tokenizer.normalizer = None if prefix else normalizers.Replace(" ", "\u2581")
    if prefix:
        metaspace.backend_tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first", split=False)
    for name, tok in [("normalizer", tokenizer), ("metaspace", metaspace)]:
        out = convert.save_gguf(tmp_path / f"{name}.gguf", params, cfg, tokenizer=tok)
        fields = read_tokenizer_fields(gguf_reader._open(out))
        assert fields["tokenizer.ggml.model"] == "llama" and "tokenizer.ggml.merges" not in fields
        assert fields["tokenizer.ggml.tokens"] == original["tokenizer.ggml.tokens"] + ["[PAD500]", "[PAD501]"]
        assert fields["tokenizer.ggml.token_type"] == original["tokenizer.ggml.token_type"] + [5, 5]
        assert fields["tokenizer.ggml.add_space_prefix"] is prefix and fields["tokenizer.ggml.add_bos_token"] is True
        assert [fields[f"tokenizer.ggml.{k}_token_id"] for k in ("bos", "eos", "unknown")] == [1, 2, 0]
        back = convert.load_tokenizer(out)
        assert tokenizer_kind(back) == "sentencepiece BPE"
        _assert_encodes_as_sentencepiece(back, sp, _wikipedia_texts(50) + AWKWARD_TEXTS)


@pytest.mark.parametrize("pre", ["gpt2", "smollm", "llama-bpe", "qwen2"])
def test_gguf_export_names_the_pre_tokenizer_and_pads_the_vocabulary(pre, tmp_path):
    """Each byte-level split mixjax builds is written under llama.cpp's name for it; a vocabulary shorter than the
    model's is padded with unused `[PAD<id>]` tokens; a bos the tokenizer prepends is recorded; user-defined
    (added, not special) tokens stay user-defined. Reading the file back gives a tokenizer that encodes alike."""
    from convert import gguf as gguf_reader
    from convert.gguf_tokenizer import read_tokenizer_fields
    from mixjax.model import init_params

    tokenizer = _tokenizer_from(pre, extra_tokens=["<tool>"])
    n = len(tokenizer)
    cfg = LlamaConfig(vocab_size=n + 3, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    out = convert.save_gguf(tmp_path / "t.gguf", init_params(cfg, jax.random.key(0), jnp.float32), cfg,
                            tokenizer=tokenizer)
    fields = read_tokenizer_fields(gguf_reader._open(out))
    assert fields["tokenizer.ggml.pre"] == pre and fields["tokenizer.ggml.model"] == "gpt2"
    assert fields["tokenizer.ggml.tokens"][n:] == [f"[PAD{i}]" for i in range(n, n + 3)]
    assert fields["tokenizer.ggml.token_type"][n - 2:] == [3, 4, 5, 5, 5]
    assert fields["tokenizer.ggml.add_bos_token"] is True and fields["tokenizer.ggml.bos_token_id"] == n - 2
    back = convert.load_tokenizer(out)
    text = "the 2024 path<tool> thistle  \n x"
    assert back.encode(text) == tokenizer.encode(text) and back.encode(text)[0] == n - 2
    assert tokenizer.convert_tokens_to_ids("<tool>") in back.encode(text)


def test_gguf_export_refuses_gemma_layouts_llama_cpp_fixes_otherwise(make_tiny_hf, tmp_path):
    """llama.cpp's gemma3 fixes every sixth layer global and the windowed layers' RoPE base; a Gemma 3 that differs,
    and Gemma 1, are refused before any write."""
    directory, _ = make_tiny_hf("gemma3_text", **GEMMA3)  # layer 1 global: not llama.cpp's pattern
    cfg, params = convert.load(directory)
    with pytest.raises(convert.ConvertError, match=r"global_layers=\(1,\): llama.cpp's gemma3 runs \(\)"):
        convert.save_gguf(tmp_path / "g3.gguf", params, cfg)
    directory, _ = make_tiny_hf("gemma", head_dim=32)
    with pytest.raises(convert.ConvertError, match="writing Gemma 1 as GGUF is not implemented"):
        convert.save_gguf(tmp_path / "g1.gguf", *reversed(convert.load(directory)))
    assert not list(tmp_path.glob("*.gguf*"))


def test_gguf_export_refuses_before_writing(make_tiny_hf, tmp_path, monkeypatch):
    """A tokenizer llama.cpp's gpt2 vocabulary cannot hold, a tokenizer with ids beyond the model's vocabulary,
    quantized params, a name without .gguf, an unknown weight type and an existing file without force are refused
    with the fix named and nothing written; a NaN, a weight beyond float16's range (Q8_0's scales are float16
    too), or an interruption found while writing leave no file either; the written file has the permissions any
    new file gets."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    import pallas_kernels as pk
    from convert import gguf_export
    from mixjax import model as mx

    directory, _ = make_tiny_hf("llama")
    cfg, params = convert.load(directory)
    backend = Tokenizer(models.BPE(vocab={"a": 0, "<0x00>": 1}, merges=[], byte_fallback=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    sentencepiece_like = PreTrainedTokenizerFast(tokenizer_object=backend)
    layers = mx.unstack_layers(params)
    w = np.asarray(layers["layers"][0]["mlp"]["up_proj"]["weight"])
    layers["layers"][0]["mlp"]["up_proj"]["weight"] = pk.pack_rtn(w, np.zeros(w.shape[0], bool))
    target = tmp_path / "m.gguf"
    cases = [
        (dict(tokenizer=sentencepiece_like), "neither a byte-level BPE.*nor a sentencepiece-style BPE.*convert_hf_to_gguf"),
        (dict(tokenizer=_tokenizer_from("gpt2", extra_tokens=[f"x{i}" for i in range(cfg.vocab_size)])),
         "beyond the model's vocab_size"),
        (dict(params=layers), "quantized linears.*dequantize_params"),
        (dict(path=tmp_path / "m.bin"), r"ends in \.gguf"),
        (dict(dtype="q4_0"), "not a GGUF weight type.*q8_0"),
        (dict(params={**params, "norm": params["norm"].at[1].set(jnp.nan)}), "output_norm.weight holds NaN"),
        (dict(params={**params, "embed_tokens": params["embed_tokens"].at[0, 0].set(1e6)}, dtype="float16"),
         r"token_embd.weight overflows float16.*bfloat16 or float32"),
    ]
    for kwargs, match in cases:
        args = dict(path=target, params=params, dtype="float32") | kwargs
        with pytest.raises(ValueError, match=match):
            convert.save_gguf(args.pop("path"), args.pop("params"), cfg, **args)
        assert list(tmp_path.iterdir()) == []

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf_export, "_encode", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert.save_gguf(target, params, cfg)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    convert.save_gguf(target, params, cfg, dtype="q8_0")
    before = target.stat()
    with pytest.raises(FileExistsError, match="force=True"):
        convert.save_gguf(target, params, cfg)
    assert target.stat().st_mtime_ns == before.st_mtime_ns
    import os

    umask = os.umask(0)
    os.umask(umask)
    assert before.st_mode & 0o777 == 0o666 & ~umask
    assert convert.save_gguf(target, params, cfg, force=True).stat().st_size > before.st_size  # f32 over q8_0


def test_written_checkpoints_get_the_usual_permissions(tiny_params, make_tiny_hf, tmp_path):
    """A checkpoint and a Hugging Face export are filled in a temporary directory and renamed into place; they end
    with a new directory's usual permissions, not the temporary directory's owner-only ones."""
    import os

    umask = os.umask(0)
    os.umask(umask)
    cfg, params = tiny_params
    written = [convert.save_checkpoint(tmp_path / "ckpt", params, cfg)]
    directory, _ = make_tiny_hf("llama")
    written.append(convert.save_hf(tmp_path / "hf", *reversed(convert.load(directory))))
    for path in written:
        assert path.stat().st_mode & 0o777 == 0o777 & ~umask, path


def test_gguf_export_keeps_every_end_of_generation_id(tmp_path):
    """A config that stops at several ids (Llama 3.1 Instruct: end of text, `<|eom_id|>`, `<|eot_id|>`) keeps them
    through GGUF: eos as eos, `<|eom_id|>` as llama.cpp's eom, the other as eot, and the reader stops at all three
    (as llama.cpp does). Without a tokenizer the second id becomes eot."""
    from convert import gguf as gguf_reader
    from convert.gguf_tokenizer import read_tokenizer_fields
    from mixjax.model import init_params

    tokenizer = _tokenizer_from("llama-bpe", extra_tokens=["<|eom_id|>", "<|eot_id|>"])
    n = len(tokenizer)
    eos, eom, eot = n - 3, n - 2, n - 1  # "<s>" stands in for end of text
    cfg = LlamaConfig(vocab_size=n, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=16, eos_token_ids=(eos, eom, eot))
    params = init_params(cfg, jax.random.key(0), jnp.float32)
    out = convert.save_gguf(tmp_path / "t.gguf", params, cfg, tokenizer=tokenizer)
    fields = read_tokenizer_fields(gguf_reader._open(out))
    assert (fields["tokenizer.ggml.eos_token_id"], fields["tokenizer.ggml.eom_token_id"],
            fields["tokenizer.ggml.eot_token_id"]) == (eos, eom, eot)
    assert convert.load(out)[0].eos_token_ids == (eos, eot, eom)
    bare = convert.save_gguf(tmp_path / "bare.gguf", params, dataclasses.replace(cfg, eos_token_ids=(eos, eot)))
    assert convert.load(bare)[0].eos_token_ids == (eos, eot)


def test_param_buffer_holds_half_checkpoints_in_half_and_widens_exactly():
    """A bf16 checkpoint loaded in f32 stays bf16 on the host (half the memory) and is widened on the device,
    exactly; a leaf whose layers come in different dtypes is widened to the target before it could round one."""
    from convert.layout import HF_NAMES, ParamBuffer
    from mixjax.config import LlamaConfig

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=True)
    rng = np.random.default_rng(0)
    buffer = ParamBuffer(cfg, jnp.float32, HF_NAMES, source="test")
    sent = {}
    for path, shape in buffer.shapes.items():
        for layer in range(shape[0]) if path.startswith("layers.") else [None]:
            value = rng.normal(size=buffer.expected_shape(path)).astype(jnp.bfloat16)
            if path == "layers.mlp.down_proj.weight" and layer == 1:
                value = value.astype(np.float32) + np.float32(1e-3)  # not a bf16 number: must survive whole
            buffer.put("t", path, layer, value)
            sent[(path, layer)] = np.asarray(value, np.float32)
    host = {p: a.dtype for p, a in buffer.arrays.items()}
    assert host["layers.self_attn.q_proj.weight"] == jnp.bfloat16 and host["embed_tokens"] == jnp.bfloat16
    assert host["layers.mlp.down_proj.weight"] == np.float32  # widened when layer 1's f32 tensor came
    params = buffer.finish()
    leaves = {"layers.mlp.down_proj.weight": params["layers"]["mlp"]["down_proj"]["weight"],
              "layers.self_attn.q_proj.weight": params["layers"]["self_attn"]["q_proj"]["weight"],
              "embed_tokens": params["embed_tokens"]}
    for path, leaf in leaves.items():
        assert leaf.dtype == jnp.float32
        for layer in range(leaf.shape[0]) if path.startswith("layers.") else [None]:
            got = np.asarray(leaf[layer] if layer is not None else leaf)
            np.testing.assert_array_equal(got, sent[(path, layer)])
