"""The producers of a mixed linear's input at decode: XLA's fusions against the Pallas kernels that emit
int8 codes — the norm (`rms_norm_quant_pallas`, D = 4096) and SwiGLU (`silu_mul_quant_pallas`, F = 14336).

    python benchmarks/bench_norm.py --out /tmp/norm.md        # GPU, < 1 min
    python benchmarks/bench_norm.py --small                   # CPU smoke run (interpret mode)

Why (NOTES-kernels.md items 31, 48): the one-launch residual add + RMSNorm + int8 quantization removed 97
launches a decode step but ran 1–2 % slower end to end; this times the pieces apart. For M rows and P
split-K partials of the previous linear (P = 0: the input norm, x alone; P = 8: after o_proj at M = 1;
P = 28: after a down_proj GEMV with that split):
- `xla_norm`: what the model runs by default — x + Σ partials, RMSNorm (XLA fusions; the linear after it
  then quantizes inside its own kernel);
- `xla_quant`: the same plus the quantization as XLA ops (`quantize_activations_xla`);
- `pallas_wN`: `rms_norm_quant_pallas` with N warps per row (one launch, one program per row);
- `pallas_2l_cN`: its two-launch form, programs over (row, chunk of N groups of 128).
Then SwiGLU before down_proj, on the gate/up linear's output (P = 0) or its 8 split-K partials: `xla_silu`
(XLA's Σ + SiLU(gate)·up, the default: down_proj then quantizes inside its kernel), `xla_silu_quant` (+ the
quantization as XLA ops), `xla_silu_qpallas` (+ `quantize_activations_pallas`: the prefill default, where the
Mosaic GPU GEMM quantizes its input in a launch of its own), `swiglu_cN` (`silu_mul_quant_pallas`, N groups
a program), `swiglu_bRwW` (its blocked form, the model's at prefill: R rows × one group a program, W warps).
One activation scale a row (`--row-scale`; the per-token prefill, `mgpu.PREFILL_ACT_SCALE = "token"`):
`pallas_row` (the norm's one-program-a-row kernel with `row_scale`), `xla_silu_qrows` (XLA's SiLU·mul and
`mgpu.quantize_rows`: what the GEMM does with a float input), `swiglu_rowCwW` (the row form: one program a
row, C groups a step of its two walks, W warps); their codes are checked against the per-row reference. And
o_proj's float input quantized a row at a time: XLA's passes (`mgpu.quantize_rows`) against one Pallas pass
(`kernels.quantize_rows_pallas`, `mgpu.ROW_QUANT`).

    python benchmarks/bench_norm.py --ms 256,2048 --parts 0 --swiglu-only   # prefill shapes
    python benchmarks/bench_norm.py --ms 256,2048 --parts 0 --prefill-quant 128,64,32,16   # the GEMM's input
    python benchmarks/bench_norm.py --ms 256,2048 --parts -1 --warps 8 --chunks "" --row-scale   # per-token
Every variant is checked against the reference first, then timed as `--calls` calls on distinct inputs in
one jit (device-timer busy/span µs and kernels per call, benchmarks/devtime.py).
"""

from __future__ import annotations

import argparse
import datetime
import os
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from mixjax import model  # noqa: E402
from pallas_kernels import norm  # noqa: E402
from pallas_kernels.kernels import quantize_activations_pallas, quantize_activations_xla  # noqa: E402

