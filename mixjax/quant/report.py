"""What a quantization run did: where the 8-bit channels went, salience statistics, time and memory."""

from __future__ import annotations

import dataclasses
import resource
import sys

import jax
import numpy as np


@dataclasses.dataclass(frozen=True)
class QuantReport:
    """Summary of one `mixjax.quantize` run.

    share_by_type: linear name → fraction of its channels (all layers) at 8 bits.
    share_by_layer: [L] fraction of each layer's channels at 8 bits.
    salience_stats: linear name → (mean, median, max) of its channels' salience.
    """

    bits_target: float
    bits_achieved: float
    budget: str
    salience: str
    local: bool
    num_channels: int
    num_int8_channels: int
    share_by_type: dict[str, float]
    share_by_layer: tuple[float, ...]
    salience_stats: dict[str, tuple[float, float, float]]
    seconds: dict[str, float]
    peak_memory_bytes: int
    peak_memory_kind: str
    calib_tokens: int
    head_bits: int | None = None
    weight_bytes: int = 0

    def to_markdown(self) -> str:
        lines = [
            f"- weight bits: target {self.bits_target:.3f}, achieved {self.bits_achieved:.4f} "
            f"(budget counted in {self.budget}; salience {self.salience}, {'local' if self.local else 'global'} selection)",
            f"- 8-bit channels: {self.num_int8_channels} of {self.num_channels} "
            f"({100 * self.num_int8_channels / max(self.num_channels, 1):.2f} %)",
            f"- embedding table / LM head: {HEAD_FORMATS[self.head_bits]}",
            f"- weight bytes: {self.weight_bytes / 1e9:.4g} GB (codes, scales, zeros, indices, norms and biases)",
            f"- calibration tokens: {self.calib_tokens}",
            "- wall time: " + ", ".join(f"{k} {v:.1f} s" for k, v in self.seconds.items()),
            f"- peak memory ({self.peak_memory_kind}): {self.peak_memory_bytes / 2**30:.2f} GiB",
            "",
            "| linear | 8-bit share | salience mean | median | max |",
            "|---|---|---|---|---|",
        ]
        for name, share in self.share_by_type.items():
            mean, med, mx = self.salience_stats.get(name, (float("nan"),) * 3)
            lines.append(f"| {name} | {100 * share:.1f} % | {mean:.3g} | {med:.3g} | {mx:.3g} |")
        lines += ["", "8-bit share per layer: " + " ".join(f"{100 * s:.0f}%" for s in self.share_by_layer)]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_markdown()


HEAD_FORMATS = {None: "float (not quantized)", 8: "int8 symmetric g128 (A8 head)", 4: "int4 asymmetric g128 (A8 head)"}


def weight_bytes(params) -> int:
    """Bytes of every array (or ShapeDtypeStruct) leaf of a params tree, quantized weights included."""
    return int(sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize for a in jax.tree.leaves(params)))


def peak_memory() -> tuple[int, str]:
    """Peak accelerator memory in bytes if the backend reports it (the most any local device reached), else the
    process's peak RSS."""
    devices = jax.local_devices()
    stats = [d.memory_stats() if hasattr(d, "memory_stats") else None for d in devices]
    peaks = [int(st["peak_bytes_in_use"]) for st in stats if st and "peak_bytes_in_use" in st]
    if peaks:
        return max(peaks), f"{devices[0].platform} device" + (f", the most of {len(peaks)}" if len(peaks) > 1 else "")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024), "host RSS"


def build_report(*, is_int8, scores, in_features, bits_target, bits_achieved, budget, salience, local,
                 seconds, calib_tokens, head_bits=None, weight_bytes=0) -> QuantReport:
    names = list(is_int8)
    n_layers = next(iter(is_int8.values())).shape[0]
    per_layer = np.zeros(n_layers)
    per_layer_total = np.zeros(n_layers)
    for m in is_int8.values():
        per_layer += m.sum(-1)
        per_layer_total += m.shape[-1]
    stats = {}
    if scores is not None:
        stats = {n: (float(np.mean(s)), float(np.median(s)), float(np.max(s))) for n, s in scores.items()}
    peak, kind = peak_memory()
    return QuantReport(
        bits_target=float(bits_target),
        bits_achieved=float(bits_achieved),
        budget=budget,
        salience=salience,
        local=local,
        num_channels=int(sum(m.size for m in is_int8.values())),
        num_int8_channels=int(sum(m.sum() for m in is_int8.values())),
        share_by_type={n: float(is_int8[n].mean()) for n in names},
        share_by_layer=tuple(float(x) for x in per_layer / per_layer_total),
        salience_stats=stats,
        seconds=dict(seconds),
        peak_memory_bytes=peak,
        peak_memory_kind=kind,
        calib_tokens=int(calib_tokens),
        head_bits=head_bits,
        weight_bytes=int(weight_bytes),
    )
