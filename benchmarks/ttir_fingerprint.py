"""Fingerprints of the Triton IR that the mixed GEMM hands XLA, on a machine without a GPU.

    python benchmarks/ttir_fingerprint.py > before.txt     # on the old commit
    python benchmarks/ttir_fingerprint.py > after.txt      # on the new one; `diff before.txt after.txt`

A refactor of `pallas_kernels/kernels.py` that leaves every line equal changes nothing the GPU runs, so the
device numbers measured before it still hold (session 34: the measured-slower forms removed, NOTES item 119).
One line per kernel launch: the case, the kernel's position in the call, a hash of its IR and the IR's length.
The cases are `choose_config`'s defaults over the Llama-3-8B shapes (decode at M = 1, 16, 32, a medium M and
prefill) and the options that stay (`prefetch_meta=3`, the fused quantization).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from bench_matmul import random_packed  # noqa: E402
from pallas_kernels import kernels, triton_ir  # noqa: E402

CASES = (  # (M, K, N, GemmConfig fields changed from choose_config's)
    (1, 4096, 4096, {}),
    (16, 4096, 6144, {}),
    (32, 4096, 28672, {}),
    (32, 14336, 4096, {"prefetch_meta": 3}),
    (20, 1024, 192, {"fuse_quant": True}),
    (300, 4096, 4096, {}),
    (2048, 4096, 4096, {}),
)


def fingerprints() -> list[str]:
    rng = np.random.default_rng(0)
    lines = []
    for m, k, n, over in CASES:
        w = random_packed(rng, n, k, 0.1)
        cfg = dataclasses.replace(kernels.choose_config(m, w.num_groups, w.q8.shape[0] + w.q4.shape[0]), **over)
        fn = lambda x, w, cfg=cfg: kernels.mixed_matmul_pallas(x, w, config=cfg)  # noqa: E731
        for i, text in enumerate(triton_ir.capture_ttir(fn, jax.ShapeDtypeStruct((m, k), jnp.bfloat16), w)):
            digest = hashlib.sha256(text.encode()).hexdigest()[:16]
            lines.append(f"M={m} K={k} N={n} {over or ''} kernel {i}: {digest} ({len(text)} chars)")
    return lines


if __name__ == "__main__":
    print("\n".join(fingerprints()))
