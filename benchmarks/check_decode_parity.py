"""Where the Pallas decode path departs from the XLA reference, kernel by kernel (needs a GPU).

    python benchmarks/check_decode_parity.py [--batch 5] [--steps 6]

Runs tests/test_gpu_model.py's small W4.4A8 model (prefill, then cached steps on the same tokens) through
implementation="xla" and "pallas", in bf16 and f32, with each decode-path kernel switched back to XLA in
turn (attention, the SwiGLU kernel, the norms emitting codes, the deferred down_proj partials). Prints,
per setting, the max and mean of max|Δlogit| / max|logit| over (row, step) and the share of equal argmax.
The "xla bf16 vs f32" row is the yardstick: how much bf16 rounding alone moves this model's logits.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from mixjax import model  # noqa: E402
from test_gpu_model import CFG, params_for, run_steps  # noqa: E402

SETTINGS = {  # name: model flags for the Pallas run
    "pallas (defaults)": {},
    "attention → xla": {"ATTENTION": "xla"},
    "swiglu kernel off": {"SWIGLU_QUANT": "never"},
    "norm codes off": {"NORM_QUANT": "never"},
    "defer down off": {"DEFER_DOWN": False},
    "all four off": {"ATTENTION": "xla", "SWIGLU_QUANT": "never", "NORM_QUANT": "never"},
}


def compare(got, want) -> str:
    err = np.max(np.abs(got - want), -1) / np.max(np.abs(want))  # [B, 1 + steps]
    same = np.mean(np.argmax(got, -1) == np.argmax(want, -1))
    return f"max {err.max():.4f}  mean {err.mean():.4f}  prefill {err[:, 0].max():.4f}  argmax equal {same:.2f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=5)
    ap.add_argument("--steps", type=int, default=6)
    args = ap.parse_args(argv)
    if jax.default_backend() != "gpu":
        print("check_decode_parity: needs a GPU")
        return 2
    rng = np.random.default_rng(0)
    prompt = jnp.asarray(rng.integers(0, CFG.vocab_size, (args.batch, 37)), jnp.int32)
    feed = [jnp.asarray(rng.integers(0, CFG.vocab_size, (args.batch, 1)), jnp.int32) for _ in range(args.steps)]
    refs = {}
    for dtype in (jnp.float32, jnp.bfloat16):
        params = params_for(args.batch, dtype)
        refs[dtype] = want = run_steps(params, prompt, feed, "xla")
        for name, flags in SETTINGS.items():
            saved = {k: getattr(model, k) for k in flags}
            for k, v in flags.items():
                setattr(model, k, v)
            try:
                got = run_steps(params, prompt, feed, "pallas")
            finally:
                for k, v in saved.items():
                    setattr(model, k, v)
            print(f"{jnp.dtype(dtype).name:9s} {name:20s} {compare(got, want)}", flush=True)
    print(f"{'':9s} {'xla bf16 vs f32':20s} {compare(refs[jnp.bfloat16], refs[jnp.float32])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
