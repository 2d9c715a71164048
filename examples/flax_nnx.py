"""MixLLM from Flax NNX: a Llama as NNX modules → W4.4A8 on its nnx.Linear layers → generation with the kernels.

    python examples/flax_nnx.py [MODEL_PATH]   # default: the embedded SmolLM2-135M

`mixjax.nn.quantize_linears` takes any NNX model and a loss of your own; the Llama here is only the example model.
Each selected `nnx.Linear` becomes a `mixjax.nn.MixedLinear` (int4 / int8 codes, int8 activations, the Pallas
kernels on a GPU). 2 CPU cores: about 2 minutes and 6 GB (2026-12-06: 132 s, W4.4A8 perplexity 32.37 against 29.67).
"""

import sys

import jax
import jax.numpy as jnp
from flax import nnx

import convert
import mixjax
from mixjax import nn as mnn


def lm_loss(module, tokens):
    """Next-token cross-entropy, averaged over tokens; quantize_linears calls it on one sample at a time."""
    logp = jax.nn.log_softmax(module(tokens)[:, :-1], axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))


def main(path=None):
    path = path or mixjax.embedded_model_path()
    tokenizer = convert.load_tokenizer(path)
    llama = mnn.Llama.from_pretrained(path)  # nnx.Module; its projections are nnx.Linear
    windows = mixjax.eval_windows(tokenizer, "wikipedia", seq_len=256, max_tokens=4 * 256)
    print(f"float perplexity: {jnp.exp(nnx.jit(lm_loss)(llama, jnp.asarray(windows))):.3f}")

    calib = list(mixjax.calibration_batches(tokenizer, n_samples=8, seq_len=256, batch_size=4))
    report = mnn.quantize_linears(llama, calib, lm_loss, config=mixjax.QuantConfig(bits=4.4),
                                  select=mnn.Llama.decoder_linears, progress=True)  # salience, GPTQ, clipping
    print(f"{len(report.int8_share)} linears quantized, {report.bits:.2f} weight bits on average")
    print(f"W4.4A8 perplexity: {jnp.exp(nnx.jit(lm_loss)(llama, jnp.asarray(windows))):.3f}")
    print(f"8-bit codes stay out of nnx.Param: {len(jax.tree.leaves(nnx.state(llama, nnx.Param)))} float leaves, "
          f"{len(jax.tree.leaves(nnx.state(llama, mnn.QuantizedWeight)))} quantized arrays")

    params, cfg = llama.to_params(), llama.cfg  # KV-cached decoding through mixjax.generate
    prompt = "The capital of France is"
    new = mixjax.generate(params, cfg, [tokenizer.encode(prompt)], max_new_tokens=16)
    print(f"{prompt!r} → {tokenizer.decode(new[0], skip_special_tokens=True)!r}")


if __name__ == "__main__":
    main(*sys.argv[1:2])
