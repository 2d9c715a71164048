"""Device-side kernel times from a JAX profiler trace (CUPTI on NVIDIA GPUs), no extra packages.

`device_times(fn, runs)` runs `fn()` `runs` times under `jax.profiler.trace`, reads the XSpace back with
`jax.profiler.ProfileData` and returns, per run: the summed kernel durations on the GPU ("busy"), the
span from the first kernel's start to the last kernel's end ("span": busy + the gaps between launches),
the number of kernels, and the top kernels by time. Wall-clock timing of many small launches mostly
measures launch gaps; busy time is what a kernel itself costs, span what the device sat through.
"""

from __future__ import annotations

import collections
import glob
import os
import tempfile
from typing import Callable

import jax

HOST_GAP_NS = 200_000  # an idle gap this long is the host between two runs, not a launch gap


def _gpu_events(xspace_path: str):
    data = jax.profiler.ProfileData.from_file(xspace_path)
    events = {}
    lines_seen = collections.Counter()
    for plane in data.planes:
        if not plane.name.startswith("/device:GPU"):
            continue
        for line in plane.lines:
            lines_seen[f"{plane.name} | {line.name}"] += 1
            if not line.name.startswith("Stream"):  # derived lines ("XLA Ops", ...) repeat the kernels
                continue
            for ev in line.events:
                events[(ev.start_ns, ev.name)] = ev.duration_ns  # a kernel listed on two stream lines counts once
    return events, lines_seen


def trace_events(fn: Callable[[], object], runs: int):
    """GPU kernel events {(start ns, name): duration ns} and the trace lines seen, of `runs` calls of `fn()`
    after a warm-up call; or an error string when the profiler wrote no trace."""
    jax.block_until_ready(fn())  # compiled and warm before the trace
    with tempfile.TemporaryDirectory() as d:
        jax.profiler.start_trace(d)
        try:
            for _ in range(runs):
                jax.block_until_ready(fn())
        finally:
            jax.profiler.stop_trace()
        paths = glob.glob(os.path.join(d, "**", "*.xplane.pb"), recursive=True)
        if not paths:
            return "the profiler wrote no .xplane.pb"
        return _gpu_events(paths[0])


def device_times(fn: Callable[[], object], runs: int = 3, *, top: int = 8) -> dict:
    """Per-run device busy µs, span µs, kernel count and top kernels of `fn()` (results blocked on)."""
    traced = trace_events(fn, runs)
    if isinstance(traced, str):
        return {"error": traced}
    events, lines_seen = traced
    if not events:
        return {"error": "no GPU kernel events in the trace (CUPTI unavailable?)", "lines": dict(lines_seen)}
    spans = sorted((s, s + d) for (s, _), d in events.items())
    span, (first, last) = 0, spans[0]
    for start, end in spans[1:]:  # merge, leaving out host gaps between the runs (> HOST_GAP_NS)
        if start - last > HOST_GAP_NS:
            span += last - first
            first = start
        last = max(last, end)
    span += last - first
    by_name, calls = collections.Counter(), collections.Counter()
    for (_, name), dur in events.items():
        by_name[name] += dur
        calls[name] += 1
    return {
        "busy_us": sum(events.values()) / 1e3 / runs,
        "span_us": span / 1e3 / runs,
        "kernels": len(events) / runs,
        "top": [(name[:80], dur / 1e3 / runs) for name, dur in by_name.most_common(top)],
        "top_calls": [calls[name] / runs for name, _ in by_name.most_common(top)],  # launches per run, as "top"
    }


def write_table(head: str, rows: list[str], out: str | None) -> str:
    """A probe's markdown: its header line, a blank line, the table rows; printed, and written to `out` if given."""
    text = head + "\n\n" + "\n".join(rows) + "\n"
    print(text)
    if out:
        with open(out, "w") as f:
            f.write(text)
    return text