D, EPS = 4096, 1e-5


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ms", default="1,8,32")
    p.add_argument("--parts", default="0,8,28", help="0: x alone; P > 0: P f32 split-K partials; -1: one x-shaped "
                   "delta in x's dtype (prefill: the residual add of the linear's output)")
    p.add_argument("--warps", default="4,8,16")
    p.add_argument("--chunks", default="1,2,4", help="groups per program of the two-launch form")
    p.add_argument("--calls", type=int, default=32)
    p.add_argument("--small", action="store_true")
    p.add_argument("--swiglu-only", action="store_true", help="time SwiGLU only (not the norms)")
    p.add_argument("--row-scale", action="store_true", help="also the producers with one activation scale a row")
    p.add_argument("--prefill-quant", default=None,
                   help="rows a program to sweep, e.g. 128,64,32,16: the norm as XLA's fusion, then "
                        "`quantize_activations_pallas(block_m=128, block_rows=R)` as the prefill GEMM's input "
                        "(`mgpu.QUANT_ROWS`); only these, xla_quant and the one-launch norm (pallas_wN), no SwiGLU")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    interpret = jax.default_backend() != "gpu"
    ms, partses, warps, chunks = ([int(v) for v in a.split(",") if v] for a in (args.ms, args.parts, args.warps,
                                                                                args.chunks))
    if args.small:
        ms, partses, warps, chunks, args.calls = [1, 3], [0, 2], [4], [2], 2
    dev = jax.devices()[0]
    head = f"device: {dev.device_kind} ({dev.platform}), jax {jax.__version__}, {datetime.date.today()}"
    print(head, flush=True)

    def xla_norm(x, delta, w):
        if delta is None:
            s = x
        else:  # x-shaped (prefill: the linear's output in x's dtype) or f32 split-K partials
            s = x + (delta if delta.ndim == x.ndim else jnp.sum(delta, axis=0).astype(x.dtype))
        return s, model.rms_norm(s, w, EPS)

    def xla_quant(x, delta, w):
        s, h = xla_norm(x, delta, w)
        return s, quantize_activations_xla(h, block_m=norm.quant_rows(x.shape[0]))

    variants = {"xla_norm": xla_norm, "xla_quant": xla_quant}
    if args.prefill_quant:  # the prefill path: XLA's norm fusion, then the GEMM's quantization launch
        chunks = []  # the one-launch norm kernel (pallas_wN) stays: `PREFILL_CODES = "all"`'s prefill form
        for r in (int(v) for v in args.prefill_quant.split(",")):
            def qpallas(x, d, w, r=r):
                s, h = xla_norm(x, d, w)
                return s, quantize_activations_pallas(h, block_m=128, block_rows=r, interpret=interpret)

            variants[f"xla_norm_qpallas_b{r}"] = qpallas
    for nw in warps:
        variants[f"pallas_w{nw}"] = lambda x, d, w, nw=nw: norm.rms_norm_quant_pallas(x, d, w, EPS, num_warps=nw,
                                                                                     interpret=interpret)
    if args.row_scale:  # one scale a row ("row" in the name: checked against the per-row reference)
        from pallas_kernels import mgpu

        variants["xla_qrows"] = lambda x, d, w: (lambda s, h: (s, mgpu.quantize_rows(h)))(*xla_norm(x, d, w))
        for nw in warps:
            variants[f"pallas_row_w{nw}"] = lambda x, d, w, nw=nw: norm.rms_norm_quant_pallas(
                x, d, w, EPS, num_warps=nw, row_scale=True, interpret=interpret)
    for cg in chunks:
        variants[f"pallas_2l_c{cg}"] = lambda x, d, w, cg=cg: norm.rms_norm_quant_pallas(x, d, w, EPS, chunk_groups=cg,
                                                                                        interpret=interpret)
    rows = ["| M | partials | variant | codes = reference | busy µs | span µs | kernels | vs xla_norm (span) |",
            "|---|---|---|---|---|---|---|---|"]
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.normal(size=D), jnp.bfloat16)
    for m in ([] if args.swiglu_only else ms):
        for parts in partses:
            xs = [jnp.asarray(rng.normal(size=(m, D)), jnp.bfloat16) for _ in range(args.calls)]
            ds = [None if not parts else jnp.asarray(rng.normal(size=(m, D)), jnp.bfloat16) if parts < 0 else
                  jnp.asarray(rng.normal(size=(parts, m, D)) / parts, jnp.float32) for _ in range(args.calls)]
            refs = [norm.rms_norm_quant_ref(xs[0], ds[0], w, EPS, row_scale=r)[1] for r in (False, True)]
            base = None
            for name, fn in variants.items():
                out, ref = fn(xs[0], ds[0], w)[1], refs["row" in name]
                same = "-" if name == "xla_norm" else \
                    f"{float(np.mean(np.asarray(out.x_q if hasattr(out, 'x_q') else out[0])[:m] == np.asarray(ref.x_q)[:m])):.4f}"
                many = jax.jit(lambda xs, ds, fn=fn: [fn(x, d, w) for x, d in zip(xs, ds)])
                jax.block_until_ready(many(xs, ds))
                if interpret:
                    busy = span = kern = float("nan")
                else:
                    import devtime

                    dt = devtime.device_times(lambda: many(xs, ds), runs=3)
                    busy, span, kern = (dt.get(k, float("nan")) / args.calls for k in ("busy_us", "span_us", "kernels"))
                base = span if name == "xla_norm" else base
                rows.append(f"| {m} | {parts} | {name} | {same} | {busy:.2f} | {span:.2f} | {kern:.1f} | {base / span:.2f}× |")
                print(rows[-1], flush=True)
    if args.row_scale:  # o_proj's float input at a per-token prefill: XLA's two passes or one Pallas pass
        from pallas_kernels.kernels import quantize_rows_pallas

        rows += ["", "| M | row quantization of a float input | codes = XLA's | busy µs | span µs | kernels |",
                 "|---|---|---|---|---|---|"]
        for m in ms:
            xs = [jnp.asarray(rng.normal(size=(m, D)), jnp.bfloat16) for _ in range(args.calls)]
            want = np.asarray(mgpu.quantize_rows(xs[0])[0])
            for name, fn in (("xla (mgpu.quantize_rows)", mgpu.quantize_rows),
                             ("pallas (quantize_rows_pallas)", lambda x: quantize_rows_pallas(x, interpret=interpret))):
                same = float(np.mean(np.asarray(fn(xs[0])[0])[:m] == want[:m]))
                many = jax.jit(lambda xs, fn=fn: [fn(x) for x in xs])
                jax.block_until_ready(many(xs))
                busy = span = kern = float("nan")
                if not interpret:
                    import devtime

                    dt = devtime.device_times(lambda: many(xs), runs=3)
                    busy, span, kern = (dt.get(k, float("nan")) / args.calls for k in ("busy_us", "span_us", "kernels"))
                rows.append(f"| {m} | {name} | {same:.4f} | {busy:.2f} | {span:.2f} | {kern:.1f} |")
                print(rows[-1], flush=True)
    if args.prefill_quant:
        ms = []  # no SwiGLU rows
    # SwiGLU before down_proj
    from pallas_kernels import swiglu

    f = 64 if args.small else 14336

    def xla_silu(x, parts):
        y = jnp.sum(x, 0).astype(jnp.bfloat16) if parts else x
        return jax.nn.silu(y[..., :f]) * y[..., f:]

    sw = {"xla_silu": xla_silu,
          "xla_silu_quant": lambda x, parts: quantize_activations_xla(xla_silu(x, parts), block_m=norm.quant_rows(x.shape[-2])),
          "xla_silu_qpallas": lambda x, parts: quantize_activations_pallas(xla_silu(x, parts), interpret=interpret)}
    for cg in chunks:
        sw[f"swiglu_c{cg}"] = lambda x, parts, cg=cg: swiglu.silu_mul_quant_pallas(
            x, jnp.bfloat16, partials=bool(parts), chunk_groups=cg, blocked=False, interpret=interpret)
    for block, nw in [(64, 4), (32, 4), (16, 4), (16, 2), (8, 4), (8, 2)][:1 if args.small else None]:
        sw[f"swiglu_b{block}w{nw}"] = lambda x, parts, block=block, nw=nw: swiglu.silu_mul_quant_pallas(
            x, jnp.bfloat16, partials=bool(parts), blocked=block, num_warps=nw, interpret=interpret)
    if args.row_scale:  # the linear's output only: the row form takes no partials
        from pallas_kernels import mgpu

        sw["xla_silu_qrows"] = lambda x, parts: mgpu.quantize_rows(xla_silu(x, parts))
        for rc, nw in [(8, 4), (4, 4), (16, 4), (16, 8), (32, 8), (128, 8), (128, 16)][:1 if args.small else None]:
            sw[f"swiglu_row{rc}w{nw}"] = lambda x, parts, rc=rc, nw=nw: swiglu.silu_mul_quant_pallas(
                x, jnp.bfloat16, row_scale=True, row_chunk=rc, num_warps=nw, interpret=interpret)
    rows += ["", "| M | partials | SwiGLU variant | codes = reference | busy µs | span µs | kernels | vs xla_silu (span) |",
             "|---|---|---|---|---|---|---|---|"]
    for m in ms:
        for parts in sorted({0, min(8, max(partses))} if max(partses) > 0 else {0}):  # (-1: the norms' only)
            shape = (parts, m, 2 * f) if parts else (m, 2 * f)
            xs = [jnp.asarray(rng.normal(size=shape), jnp.float32 if parts else jnp.bfloat16) for _ in range(args.calls)]
            refs = [swiglu.silu_mul_quant_ref(xs[0], jnp.bfloat16, partials=bool(parts), row_scale=r)
                    for r in (False, True)]
            base = None
            for name, fn in sw.items():
                if parts and "row" in name:
                    continue
                out, ref = fn(xs[0], parts), refs["row" in name]
                same = "-" if name == "xla_silu" else \
                    f"{float(np.mean(np.asarray(out.x_q if hasattr(out, 'x_q') else out[0])[:m] == np.asarray(ref.x_q)[:m])):.4f}"
                many = jax.jit(lambda xs, fn=fn, parts=parts: [fn(x, parts) for x in xs])
                jax.block_until_ready(many(xs))
                if interpret:
                    busy = span = kern = float("nan")
                else:
                    import devtime

                    dt = devtime.device_times(lambda: many(xs), runs=3)
                    busy, span, kern = (dt.get(k, float("nan")) / args.calls for k in ("busy_us", "span_us", "kernels"))
                base = span if name == "xla_silu" else base
                rows.append(f"| {m} | {parts} | {name} | {same} | {busy:.2f} | {span:.2f} | {kern:.1f} | {base / span:.2f}× |")
                print(rows[-1], flush=True)
    table = head + "\n\n" + "\n".join(rows) + "\n"
    if args.out:
        pathlib.Path(args.out).write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
