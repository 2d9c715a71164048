"""Concatenating mixed weights along N: one packed weight for linears that share their input.

q/k/v (and gate/up) read the same activations. Run as one GEMM they share one activation quantization and
one launch, and the kernel's grid covers N_q + N_k + N_v rows instead of three small grids — at decode,
where every launch and every partly filled wave shows, that is most of the gain (`mixjax.model.fuse_projections`).

The concatenation keeps each part's packed rows as they are (each part's 8-bit and 4-bit blocks are
already padded to `ROW_ALIGN`), so it is exact: the fused weight computes bit for bit what the parts
compute, in channel order [part 0 channels; part 1 channels; ...]. When every channel of every part is
8-bit, the parts' padding rows are dropped and one padding block ends the result, so that its rows stay in
channel order (`MixedWeight`'s invariant, which the prefill GEMM relies on to skip its unpack pass).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from pallas_kernels.format import GROUP_SIZE, ROW_ALIGN, MixedWeight


def concat_mixed(weights: list[MixedWeight] | tuple[MixedWeight, ...]) -> MixedWeight:
    """MixedWeights of logical shapes (N_i, K) → one MixedWeight of shape (Σ N_i, K), channels in order."""
    if not weights:
        raise ValueError("concat_mixed: no weights given")
    k, kp = weights[0].k, weights[0].k_padded
    for w in weights:
        if not isinstance(w, MixedWeight):
            raise TypeError(f"concat_mixed: expected MixedWeight parts, got {type(w).__name__}")
        if w.prefill_w is not None:
            raise ValueError("concat_mixed: a part holds its int8 prefill matrix (`with_int8_prefill`); fuse first, "
                             "then add the matrices to the fused weight (`mixjax.model.int8_prefill` after "
                             "`fuse_projections`)")
        if (w.k, w.k_padded) != (k, kp):
            raise ValueError(f"concat_mixed: parts must share in_features; got K={w.k} (padded {w.k_padded}) "
                             f"and K={k} (padded {kp})")
    weights = [w.untiled() for w in weights]  # the result is row-major: tile it again after (`tile_codes`)
    n_total = sum(w.n for w in weights)
    if all(w.n8 == w.n for w in weights):
        return _concat_all_8bit(weights, n_total, k, kp)
    n8p_total = sum(w.q8.shape[0] for w in weights)
    channel, row_of_channel = [], []
    off_n = off8 = off4 = 0
    for w in weights:
        n8p = w.q8.shape[0]
        chan = np.asarray(w.channel)
        chan = np.where(chan < w.n, chan + off_n, n_total)  # padding rows stay out of range
        channel.append((chan[:n8p], chan[n8p:]))
        rows = np.asarray(w.row_of_channel)
        row_of_channel.append(np.where(rows < n8p, rows + off8, rows - n8p + n8p_total + off4))
        off_n, off8, off4 = off_n + w.n, off8 + n8p, off4 + w.q4.shape[0]
    channel = np.concatenate([c8 for c8, _ in channel] + [c4 for _, c4 in channel]).astype(np.int32)

    def cat(name, axis):
        return jnp.concatenate([getattr(w, name) for w in weights], axis=axis)

    return MixedWeight(
        q8=cat("q8", 0), scale8=cat("scale8", 1), q4=cat("q4", 0), scale4=cat("scale4", 1), zero4=cat("zero4", 1),
        channel=jnp.asarray(channel), row_of_channel=jnp.asarray(np.concatenate(row_of_channel).astype(np.int32)),
        n=n_total, k=k, n8=sum(w.n8 for w in weights),
    )


def _concat_all_8bit(weights, n_total: int, k: int, kp: int) -> MixedWeight:
    """All parts 8-bit: their channel rows back to back, one block of zero padding rows at the end."""
    n8p = -(-n_total // ROW_ALIGN) * ROW_ALIGN
    pad = n8p - n_total
    q8 = jnp.concatenate([w.q8[: w.n] for w in weights] + [jnp.zeros((pad, kp), jnp.int8)])
    scale8 = jnp.concatenate([w.scale8[:, : w.n] for w in weights]
                             + [jnp.zeros((kp // GROUP_SIZE, pad), jnp.float32)], axis=1)
    empty = weights[0]  # every part's 4-bit set is empty: [0, Kp/2] codes, [G, 0] scales and zeros
    channel = np.concatenate([np.arange(n_total), np.full(pad, n_total)]).astype(np.int32)
    return MixedWeight(q8=q8, scale8=scale8, q4=empty.q4, scale4=empty.scale4, zero4=empty.zero4,
                       channel=jnp.asarray(channel), row_of_channel=jnp.arange(n_total, dtype=jnp.int32),
                       n=n_total, k=k, n8=n_total)
