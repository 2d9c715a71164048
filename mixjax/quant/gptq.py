"""GPTQ for one linear, rows in mixed int4/int8 formats, block = quantization group.

Given w [N, K] and H = 2·XᵀX [K, K] from the calibration inputs X of that linear, columns are
quantized one at a time and each column's rounding error is pushed onto the not-yet-quantized
columns through the upper Cholesky factor of H⁻¹ (Frantar et al., 2022). Details:

- damping: H += damp · mean(diag H) · I (damp = 0.01);
- columns whose input never fired (diag H = 0) and the zero padding up to a multiple of the group get
  H_ii = 1 and receive no error;
- block = group: each group's scales/zeros are fixed from the (already error-updated) weights when the
  group starts, optionally with the clipping search of `clip.py` on that group's H block;
- group reorder: groups (not single columns) are processed by descending sum of diag H, so every
  group stays contiguous and no column index is stored;
- mixed formats: GPTQ is independent across rows (every row sees the same H), so running it once with
  per-row int4/int8 codes gives exactly what running it separately on the 4-bit and the 8-bit subsets
  gives.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from mixjax.quant.clip import clip_grid, group_hessian_blocks, search_clip_ratio
from mixjax.quant.rtn import (
    QuantizedRows,
    WeightFormat,
    dequantize_codes,
    group_params,
    quantize_codes,
    quantize_rows,
    row_ranges,
    to_groups,
)


def prepare_hessian(h: jax.Array, k: int, kp: int, damp: float) -> jax.Array:
    """Pads H [K, K] to [Kp, Kp], sets dead/padded diagonal entries to 1, adds damping."""
    h = jnp.pad(h.astype(jnp.float32), ((0, kp - k), (0, kp - k)))
    diag = jnp.diagonal(h)
    dead = diag <= 0
    mean_diag = jnp.sum(jnp.where(dead, 0.0, diag)) / jnp.maximum(jnp.sum(~dead), 1)
    h = jnp.where(jnp.eye(kp, dtype=bool) & dead[:, None], 1.0, h)
    return h + damp * mean_diag * jnp.eye(kp, dtype=jnp.float32)


def inverse_cholesky_upper(h: jax.Array) -> jax.Array:
    """Upper U with H⁻¹ = Uᵀ U."""
    chol = jnp.linalg.cholesky(h)
    eye = jnp.eye(h.shape[0], dtype=h.dtype)
    h_inv = jax.scipy.linalg.cho_solve((chol, True), eye)
    h_inv = 0.5 * (h_inv + h_inv.T)
    return jnp.linalg.cholesky(h_inv).T


@functools.partial(jax.jit, static_argnames=("fmt", "damp", "reorder", "clip", "grid"))
def gptq_quantize(
    w: jax.Array,  # [N, K]
    h: jax.Array,  # [K, K] = 2·XᵀX (sum over calibration tokens)
    is_int8: jax.Array,  # [N] bool
    *,
    fmt: WeightFormat = WeightFormat(),
    damp: float = 0.01,
    reorder: bool = True,
    clip: bool = False,
    grid: tuple[float, ...] = clip_grid(),
) -> QuantizedRows:
    n, k = w.shape
    g, kp = fmt.group(k), fmt.padded_k(k)
    n_groups = kp // g
    lo, hi, sym = row_ranges(is_int8, fmt.symmetric4)
    h_undamped = jnp.pad(h.astype(jnp.float32), ((0, kp - k), (0, kp - k)))
    hd = prepare_hessian(h, k, kp, damp)
    valid = jnp.arange(kp) < k  # [Kp]

    group_order = jnp.argsort(-jnp.diagonal(h_undamped).reshape(n_groups, g).sum(-1)) if reorder else jnp.arange(n_groups)
    perm = (group_order[:, None] * g + jnp.arange(g)[None, :]).reshape(-1)  # [Kp] new → old column
    wp = jnp.pad(w.astype(jnp.float32), ((0, 0), (0, kp - k)))[:, perm]  # [N, Kp]
    u = inverse_cholesky_upper(hd[perm][:, perm])  # [Kp, Kp]
    h_perm = h_undamped[perm][:, perm]
    valid_p = valid[perm]

    def do_group(i, carry):
        wcur, q_all, scales, zeros = carry
        i1 = i * g
        w1 = jax.lax.dynamic_slice(wcur, (0, i1), (n, g))  # [N, g]
        u1 = jax.lax.dynamic_slice(u, (i1, i1), (g, g))  # [g, g]
        m1 = jax.lax.dynamic_slice(valid_p, (i1,), (g,))  # [g]
        wg = w1[:, None, :]  # [N, 1, g]
        if clip:
            h1 = jax.lax.dynamic_slice(h_perm, (i1, i1), (g, g))[None]  # [1, g, g]
            ratio = search_clip_ratio(wg, m1[None], h1, lo, hi, sym, grid)  # [N, 1]
        else:
            ratio = 1.0
        scale, zero = group_params(wg, m1[None], lo, hi, sym, ratio)  # [N, 1]

        def do_col(j, c):
            w1, q1, err1 = c
            col = jax.lax.dynamic_slice(w1, (0, j), (n, 1))  # [N, 1]
            qc = quantize_codes(col[:, None, :], scale, zero, lo, hi)  # [N, 1, 1]
            deq = dequantize_codes(qc, scale, zero)[:, 0, :]  # [N, 1]
            e = (col - deq) / u1[j, j]
            w1 = w1 - e * jnp.where(jnp.arange(g) > j, u1[j], 0.0)[None, :]
            q1 = jax.lax.dynamic_update_slice(q1, qc[:, 0, :], (0, j))
            err1 = jax.lax.dynamic_update_slice(err1, e, (0, j))
            return w1, q1, err1

        init = (w1, jnp.zeros((n, g), jnp.int32), jnp.zeros((n, g), jnp.float32))
        _, q1, err1 = jax.lax.fori_loop(0, g, do_col, init)
        rows = jax.lax.dynamic_slice(u, (i1, 0), (g, kp))  # [g, Kp]
        later = jnp.arange(kp) >= i1 + g
        wcur = wcur - jnp.where(later[None, :], err1 @ rows, 0.0)
        q_all = jax.lax.dynamic_update_slice(q_all, jnp.where(m1[None], q1, 0), (0, i1))
        scales = jax.lax.dynamic_update_slice(scales, scale, (0, i))
        zeros = jax.lax.dynamic_update_slice(zeros, zero, (0, i))
        return wcur, q_all, scales, zeros

    init = (wp, jnp.zeros((n, kp), jnp.int32), jnp.zeros((n, n_groups), jnp.float32), jnp.zeros((n, n_groups), jnp.int32))
    _, q_p, s_p, z_p = jax.lax.fori_loop(0, n_groups, do_group, init)
    inv_perm = jnp.argsort(perm)
    inv_group = jnp.argsort(group_order)
    return QuantizedRows(
        q=q_p[:, inv_perm].astype(jnp.int8),
        scale=s_p[:, inv_group],
        zero=z_p[:, inv_group].astype(jnp.int8),
        is_int8=is_int8,
        k=k,
    )


@functools.partial(jax.jit, static_argnames=("fmt", "grid"))
def rtn_clip_quantize(w, h, is_int8, *, fmt: WeightFormat = WeightFormat(), grid=clip_grid()) -> QuantizedRows:
    """RTN with the clipping search (no error propagation)."""
    n, k = w.shape
    kp = fmt.padded_k(k)
    wg, mask = to_groups(w.astype(jnp.float32), fmt)
    lo, hi, sym = row_ranges(is_int8, fmt.symmetric4)
    hp = jnp.pad(h.astype(jnp.float32), ((0, kp - k), (0, kp - k)))
    ratio = search_clip_ratio(wg, mask, group_hessian_blocks(hp, fmt.group(k)), lo, hi, sym, grid)
    return quantize_rows(w, is_int8, fmt, ratio)
