"""Where a prefill call's wall time beyond the device's goes: the host's side of one call, from a profiler trace.

Session 20 measured (H200, Llama-3-8B shape, 256 tokens): W4.4A8 14.0 ms a call blocked on, 11.3 ms when calls
queue back to back, 10.8 ms device span; bf16 9.0 / 8.0 / 7.9. The quantized model loses about 3 ms before
its first kernel or after its last, bf16 about 1. This traces one blocked call after warm-up and prints the
host events (TraceMe: jit dispatch, PjRt execute, thunk initialisation and launches) on a timeline that starts
at the call's first host event, beside the first and last GPU kernel, plus the host events by total time.

    python benchmarks/probe_host.py --variant w4.4a8+h4 --prefill-len 256
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import sys
import tempfile

import jax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_generate  # noqa: E402


def trace_planes(fn):
    jax.block_until_ready(fn())
    jax.block_until_ready(fn())
    with tempfile.TemporaryDirectory() as d:
        jax.profiler.start_trace(d)
        try:
            jax.block_until_ready(fn())
        finally:
            jax.profiler.stop_trace()
        path = glob.glob(os.path.join(d, "**", "*.xplane.pb"), recursive=True)[0]
        data = jax.profiler.ProfileData.from_file(path)
        host, gpu = [], []
        for plane in data.planes:
            for line in plane.lines:
                for ev in line.events:
                    if plane.name.startswith("/device:GPU") and line.name.startswith("Stream"):
                        gpu.append((ev.start_ns, ev.duration_ns, ev.name))
                    elif plane.name.startswith("/host"):
                        host.append((ev.start_ns, ev.duration_ns, ev.name, line.name))
        return host, gpu


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="w4.4a8+h4")
    p.add_argument("--prefill-len", type=int, default=256)
    p.add_argument("--small", action="store_true")
    p.add_argument("--min-us", type=float, default=30.0, help="timeline: host events at least this long")
    a = p.parse_args()
    args = bench_generate.parse_args(["--variants", a.variant, "--prefill-len", str(a.prefill_len), "--batches", ""]
                                     + (["--small"] if a.small else []))
    cfg = bench_generate.SMALL if a.small else bench_generate.LLAMA3_8B
    params = bench_generate.build_variant(a.variant, cfg, args, lambda row: None)
    n = a.prefill_len
    step, tokens = bench_generate.prefill_step(params, cfg, args)
    host, gpu = trace_planes(lambda: step(params, tokens))
    print(f"device {jax.devices()[0].device_kind}, jax {jax.__version__}, {a.variant}, prefill {n}, "
          f"{len(jax.tree.leaves(params))} param leaves")
    if not host:
        print("no host events in the trace")
        return 1
    t0 = min(s for s, *_ in host)
    if gpu:
        first, last = min(s for s, *_ in gpu), max(s + d for s, d, _ in gpu)
        print(f"GPU: {len(gpu)} kernels, first starts at {(first - t0) / 1e3:.1f} µs, last ends at "
              f"{(last - t0) / 1e3:.1f} µs; host events end at {max(s + d for s, d, *_ in host) / 1e3 - t0 / 1e3:.1f} µs")
    print("\nhost timeline (µs from the first host event; events ≥ --min-us):")
    shown = 0
    for s, d, name, line in sorted(host):
        if d >= a.min_us * 1e3 and shown < 80:
            print(f"  {(s - t0) / 1e3:9.1f} +{d / 1e3:9.1f}  [{line[:18]}] {name[:110]}")
            shown += 1
    total, count = collections.Counter(), collections.Counter()
    for _, d, name, _ in host:
        key = name.split("(")[0][:70]
        total[key] += d
        count[key] += 1
    print("\nhost events by total time (µs, count):")
    for key, d in total.most_common(30):
        print(f"  {d / 1e3:9.1f} ×{count[key]:<5d} {key}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
