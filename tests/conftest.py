"""Shared test fixtures.

- `embedded_model_path` (session): path of the embedded SmolLM2-135M-Instruct GGUF.
- `make_tiny_hf` (function): builds a tiny random Hugging Face causal LM, saves it with
  `save_pretrained` into a fresh temp dir, returns (directory, torch model in eval mode).
"""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def embedded_model_path():
    from mixjax.assets import embedded_model_path as _embedded_model_path

    return _embedded_model_path()


TINY = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)


@pytest.fixture
def make_tiny_hf(tmp_path_factory):
    """make_tiny_hf(arch="llama"|"qwen2"|"mistral", save_kwargs=None, **config_overrides) -> (dir, model).

    save_kwargs go to `save_pretrained`, except `bin=True`: weights written as pytorch_model.bin with
    torch.save instead (transformers 5 always writes safetensors). Every parameter (norms and biases included) is perturbed randomly so parity tests see them all.
    """
    import torch
    import transformers

    classes = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    }

    def make(arch="llama", save_kwargs=None, seed=0, **overrides):
        config_cls, model_cls = classes[arch]
        torch.manual_seed(seed)
        model = model_cls(config_cls(**{**TINY, **overrides}))
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * torch.randn_like(p))
        model.eval()
        directory = tmp_path_factory.mktemp(f"hf_{arch}")
        save_kwargs = dict(save_kwargs or {})
        as_bin = save_kwargs.pop("bin", False)
        model.save_pretrained(directory, **save_kwargs)
        if as_bin:
            for f in directory.glob("*.safetensors*"):
                f.unlink()
            torch.save(model.state_dict(), directory / "pytorch_model.bin")
        return directory, model

    return make


@pytest.fixture(scope="session")
def embedded_hf_model(embedded_model_path):
    """transformers' float32 model of the embedded GGUF (the real-model reference), loaded once."""
    torch = pytest.importorskip("torch")
    import transformers

    path = embedded_model_path
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def embedded_mixjax(embedded_model_path):
    """(cfg, float32 params, tokenizer) of the embedded model through mixjax's loaders, loaded once."""
    import jax.numpy as jnp

    import convert

    cfg, params = convert.load(embedded_model_path, dtype=jnp.float32)
    return cfg, params, convert.load_tokenizer(embedded_model_path)
