"""Load a model, measure its perplexity, generate from a batch of prompts.

    python examples/generate.py [MODEL_PATH]      # default: the embedded SmolLM2-135M-Instruct
"""

import sys

import jax.numpy as jnp

import convert
import mixjax


def main(path=None):
    path = path or mixjax.embedded_model_path()
    cfg, params = convert.load(path, dtype=jnp.float32)
    tokenizer = convert.load_tokenizer(path)

    windows = mixjax.eval_windows(tokenizer, "wikipedia", seq_len=512, max_tokens=2048)  # int32 [N, T]
    print(f"perplexity on {windows.shape[0]}×{windows.shape[1]} Wikipedia tokens: "
          f"{mixjax.perplexity(params, cfg, windows, batch_size=2):.3f}")

    prompts = ["The capital of France is", "The three primary colours are", "def fibonacci(n):"]
    ids = [tokenizer.encode(p) for p in prompts]  # different lengths: one batch, right-padded inside
    greedy = mixjax.generate(params, cfg, ids, max_new_tokens=24)
    sampled = mixjax.generate(params, cfg, ids, max_new_tokens=24, temperature=0.8, top_p=0.95, seed=1)
    for prompt, g, s in zip(prompts, greedy, sampled):
        print(f"\n{prompt!r}\n  greedy : {tokenizer.decode(g, skip_special_tokens=True)!r}"
              f"\n  sampled: {tokenizer.decode(s, skip_special_tokens=True)!r}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
