"""Choosing the 8-bit channels: one global ranking of salience over all channels of all decoder linears.

Budget: `bits` is the average number of weight-code bits per element over all decoder linears
(scales and zero points not counted), in [4, 8]. A channel of a linear with K inputs costs 4·K extra
bits at 8 bits, so the budget is counted in ELEMENTS: channels are taken in descending salience while
Σ 4·K_c ≤ (bits − 4)·E (E = total elements). The achieved average is ≤ `bits` and short of it by
less than 4·K_max/E (the first channel that did not fit). `budget="channels"` counts like the official
code instead: the top ⌊C·(bits − 4)/4⌋ of all C channels, whatever their length (on SmolLM2-135M,
10 % of channels is 12.2 % of elements, i.e. 4.49 bits). `local=True` applies the budget inside
each (layer, linear) instead of globally (the paper's local-selection ablation).
"""

from __future__ import annotations

from typing import Literal

import numpy as np

Budget = Literal["elements", "channels"]


def allocate(
    scores: dict[str, np.ndarray],  # linear name → [L, N] salience
    in_features: dict[str, int],  # linear name → K
    bits: float,
    *,
    budget: Budget = "elements",
    local: bool = False,
) -> dict[str, np.ndarray]:
    """Which channels get 8 bits: linear name → bool [L, N]."""
    if not 4.0 <= bits <= 8.0:
        raise ValueError(f"bits={bits} must lie in [4, 8] (average weight bits; 4.4 = MixLLM's default)")
    if budget not in ("elements", "channels"):
        raise ValueError(f"budget={budget!r}; expected 'elements' or 'channels'")
    names = list(scores)
    if local:
        return {n: _local(scores[n], bits) for n in names}
    flat = np.concatenate([scores[n].reshape(-1) for n in names])  # [C]
    cost = np.concatenate([np.full(scores[n].size, in_features[n], np.int64) for n in names])  # [C] = K
    order = np.argsort(-flat, kind="stable")
    if budget == "channels":
        take = int(np.floor(flat.size * (bits - 4.0) / 4.0 + 1e-9))
    else:
        allowed = (bits - 4.0) * float(cost.sum()) / 4.0  # elements that may be 8-bit
        take = int(np.searchsorted(np.cumsum(cost[order]), allowed + 1e-6, side="right"))
    chosen = np.zeros(flat.size, bool)
    chosen[order[:take]] = True
    out, start = {}, 0
    for n in names:
        size = scores[n].size
        out[n] = chosen[start : start + size].reshape(scores[n].shape)
        start += size
    return out


def _local(s: np.ndarray, bits: float) -> np.ndarray:
    """Top ⌊N·(bits−4)/4⌋ channels of each layer of one linear (all rows share K: elements = channels)."""
    take = int(np.floor(s.shape[-1] * (bits - 4.0) / 4.0 + 1e-9))
    chosen = np.zeros(s.shape, bool)
    order = np.argsort(-s, axis=-1, kind="stable")[:, :take]
    np.put_along_axis(chosen, order, True, axis=-1)
    return chosen


def average_bits(is_int8: dict[str, np.ndarray], in_features: dict[str, int]) -> float:
    """Average weight-code bits per element over all linears."""
    bits = sum(float(np.sum(np.where(m, 8, 4))) * in_features[n] for n, m in is_int8.items())
    elems = sum(m.size * in_features[n] for n, m in is_int8.items())
    return bits / elems
