"""convert.load: Hugging Face directories and GGUF files against transformers; Orbax; bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import convert
from mixjax.model import forward

HF_RTOL = 1e-4  # f32 on both sides: only summation order differs


def _hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(tokens).long()).logits.float().numpy()


def _rel_err(ours, ref) -> float:
    return float(np.max(np.abs(np.asarray(ours) - ref)) / np.max(np.abs(ref)))


def _tokens(rng, vocab, shape=(2, 11)):
    return rng.integers(0, vocab, size=shape).astype(np.int32)


HF_CASES = {
    "llama_gqa_untied": ("llama", {}, {}),
    "llama3_rope_tied": (
        "llama",
        dict(
            tie_word_embeddings=True,
            rope_parameters=dict(
                rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                high_freq_factor=4.0, original_max_position_embeddings=8,
            ),
        ),
        {},
    ),
    "qwen2_bias_tied": ("qwen2", dict(tie_word_embeddings=True), {}),
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


# ----------------------------------------------------------------------------------------------------
# GGUF


def _permute_like_llama_cpp(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf row interleave of q/k (the inverse of what convert undoes)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path, model, arch="llama", *, drop=(), quantize_linears=False):
    """Writes a tiny HF model as a GGUF file the way llama.cpp lays it out (F32, or Q8_0 linears)."""
    import gguf

    from convert.layout import NAME_TABLE

    c = model.config
    hf_to_gguf = {}
    for _, hf_name, gguf_name in NAME_TABLE:
        for i in range(c.num_hidden_layers) if "{i}" in hf_name else [None]:
            hf_to_gguf[hf_name.format(i=i)] = gguf_name.format(i=i)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_rope_freq_base(c.rope_parameters["rope_theta"])
    writer.add_vocab_size(c.vocab_size)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        gguf_name = hf_to_gguf[name]
        if gguf_name in drop:
            continue
        w = tensor.float().numpy()
        if arch == "llama" and ".attn_q." in gguf_name:
            w = _permute_like_llama_cpp(w, c.num_attention_heads)
        elif arch == "llama" and ".attn_k." in gguf_name:
            w = _permute_like_llama_cpp(w, c.num_key_value_heads)
        if quantize_linears and w.ndim == 2 and gguf_name.startswith("blk."):
            q = gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(gguf_name, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(gguf_name, w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_gguf_logits_match_transformers(arch, make_tiny_hf, tmp_path):
    """GGUF name mapping, tied-embedding detection, llama's q/k un-permutation and qwen2's biases."""
    _, model = make_tiny_hf(arch, tie_word_embeddings=(arch == "llama"))
    path = write_tiny_gguf(tmp_path / "tiny.gguf", model, arch)
    cfg, params = convert.load(path)
    assert cfg.model_type == arch and cfg.tie_word_embeddings == (arch == "llama")
    assert cfg.attention_bias == (arch == "qwen2") and "lm_head" not in params or arch == "qwen2"
    tokens = _tokens(np.random.default_rng(1), cfg.vocab_size)
    ours = forward(params, tokens, cfg, implementation="xla")
    assert _rel_err(ours, _hf_logits(model, tokens)) < HF_RTOL


def test_gguf_q8_0_dequantized(make_tiny_hf, tmp_path):
    """Q8_0 linears dequantize to within half an int8 step of each block of 32 (+ f16 rounding of the scale)."""
    _, model = make_tiny_hf("llama")
    cfg, params = convert.load(write_tiny_gguf(tmp_path / "q8.gguf", model, quantize_linears=True))
    w = params["layers"]["mlp"]["up_proj"]["weight"][1]
    ref = model.state_dict()["model.layers.1.mlp.up_proj.weight"].numpy()
    step = np.abs(ref).reshape(ref.shape[0], -1, 32).max(-1, keepdims=True) / 127  # Q8_0: blocks of 32
    assert np.all(np.abs(np.asarray(w) - ref).reshape(step.shape[0], -1, 32) <= step * 0.6)


@pytest.fixture(scope="module")
def smollm2(embedded_model_path):
    """(cfg, params, transformers model, tokenizer) for the embedded SmolLM2-135M GGUF, loaded once."""
    import transformers

    path = embedded_model_path
    cfg, params = convert.load(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    ).eval()
    return cfg, params, model, convert.load_tokenizer(path)


@pytest.mark.slow
def test_embedded_smollm2_matches_transformers(smollm2):
    """Both sides dequantize the same Q4_1/Q8_0 file to f32 and run f32 maths, so only summation order
    differs: measured 4e-6 relative max-abs over 30 layers; 1e-4 leaves 25x margin yet catches any
    layout error (a wrong rotary permutation alone gives O(1) differences)."""
    cfg, params, model, tokenizer = smollm2
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 576, 9, 3)
    assert cfg.tie_word_embeddings and cfg.vocab_size == 49152
    text = "The quick brown fox jumps over the lazy dog near the river bank."
    tokens = np.asarray(tokenizer(text)["input_ids"], np.int32)[None]
    assert tokens.shape[1] > 8
    ours = forward(params, tokens, cfg, implementation="xla")
    ref = _hf_logits(model, tokens)
    assert _rel_err(ours, ref) < HF_RTOL
    assert np.array_equal(np.argmax(ours, -1), np.argmax(ref, -1))
