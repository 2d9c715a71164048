"""Cutting one `MixedWeight` into per-device parts for tensor parallelism (`mixjax.parallel.shard_model`).

Every part of one weight must have the same static metadata (n, k, n8) and the same array shapes, so that the
parts stack on a leading device axis and one `shard_map` program serves every device.

- Along N (output channels: q/k/v, gate/up): part d holds channels [d·N/P, (d+1)·N/P). The parts' 8-bit
  channel counts differ, so each part with fewer 8-bit channels than the most has some of its 4-bit channels
  re-stored as 8-bit rows: (u − z)·s is exactly q·s with q = u − z ∈ [−15, 15] and the same scale, so the
  weight's values, and the kernels' integer products, do not change (a 4-bit row becomes a 1-byte row).
- Along K (input features: o, down): part d holds groups [d·G/P, (d+1)·G/P) of every row, K/P a multiple of
  128. A group's bytes are contiguous in `q4` (byte j holds k = 128g + j and 128g + 64 + j), so slicing the
  code, scale and zero arrays by groups gives a valid `MixedWeight` with the same channel layout.
"""

from __future__ import annotations

import numpy as np

from pallas_kernels.format import GROUP_SIZE, MixedWeight, pack_mixed, unpack_nibbles


def channel_codes(qw: MixedWeight) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The inverse of `pack_mixed`: (q int32 [N, Kp], scale f32 [N, G], zero int32 [N, G], is_int8 bool [N])."""
    qw = qw.untiled()
    n8p = qw.q8.shape[0]
    q8, q4 = np.asarray(qw.q8, np.int32), np.asarray(unpack_nibbles(qw.q4))  # [N8p, Kp], [N4p, Kp]
    scales = np.concatenate([np.asarray(qw.scale8).T, np.asarray(qw.scale4).T])  # [N8p + N4p, G]
    zeros = np.concatenate([np.zeros((n8p, qw.num_groups), np.int32), np.asarray(qw.zero4, np.int32).T])
    rows = np.asarray(qw.row_of_channel)
    q = np.concatenate([q8, q4])[rows]
    return q, scales[rows], zeros[rows], rows < n8p


def split_channels(qw: MixedWeight, parts: int) -> list[MixedWeight]:
    """qw's output channels in `parts` equal slices, with equal 8-bit channel counts (see the module docstring)."""
    if qw.n % parts:
        raise ValueError(f"{parts} parts do not divide the weight's {qw.n} output channels")
    q, scale, zero, is_int8 = channel_codes(qw)
    size = qw.n // parts
    slices = [slice(d * size, (d + 1) * size) for d in range(parts)]
    n8 = max(int(is_int8[s].sum()) for s in slices)
    out = []
    for s in slices:
        qs, ss, zs, i8 = q[s].copy(), scale[s], zero[s].copy(), is_int8[s].copy()
        promote = np.flatnonzero(~i8)[: n8 - int(i8.sum())]  # 4-bit channels re-stored as 8-bit rows
        g = qs.shape[1] // GROUP_SIZE
        qs[promote] = (qs[promote].reshape(len(promote), g, GROUP_SIZE) - zs[promote][..., None]).reshape(-1, g * GROUP_SIZE)
        qs[promote, qw.k:] = 0  # the K padding holds zero codes
        zs[promote] = 0
        i8[promote] = True
        out.append(pack_mixed(qs, ss, zs, i8, k=qw.k))
    return out


def split_groups(qw: MixedWeight, parts: int) -> list[MixedWeight]:
    """qw's input features in `parts` equal slices of whole groups of 128 (K / parts a multiple of 128)."""
    qw = qw.untiled()
    if qw.k != qw.k_padded or qw.num_groups % parts:
        raise ValueError(f"in_features {qw.k} must split into {parts} parts of whole groups of {GROUP_SIZE}")
    g = qw.num_groups // parts
    out = []
    for d in range(parts):
        gs = slice(d * g, (d + 1) * g)
        ks, bs = slice(d * g * GROUP_SIZE, (d + 1) * g * GROUP_SIZE), slice(d * g * GROUP_SIZE // 2, (d + 1) * g * GROUP_SIZE // 2)
        out.append(MixedWeight(q8=qw.q8[:, ks], scale8=qw.scale8[gs], q4=qw.q4[:, bs], scale4=qw.scale4[gs],
                               zero4=qw.zero4[gs], channel=qw.channel, row_of_channel=qw.row_of_channel, n=qw.n,
                               k=g * GROUP_SIZE, n8=qw.n8))
    return out
