"""How much of a decode GEMV's fixed cost does a persistent kernel remove? (`pallas_kernels/persistent.py`)

    python benchmarks/probe_persist.py [--chains square,mlp] [--programs 264,528] [--warps 4,8]

Two chains of dependent M = 1 GEMVs (10 % 8-bit rows, random weights), y_l = W_l · tanh(y_{l-1}):
- square: 8 × 4096→4096 (o_proj-sized: 10.4 MB each, the GEMV with the largest fixed share);
- mlp: 4 × (4096→14336, 14336→4096).
For each, side by side in one process, device span and busy µs a chain (median of runs):
- `launches`: today's path, one `gemv.mixed_gemv_pallas` launch a GEMV plus XLA's tanh fusion between;
- `xla_bf16`: the same chain as bf16 dots (the weights dequantized once, outside the timing);
- `persistent P/w/pre`: one `chain_gemv` launch, P programs of w warps, the next phase's first weights
  loaded before the barrier (pre) or after it;
- `no_barrier`: the persistent kernel without barriers (results wrong): the bound for its arithmetic.
Correctness first: every persistent result against `launches` (same arithmetic) and `chain_ref`, and the
largest number of polls any program made at a barrier (a barrier that gave up means the grid was not
resident at once: that row's result is wrong and its time is not a measurement).
Floor: the chain's packed bytes at the copy bandwidth measured in the same run.
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
from bench_matmul import packed_bytes, random_packed  # noqa: E402
from pallas_kernels import gemv, persistent  # noqa: E402

CHAINS = {"square": [(4096, 4096)] * 8, "mlp": [(4096, 14336), (14336, 4096)] * 4}


def copy_bandwidth(nbytes: int = 1 << 30) -> float:
    a = jnp.ones((nbytes // 4,), jnp.float32)
    f = jax.jit(lambda a: a + 1.0)
    t = devtime.device_times(lambda: f(a), runs=5)
    return 2 * nbytes / (t["busy_us"] * 1e-6)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--chains", default="square", help="square, mlp (mlp: its kernel compiled for > 6 min on the H200)")
    p.add_argument("--programs", default="264,528")
    p.add_argument("--warps", default="4,8")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--interpret", action="store_true", help="CPU smoke run: tiny programs, no timing")
    args = p.parse_args(argv)
    interpret = args.interpret or jax.default_backend() != "gpu"
    dev = jax.devices()[0]
    sms = getattr(dev, "core_count", None)
    print(f"device {dev.device_kind}, SMs {sms}, jax {jax.__version__}")
    bw = None if interpret else copy_bandwidth()
    if bw:
        print(f"copy bandwidth {bw / 1e12:.2f} TB/s (read + write, busy time)")
    rng = np.random.default_rng(0)
    for name in args.chains.split(","):
        shapes = CHAINS[name] if not interpret else [(512, 1024), (1024, 512), (512, 512)]
        ws = tuple(random_packed(rng, n, k, 0.1) for k, n in shapes)
        x = jnp.asarray(rng.normal(size=(shapes[0][0],)), jnp.bfloat16)
        nbytes = sum(packed_bytes(w) for w in ws)
        print(f"\n== chain {name}: {len(ws)} GEMVs {shapes[:2]}…, {nbytes / 1e6:.1f} MB packed"
              + (f", floor {nbytes / bw * 1e6:.1f} µs" if bw else ""))

        @jax.jit
        def launches(x, ws):
            v = x[None]
            for i, w in enumerate(ws):
                if i:
                    v = jnp.tanh(y).astype(x.dtype)  # noqa: F821 (y from the previous iteration)
                y = gemv.mixed_gemv_pallas(v, w, interpret=interpret, out_dtype=jnp.float32)
            return y[0]

        dense = [w.dequantize().astype(jnp.bfloat16) for w in ws]

        @jax.jit
        def xla_bf16(x, dense):
            v = x
            for i, w in enumerate(dense):
                if i:
                    v = jnp.tanh(y).astype(x.dtype)  # noqa: F821
                y = jnp.dot(w, v, preferred_element_type=jnp.float32)
            return y

        base = launches(x, ws)
        ref = persistent.chain_ref(x, ws)
        scale = float(jnp.max(jnp.abs(ref)))
        print(f"launches vs chain_ref: max |diff| / max |ref| = {float(jnp.max(jnp.abs(base - ref))) / scale:.2e}")
        rows = []
        if not interpret:
            for label, fn in (("launches", lambda: launches(x, ws)), ("xla_bf16", lambda: xla_bf16(x, dense))):
                t = devtime.device_times(fn, runs=args.runs)
                rows.append((label, t))
        lcm = int(np.lcm.reduce([w.num_groups // 4 for w in ws]))
        configs = []
        for progs in map(int, args.programs.split(",")):
            progs = max(lcm, progs // lcm * lcm) if not interpret else 3 * lcm
            for warps in map(int, args.warps.split(",")):
                for pre in (True, False):
                    configs.append(persistent.ChainConfig(programs=progs, num_warps=warps, prefetch=pre,
                                                          spin_limit=1 << 20))
        configs.append(persistent.ChainConfig(programs=configs[0].programs, barrier=False))
        for cfg in configs:
            label = (f"persistent {cfg.programs}/{cfg.num_warps}w/{'pre' if cfg.prefetch else 'nopre'}"
                     if cfg.barrier else f"no_barrier {cfg.programs}")
            try:
                f = jax.jit(lambda x, ws, cfg=cfg: persistent.chain_gemv(x, ws, config=cfg, interpret=interpret))
                y, spins = f(x, ws)
                err = float(jnp.max(jnp.abs(y - base))) / scale
                gave_up = int(jnp.max(spins)) >= cfg.spin_limit
                print(f"{label}: vs launches {err:.2e}, max polls {int(jnp.max(spins))}"
                      + (" (a barrier gave up: grid not resident)" if gave_up else ""))
                if not interpret and not gave_up:
                    rows.append((label, devtime.device_times(lambda f=f: f(x, ws), runs=args.runs)))
            except Exception as e:  # noqa: BLE001 (a configuration that does not compile is a result)
                print(f"{label}: failed: {type(e).__name__}: {str(e)[:300]}")
        if rows:
            ref_span = rows[0][1]["span_us"]
            print("\n| variant | span µs | busy µs | kernels | × launches | µs a GEMV |")
            print("|---|---|---|---|---|---|")
            for label, t in rows:
                if "error" in t:
                    print(f"| {label} | {t['error']} | | | | |")
                    continue
                print(f"| {label} | {t['span_us']:.1f} | {t['busy_us']:.1f} | {t['kernels']:.0f} | "
                      f"{ref_span / t['span_us']:.2f} | {t['span_us'] / len(ws):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
