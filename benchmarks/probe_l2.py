"""How much a decode GEMV gains when its weight is already in L2 (benchmarks/NOTES-kernels.md item 57).

    python benchmarks/probe_l2.py [--layers o,qkv,down,gate_up] [--programs 132,264]

For each Llama-3-8B decode linear at M = 1 on int8 codes, in one jitted program over rotated weight copies
(> 150 MB together, beyond L2), device-timer µs a call of:
- `cold`: the GEMV alone (what a step pays today);
- `hot`: the GEMV on one weight, read again and again (L2-resident where it fits: the bound);
- `pf{P}x{F}`: `pallas_kernels.l2.l2_prefetch_pallas` over the first share F of every weight array with P
  programs, then the GEMV (a float fusion carries the dependency). Printed: the GEMV's µs, the
  prefetch's µs, and the GEMV's gain. In the model the prefetch would run as extra programs of the small
  kernel before the GEMV, which leaves DRAM idle, so the gain there is up to min(gain, that kernel's µs).
Needs a GPU.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import devtime  # noqa: E402
from bench_matmul import as_codes, random_packed  # noqa: E402
from pallas_kernels import gemv, l2  # noqa: E402
from pallas_kernels.format import QuantizedActivations  # noqa: E402

LAYERS = {"o": (4096, 4096), "qkv": (6144, 4096), "down": (4096, 14336), "gate_up": (28672, 4096)}  # N, K


def _arrays(w):
    """The arrays of the weight the GEMV reads (codes, scales, zeros)."""
    return [a for a in (w.q4, w.q8, w.scale4, w.zero4, w.scale8) if a.size]


def rotated_copies(rng, n: int, k: int, total_mb: int = 150) -> tuple[int, list, list]:
    """(bytes of one packed [N, K] weight with 10 % 8-bit rows, its copies, one M = 1 input of codes a copy):
    enough copies (≥ 4) to pass `total_mb` (default 150 MB, beyond the 50 MB L2), so each call reads its
    weight from DRAM."""
    w0 = random_packed(rng, n, k, 0.1)
    wbytes = sum(a.nbytes for a in jax.tree.leaves(w0))
    copies = max(4, -(-total_mb * 1_000_000 // wbytes))
    ws = [jax.tree.map(lambda a: jnp.array(a, copy=True), w0) for _ in range(copies)]
    xs = [as_codes(jnp.asarray(rng.normal(size=(1, k)), jnp.bfloat16)) for _ in range(copies)]
    return wbytes, ws, xs


def _kernel_us(fn, copies: int) -> dict:
    t = devtime.device_times(fn, runs=3, top=6)
    if "error" in t:
        return {"error": t["error"]}
    per = {}
    for name, us in t["top"]:
        key = "gemv" if "gemv" in name else "prefetch" if "l2_prefetch" in name else "other"
        per[key] = per.get(key, 0.0) + us / copies
    per["span"] = t["span_us"] / copies
    return per


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", default="o,qkv,down,gate_up")
    ap.add_argument("--programs", default="132,264")
    ap.add_argument("--fractions", default="1.0,0.25")
    args = ap.parse_args(argv)
    if jax.default_backend() != "gpu":
        print("probe_l2: needs a GPU")
        return 2
    print(jax.devices()[0].device_kind, "jax", jax.__version__)
    rng = np.random.default_rng(0)
    for layer in args.layers.split(","):
        n, k = LAYERS[layer]
        wbytes, ws, xs = rotated_copies(rng, n, k)
        copies = len(ws)

        cold = jax.jit(lambda xs, ws: [gemv.mixed_gemv_pallas(x, w) for x, w in zip(xs, ws)])
        hot = jax.jit(lambda xs, w: [gemv.mixed_gemv_pallas(x, w) for x in xs])
        res = {"cold": _kernel_us(lambda: cold(xs, ws), copies), "hot": _kernel_us(lambda: hot(xs, ws[0]), copies)}
        for p in (int(v) for v in args.programs.split(",")):
            for frac in (float(v) for v in args.fractions.split(",")):

                def chained(xs, ws, p=p, frac=frac):
                    out = []
                    for x, w in zip(xs, ws):
                        got = l2.l2_prefetch_pallas(_arrays(w), programs=p, share=frac)
                        dep = got[0].astype(jnp.float32) * 0.0  # orders the GEMV after the prefetch
                        x = QuantizedActivations(x.x_q, x.a_scale + dep, x.x_sum, x.lead, x.k, x.dtype)
                        out.append(gemv.mixed_gemv_pallas(x, w))
                    return out

                fn = jax.jit(chained)
                res[f"pf{p}x{frac:g}"] = _kernel_us(lambda: fn(xs, ws), copies)
        base = res["cold"].get("gemv", float("nan"))
        print(f"\n{layer}: N={n} K={k}, {wbytes / 1e6:.1f} MB a weight, {copies} copies")
        for name, r in res.items():
            if "error" in r:
                print(f"  {name:12s} {r['error']}")
                continue
            g = r.get("gemv", float("nan"))
            print(f"  {name:12s} gemv {g:6.2f} µs ({base / g:4.2f}× cold)  prefetch {r.get('prefetch', 0):6.2f} µs"
                  f"  other {r.get('other', 0):5.2f}  span {r['span']:6.2f} µs", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
