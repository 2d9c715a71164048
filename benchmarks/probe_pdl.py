"""Does XLA launch our Pallas kernels with programmatic dependent launch (PDL) on this GPU?

    XLA_FLAGS="--xla_gpu_enable_pdl=true --xla_dump_to=/tmp/pdl" python benchmarks/probe_pdl.py /tmp/pdl

XLA implements PDL for kernels it generates (openxla/xla #38544: `griddepcontrol.wait` at the start of
XLA-generated MLIR kernels, emitters and Triton; #43894 / #45001: `launch_dependents` in Triton GEMMs),
behind `--xla_gpu_enable_pdl` (the flag exists in jax 0.10.2's XLA). This script:
- runs a chain of dependent decode GEMVs, each fed by an XLA fusion of the previous output, in one jit;
- counts, in every file XLA dumped (PTX, LLVM IR, MLIR), the `griddepcontrol` instructions, so we see
  which kernels carry a wait and whether the Pallas-Triton kernels are among them;
- reports from a profiler trace how often a kernel started before the previous one ended. Overlap means
  the launches were programmatic.

Run it once with the flag true and once false (`bash benchmarks/device_session.sh pdl`). Needs a GPU.
"""

from __future__ import annotations

import collections
import glob
import os
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import devtime  # noqa: E402
from bench_matmul import random_packed  # noqa: E402
from pallas_kernels import gemv  # noqa: E402


def overlaps(fn, runs: int = 3) -> dict:
    """Kernel starts before the previous kernel's end, over consecutive GPU kernels of `runs` runs."""
    traced = devtime.trace_events(fn, runs)
    if isinstance(traced, str):
        return {"error": traced}
    events, _ = traced
    spans = sorted((s, s + dur, name) for (s, name), dur in events.items())
    early = [(b[2][:40], (a[1] - b[0]) / 1e3) for a, b in zip(spans, spans[1:]) if b[0] < a[1]]
    gaps = [(b[0] - a[1]) / 1e3 for a, b in zip(spans, spans[1:]) if b[0] >= a[1] and b[0] - a[1] < 100_000]
    return {"kernels": len(spans), "started_early": len(early), "early_examples": early[:6],
            "median_gap_us": float(np.median(gaps)) if gaps else float("nan")}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    dump = argv[0] if argv else None
    if jax.default_backend() != "gpu":
        print("probe_pdl: needs a GPU (PDL is a Hopper launch attribute)")
        return 2
    print("XLA_FLAGS:", os.environ.get("XLA_FLAGS", ""))
    rng = np.random.default_rng(0)
    weights = [random_packed(rng, 4096, 4096, 0.1) for _ in range(8)]
    x0 = jnp.asarray(rng.normal(size=(1, 4096)), jnp.bfloat16)

    @jax.jit
    def chain(x, ws):
        for w in ws:  # GEMV, then an XLA fusion that the next GEMV depends on
            x = jnp.tanh(gemv.mixed_gemv_pallas(x, w).astype(jnp.float32)).astype(jnp.bfloat16)
        return x

    print("overlap:", overlaps(lambda: chain(x0, weights)))
    t = devtime.device_times(lambda: chain(x0, weights), runs=5)
    print(f"device busy {t['busy_us']:.1f} µs, span {t['span_us']:.1f} µs, {t['kernels']:.0f} kernels per run")
    if dump:
        counts = collections.Counter()
        for path in glob.glob(os.path.join(dump, "**", "*"), recursive=True):
            if os.path.isfile(path) and os.path.getsize(path) < 200 << 20:
                text = open(path, errors="ignore").read()
                for op in re.findall(r"griddepcontrol\.(wait|launch_dependents)", text):
                    counts[(os.path.basename(path)[:70], op)] += 1
        print("griddepcontrol in the dump:", dict(counts) or "none")
    return 0


if __name__ == "__main__":
    sys.exit(main())
