"""Clipping search: per (row, group), the clip ratio r on a grid over 80–100 % of the range (2 % steps)
that minimises the output error ‖X ΔWᵀ‖² of that group, with H = 2XᵀX.

For one row and one group of columns, ‖X_g Δ_gᵀ‖² = ½·Δ_g H_gg Δ_gᵀ (H_gg the group's diagonal
block of H); cross-group terms are ignored, as in the paper. Ratio 1.0 (no clipping) is in the grid and
wins ties, so the search never does worse than no clipping on this criterion.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mixjax.quant.rtn import dequantize_codes, group_params, quantize_codes


def clip_grid(lo_pct: int = 80, step_pct: int = 2) -> tuple[float, ...]:
    """Ratios from 1.0 down to lo_pct % in step_pct % steps (1.0 first, so it wins ties)."""
    return tuple(float(p) / 100.0 for p in range(100, lo_pct - 1, -step_pct))


def group_hessian_blocks(h: jax.Array, g: int) -> jax.Array:
    """Diagonal blocks [G, g, g] of H [Kp, Kp]."""
    kp = h.shape[0]
    n_groups = kp // g
    hb = h.reshape(n_groups, g, n_groups, g)
    return hb[jnp.arange(n_groups), :, jnp.arange(n_groups), :]  # [G, g, g]


def group_output_error(delta: jax.Array, h_blocks: jax.Array) -> jax.Array:
    """delta [N, G, g], h_blocks [G, g, g] → ½ Δ H Δᵀ per (row, group) [N, G]."""
    return 0.5 * jnp.einsum("ngi,gij,ngj->ng", delta, h_blocks, delta)


def search_clip_ratio(
    wg: jax.Array,  # [N, G, g] f32 (zero-padded)
    mask: jax.Array,  # [G, g]
    h_blocks: jax.Array,  # [G, g, g]
    lo: jax.Array,  # [N]
    hi: jax.Array,  # [N]
    sym: jax.Array,  # [N]
    grid: tuple[float, ...] = clip_grid(),
) -> jax.Array:
    """Best clip ratio [N, G] per (row, group)."""
    wg = wg.astype(jnp.float32)

    def error_for(r):
        scale, zero = group_params(wg, mask, lo, hi, sym, r)
        q = quantize_codes(wg, scale, zero, lo, hi)
        delta = jnp.where(mask, dequantize_codes(q, scale, zero) - wg, 0.0)
        return group_output_error(delta, h_blocks)  # [N, G]

    def step(carry, r):
        best_err, best_r = carry
        err = error_for(r)
        better = err < best_err
        return (jnp.where(better, err, best_err), jnp.where(better, r, best_r)), None

    ratios = jnp.asarray(np.asarray(grid, np.float32))
    err0 = error_for(ratios[0])
    (_, best), _ = jax.lax.scan(step, (err0, jnp.full_like(err0, ratios[0])), ratios[1:])
    return best
