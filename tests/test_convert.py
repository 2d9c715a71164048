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
