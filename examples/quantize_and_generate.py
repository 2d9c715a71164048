"""Load a model → quantize it to W4.4A8 → save the quantized checkpoint → restore it → jitted generation.

    python examples/quantize_and_generate.py [MODEL_PATH] [OUT_DIR]   # default: the embedded SmolLM2-135M

On a GPU the quantized linears run through the Pallas kernels, elsewhere through their XLA reference
(2 CPU cores: about 6 minutes, most of it GPTQ over the 30 layers).
"""

import sys
import tempfile

import jax.numpy as jnp

import convert
import mixjax
from mixjax.quant.checkpoint import save_quantized


def main(path=None, out=None):
    path = path or mixjax.embedded_model_path()
    cfg, params = convert.load(path, dtype=jnp.float32)
    tokenizer = convert.load_tokenizer(path)

    # A few short calibration windows of the default calibration text (OpenWebText passages).
    calib = mixjax.calibration_batches(tokenizer, n_samples=8, seq_len=256, batch_size=4)
    config = mixjax.QuantConfig(bits=4.4)  # 10 % of the weights at 8 bits, the rest 4 bits; A8 activations
    qparams, report = mixjax.quantize(params, calib, cfg, config=config, return_report=True)
    print(report.to_markdown())

    out = out or tempfile.mkdtemp(prefix="mixjax-w4.4a8-")
    with tempfile.TemporaryDirectory() as tok_dir:  # the tokenizer travels inside the checkpoint
        tokenizer.save_pretrained(tok_dir)
        save_quantized(out, qparams, cfg, config=config, files={"tokenizer": tok_dir}, force=True)
    cfg, qparams = convert.load(out)  # tuple layers of pallas_kernels.MixedWeight linears
    qparams = mixjax.model.fuse_projections(qparams)  # q/k/v and gate/up as one kernel call each
    tokenizer = convert.load_tokenizer(out)

    prompts = ["The capital of France is", "The three primary colours are"]
    ids = [tokenizer.encode(p) for p in prompts]
    new = mixjax.generate(qparams, cfg, ids, max_new_tokens=24, cache_dtype=jnp.int8)  # int8 KV cache too
    for prompt, row in zip(prompts, new):
        print(f"{prompt!r} → {tokenizer.decode(row, skip_special_tokens=True)!r}")
    print(f"quantized checkpoint: {out}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
