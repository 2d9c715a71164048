"""The examples run as written, on a tiny random Llama (the embedded model would take minutes on CI's two cores).

They are the Python flow the README points to; these tests keep them in step with the library's API. Each
example's `main` runs in-process on a Hugging Face directory with a byte-level tokenizer; the assertions check
what the example prints and writes, not only that it returns.
"""

from __future__ import annotations

import importlib.util
import pathlib

import numpy as np
import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


def _example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_directory(tmp_path_factory):
    """A 2-layer random Llama (K = 256: two groups of 128 along K) with a byte-level BPE tokenizer, long enough a
    context for the examples' 512-token windows and 256-token calibration samples."""
    torch = pytest.importorskip("torch")
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<eos>"] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=len(vocab), hidden_size=256, intermediate_size=384,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=1024, eos_token_id=vocab["<eos>"], bos_token_id=None)
    directory = tmp_path_factory.mktemp("tiny_example_model")
    transformers.LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def test_generate_example(tiny_directory, capsys):
    """examples/generate.py: a finite perplexity on Wikipedia windows, then each prompt with a greedy and a sampled
    continuation."""
    _example("generate").main(str(tiny_directory))
    out = capsys.readouterr().out
    ppl = float(out.split("Wikipedia tokens: ")[1].split()[0])
    assert np.isfinite(ppl) and ppl > 1
    for prompt in ("The capital of France is", "def fibonacci(n):"):
        assert repr(prompt) in out
    assert out.count("greedy :") == 3 and out.count("sampled:") == 3


def test_quantize_and_generate_example(tiny_directory, tmp_path, capsys):
    """examples/quantize_and_generate.py: the quantization report, a saved W4.4A8 checkpoint that `convert` reads
    back as one (with its tokenizer), and a continuation of each prompt."""
    import convert
    from pallas_kernels import MixedWeight

    out_dir = tmp_path / "w4.4a8"
    _example("quantize_and_generate").main(str(tiny_directory), str(out_dir))
    out = capsys.readouterr().out
    assert "8-bit" in out and f"quantized checkpoint: {out_dir}" in out
    assert out.count(" → ") == 2
    cfg, params = convert.load(out_dir)
    assert isinstance(params["layers"][0]["mlp"]["down_proj"]["weight"], MixedWeight)
    assert len(convert.load_tokenizer(out_dir)) == cfg.vocab_size


def test_flax_nnx_example(tiny_directory, capsys):
    """examples/flax_nnx.py: float and W4.4A8 perplexities of the NNX Llama, every decoder linear quantized with the
    codes outside nnx.Param, and a continuation through mixjax.generate."""
    _example("flax_nnx").main(str(tiny_directory))
    out = capsys.readouterr().out
    fp = float(out.split("float perplexity: ")[1].split()[0])
    q = float(out.split("W4.4A8 perplexity: ")[1].split()[0])
    assert np.isfinite(fp) and np.isfinite(q) and q > 1 and abs(q - fp) < 0.5 * fp
    assert "14 linears quantized" in out  # 2 layers × 7
    assert out.count(" → ") == 1
