"""Write the optimized HLO of the XLA-fused decode path (pallas_kernels/xla_fused.py) for one shape and form.

    python benchmarks/dump_hlo.py --m 1 --k 4096 --n 14336 --form reduce > hlo.txt
"""
import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from bench_matmul import random_packed  # noqa: E402
from pallas_kernels import xla_fused  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--m", type=int, default=1)
p.add_argument("--k", type=int, default=4096)
p.add_argument("--n", type=int, default=14336)
p.add_argument("--form", default="reduce", help="an xla_fused form, or int4dot")
a = p.parse_args()
w = random_packed(np.random.default_rng(0), a.n, a.k, 0.1)
x = jnp.zeros((a.m, a.k), jnp.bfloat16)
f = jax.jit(lambda x, w: xla_fused.int4_dot_matmul(x, w) if a.form == "int4dot"
            else xla_fused.mixed_matmul_xla_fused(x, w, form=a.form))
print(f.lower(x, w).compile().as_text())
