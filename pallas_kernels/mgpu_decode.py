"""Decode on Hopper through Mosaic GPU: the packed weight streamed by TMA, int4 unpacked in registers.

Why: at decode (a few activation rows) the GEMM is a stream of the packed weight, so its speed is the
fraction of DRAM bandwidth it sustains. The Pallas-Triton kernel stalls on the small per-group operands
(scales, zeros), which Triton loads with plain loads in the iteration that uses them
(benchmarks/NOTES-kernels.md, items 13–14). Here every operand of a K step — weight tile, weight scales
and zeros, activation codes, scales and sums — travels in the same TMA stage of a warp-specialised
pipeline (one warpgroup issues the copies, `wgs` compute warpgroups of 64 weight rows consume them).

Swapped operands (y.T = W · x.T): the weight rows are the wgmma's M side (64 rows per warpgroup), the
few activation rows its N side (`cols` = M rounded up to 8, at most 64), so no MMA work is spent on
padding rows of the activations. Per quantization group of 128 along K, for one warpgroup's 64 rows:

- 4-bit rows: the packed tile [64, 64] (byte j holds k = j in its low nibble and k = 64 + j in its high
  nibble, each the signed value u − 8; `format` docstring) is loaded from shared memory into registers
  in the wgmma A-fragment layout for 8-bit operands. Mosaic GPU has no 8-bit shifts, so the unpack uses
  bitwise ops only: (b & 15) ^ 8 = u_lo, b & -16 = 16·(u_hi − 8). Three wgmmas with A from registers:
  P1 = Σ_lo x·u_lo + Σ_hi 8·x (the second against a constant 8), P2 = Σ_hi x·16(u_hi − 8); then
  Σ_k x·(u − z) = P1 + P2/16 − z·Σx, with Σx per (token, group) from the activation quantization.
- 8-bit rows: the int8 tile [64, 128] is the wgmma's A operand straight from shared memory.
- then, in f32 (two-step dequantization): acc += (P1 + P2/16) · (s_w ⊗ s_a) − (s_w z) ⊗ (s_a Σx).
- `DecodeConfig(fold=True)` (session 19, not yet timed): both zero-point terms, 8·Σ_hi x and z·Σx, are
  rank one per group, so they leave the kernel: two wgmmas a group (no constant-8 one), no zero or code-sum
  copies, acc += (P1 + P2/16)·(s_w ⊗ s_a); `zero_point_terms` adds Σ_g s_w s_a (8·Σ_hi x − z·Σx) after it as
  two [R, G] × [G, cols] products.

Short prompts (M up to `MAX_SHORT_M`, session 24, prepared, not yet measured): the activation rows come in column
tiles of `DecodeConfig.tile_cols` (≤ 128: two int32 partials and the f32 accumulator of 64 × 128 fit a compute
thread's registers), a third grid axis. Every column tile unpacks its weight tile in registers again, so the
packed weight is read once per column tile (mostly from L2, the column tiles of a weight tile run side by side)
and no int8 copy of it is written first, the pass that costs the Mosaic GPU prefill path ≈ 3.1 ms of every
Llama-3-8B prompt (NOTES-kernels.md item 84). Pipeline stages beyond what fits shared memory are cut.

Split-K across the grid: CTA (tile, split) covers G / split groups and writes an f32 partial
[split, rows, cols]; `mixed_matmul_mgpu_decode` sums the partials, gathers rows into channel order and
transposes in one XLA fusion. `gps` groups per pipeline step issue all their wgmmas before one wait.

Measured (H100, jax 0.11.2, session 5, results/kernels.md): correct on the device; 23–25 µs per call at
M = 1 on 4096×14336 and 14336×4096, against 21–22 µs for the Triton GEMV path and 44–46 µs for XLA's bf16
dot, so `api` does not dispatch to it yet. Nsight Compute: 50 % of DRAM bandwidth, the compute
warpgroups spend their time on the per-step chain (barrier wait, fragment load, wgmma, wait, rescale)
rather than on bytes — the reason for `gps`. From M = 64 it beat the Triton kernel on 2 of 3 shapes.

Requires an sm_90 GPU; on CPU it runs in Mosaic GPU interpret mode (`interpret=True`), where the
register-A wgmma and the layouts are replaced by the same products in XLA (the tests' CPU twin).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.format import GROUP_SIZE, HALF_GROUP, MixedWeight, QuantizedActivations, _round_up
from pallas_kernels.mgpu import QUANT_ROWS, _SMEM_BYTES, _interpret_params, _load_vector, _num_sms, _with_layout

TILE_ROWS = 64  # weight rows per CTA: the wgmma M
MAX_COLS = 64  # activation rows one call takes (wgmma N; the accumulators stay small in registers)
MAX_TILE_COLS = 128  # activation rows a CTA takes when they come in column tiles (`rows_matmul(col_tiles=...)`)
_SWIZZLE = 64  # bytes: one half group (64 int8) per swizzle span
_HALF_TRANSFORMS = (plgpu.TilingTransform((8, _SWIZZLE)), plgpu.SwizzleTransform(_SWIZZLE))


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """stages: TMA stages in flight per CTA; split: K splits over the grid (None: `_pick_split`);
    ctas: the number of CTAs `_pick_split` aims for (None: one per SM); wgs: compute warpgroups per CTA
    (64 weight rows each; one more warpgroup issues the copies); gps: quantization groups per pipeline
    step (all their wgmmas are issued before one wait); fold: the 4-bit rows' zero-point terms
    (8·Σ_hi x − z·Σx, both rank-one per group) leave the kernel for one small XLA product after it, so a
    group costs two wgmmas instead of three and no zero or code-sum copies (`rows_matmul`); tile_cols: activation
    rows a CTA takes when M > `MAX_COLS` (short prompts, `col_tiles`; a multiple of 32 up to `MAX_TILE_COLS`).
    Defaults: the best of the H100 sweeps (session 5,
    calls 3–4). Session 6 (H100): gps = 2 is correct and within ±7 % of gps = 1 (22.7–24.7 vs 23.2–25.4 µs
    at M = 1); gps = 4 needs more shared memory than the H100 has at 4–6 stages."""

    stages: int = 6
    split: int | None = None
    ctas: int | None = None
    wgs: int = 2
    gps: int = 1
    fold: bool = False
    tile_cols: int = 128

    def __post_init__(self):
        if self.stages < 1:
            raise ValueError(f"DecodeConfig: stages={self.stages} must be ≥ 1")
        if self.split is not None and self.split < 1:
            raise ValueError(f"DecodeConfig: split={self.split} must be ≥ 1")
        if self.wgs not in (1, 2):
            raise ValueError(f"DecodeConfig: wgs={self.wgs} must be 1 or 2")
        if self.gps not in (1, 2, 4):
            raise ValueError(f"DecodeConfig: gps={self.gps} must be 1, 2 or 4")
        if self.tile_cols not in (32, 64, 128) or self.tile_cols > MAX_TILE_COLS:
            # a power of two: the activation quantization's Triton blocks need one (96 failed on the H200)
            raise ValueError(f"DecodeConfig: tile_cols={self.tile_cols} must be 32, 64 or 128 (≤ {MAX_TILE_COLS})")


DEFAULT_DECODE_CONFIG = DecodeConfig()


def _pick_split(tiles: int, groups: int, ctas: int, gps: int = 1) -> int:
    """The largest divisor of `groups` keeping tiles·split ≤ ctas, whole steps of `gps` groups and ≥ 4
    steps per split (split 1 always fits when gps divides groups)."""
    fits = [d for d in range(1, groups + 1)
            if groups % d == 0 and (groups // d) % gps == 0 and tiles * d <= max(ctas, tiles)
            and (groups // d >= 4 * gps or d == 1)]
    return max(fits)


def _plan(rows: int, groups: int, config: "DecodeConfig", ctas: int, col_tiles: int = 1) -> tuple[int, int]:
    """(split, gps) for one channel set: the configured groups per step where they divide the groups
    (else 1), and the split `_pick_split` finds for them (each row tile counted once per column tile)."""
    gps = config.gps if groups % config.gps == 0 else 1
    tiles = rows // (config.wgs * TILE_ROWS) * col_tiles
    split = config.split or _pick_split(tiles, groups, ctas, gps)
    return split, gps


def _cols(m: int) -> int:  # wgmma N for m activation rows
    return max(8, _round_up(m, 8))


def _act_rows(cols: int) -> int:  # rows of the quantized activations (scale rows of ≥ 128 bytes)
    return _round_up(cols, 32)


def rows_matmul(x_q: jax.Array, a_scale: jax.Array, x_sum: jax.Array, w: jax.Array, w_scale: jax.Array,
                zero: jax.Array | None, *, cols: int, split: int, stages: int = DEFAULT_DECODE_CONFIG.stages,
                wgs: int = DEFAULT_DECODE_CONFIG.wgs, gps: int = 1, fold: bool = False, col_tiles: int = 1,
                interpret: bool = False) -> jax.Array:
    """One channel set of a MixedWeight times the first `cols`·`col_tiles` activation rows → f32
    [split, R, cols·col_tiles].

    col_tiles > 1 (short prompts): the grid gets a third axis, CTA (c, tile, split) taking activation rows
    [c·cols, (c + 1)·cols); each CTA unpacks its weight tile in registers again, so the packed weight is read
    by the column tiles of a row tile (mostly from L2) instead of being unpacked to an int8 copy first.
    cols is then a multiple of 32 up to `MAX_TILE_COLS` (its scale copies are whole multiples of 128 bytes).

    fold (4-bit rows): the kernel accumulates Σ_g s_w·s_a·Σ_k x·(u − 8 on the high nibble only), i.e.
    without 8·Σ_hi x − z·Σx; `zero_point_terms` is what the caller adds to the split sum.

    x_q int8 [Mp, Kp] (Mp ≥ cols, a multiple of 32), a_scale f32 [G, Mp], x_sum int32 [G, Mp] (Σ of each group's codes);
    w int8 [R, Kp] (8-bit codes, zero None) or int8 [R, Kp/2] (packed 4-bit, zero int8 [G, R]);
    w_scale f32 [G, R]. The sum over the first axis is y.T restricted to these rows (packed row order)."""
    mp, kp = x_q.shape
    g = kp // GROUP_SIZE
    r = w.shape[0]
    four = zero is not None
    if x_q.dtype != jnp.int8 or w.dtype != jnp.int8:
        raise TypeError(f"rows_matmul: x_q and w must be int8, got {x_q.dtype}, {w.dtype}")
    if w.shape[1] != (kp // 2 if four else kp) or kp % GROUP_SIZE:
        raise ValueError(f"rows_matmul: w {w.shape} does not match x_q {x_q.shape} ({'4' if four else '8'}-bit)")
    if col_tiles < 1 or (col_tiles > 1 and (cols % 32 or not 32 <= cols <= MAX_TILE_COLS)):
        raise ValueError(f"rows_matmul: col_tiles={col_tiles} must be ≥ 1, and with more than one, cols={cols} a "
                         f"multiple of 32 up to {MAX_TILE_COLS}")
    if cols % 8 or not 8 <= cols <= MAX_TILE_COLS or cols * col_tiles > mp:
        raise ValueError(f"rows_matmul: cols={cols} must be a multiple of 8 in [8, {MAX_TILE_COLS}] and "
                         f"cols·col_tiles = {cols * col_tiles} at most Mp={mp}")
    if mp % 32:
        raise ValueError(f"rows_matmul: Mp={mp} must be a multiple of 32 (128-byte copies of the scale rows)")
    if g % split or (g // split) % gps:
        raise ValueError(f"rows_matmul: split={split} must divide the number of groups G={g}, and "
                         f"gps={gps} (groups per pipeline step) the groups of a split")
    if a_scale.shape != (g, mp) or x_sum.shape != (g, mp) or w_scale.shape != (g, r):
        raise ValueError(f"rows_matmul: scales must be [G, Mp] = {(g, mp)} and [G, R] = {(g, r)}, got "
                         f"{a_scale.shape}, {x_sum.shape}, {w_scale.shape}")
    if four and zero.shape != (g, r):
        raise ValueError(f"rows_matmul: zero must be [G, R] = {(g, r)}, got {zero.shape}")
    gs = g // split  # groups per CTA
    if interpret:  # the CPU interpreter can deadlock with 3 simulated warpgroups on 2 cores; the math is per row
        wgs = 1
    cta_rows = wgs * TILE_ROWS
    zero_rows = 2 * TILE_ROWS  # rows per copy of the int8 zeros (128 bytes)
    if r % cta_rows or (four and r % zero_rows):
        raise ValueError(f"rows_matmul: R={r} must be a multiple of {max(cta_rows, zero_rows if four else 0)} "
                         f"(wgs={wgs} warpgroups of {TILE_ROWS} rows; the format pads to 128)")
    tiles = r // cta_rows
    span = mp if col_tiles == 1 else cols  # activation scale and sum columns a CTA copies each step
    row_layout = plgpu.Layout.WGMMA.reduce(1)  # a value per weight row (the accumulator's dim 0)
    col_layout = plgpu.Layout.WGMMA.reduce(0)  # a value per activation row

    def group_partials(x_ref, w_ref):
        """int32 [64, cols] partials (P1, P2) of each of the step's `gps` groups; all wgmmas are issued
        before the one wait. x_ref [cols, gps·128]; w_ref this warpgroup's rows, [64, gps·64] packed 4-bit
        or [64, gps·128] 8-bit. 8-bit: P1 = Σ_k w·x, P2 None. 4-bit, from the packed bytes b with bitwise
        ops only (Mosaic GPU has no 8-bit shifts): u_lo = (b & 15) ^ 8 (the low nibble's code),
        b & -16 = 16·(u_hi − 8) (the high nibble's signed value, in place), so
        P1 = Σ_lo x·u_lo + 8·Σ_hi x (a third wgmma against a constant 8), P2 = 16·Σ_hi x·(u_hi − 8),
        and Σ_k x·(u − z) = P1 + P2/16 − z·Σx."""
        def half(ref, i):  # columns [64·i, 64·i + 64): half i % 2 of group i // 2 (or packed group i)
            return ref.at[:, pl.ds(i * HALF_GROUP, HALF_GROUP)]

        if four and not fold:  # the A operand of the Σ_hi 8·x wgmma, shared by the step's groups
            eight = _with_layout(jnp.full((TILE_ROWS, HALF_GROUP), 8, jnp.int8), plgpu.Layout.WGMMA_8BIT,
                                 interpret)
        ops = []  # per group: [(accumulator index, A operand, x half ref)]
        for j in range(gps):
            x_lo, x_hi = half(x_ref, 2 * j), half(x_ref, 2 * j + 1)
            if four:
                w_j = half(w_ref, j)
                b = w_j[...] if interpret else plgpu.load(w_j, (), layout=plgpu.Layout.WGMMA_8BIT)
                a_lo = (b & jnp.int8(15)) ^ jnp.int8(8)  # [64, 64] u_lo ∈ [0, 15]
                a_hi = b & jnp.int8(-16)  # [64, 64] 16·(u_hi − 8)
                ops.append([(2 * j, a_lo, x_lo), (2 * j + 1, a_hi, x_hi)] if fold else
                           [(2 * j, a_lo, x_lo), (2 * j, eight, x_hi), (2 * j + 1, a_hi, x_hi)])
            else:
                ops.append([(j, half(w_ref, 2 * j), x_lo), (j, half(w_ref, 2 * j + 1), x_hi)])
        n_acc = 2 * gps if four else gps
        if interpret:  # the interpreter has no register-A or transposed wgmma: the same integer products
            accs = [jnp.zeros((TILE_ROWS, cols), jnp.int32) for _ in range(n_acc)]
            for group in ops:
                for i, a, x_h in group:
                    a = a if isinstance(a, jax.Array) else a[...]
                    accs[i] = accs[i] + lax.dot_general(a, x_h[...], (((1,), (1,)), ((), ())),
                                                        preferred_element_type=jnp.int32)
        else:
            def mma(*acc_refs):
                for group in ops:
                    for i, a, x_h in group:
                        plgpu.wgmma(acc_refs[i], a, plgpu.transpose_ref(x_h, (1, 0)))
                return [ref[...] for ref in acc_refs]  # the first read waits for all MMAs

            accs = pl.run_scoped(mma, *[plgpu.ACC((TILE_ROWS, cols), jnp.int32)] * n_acc)
        if four:
            return [(accs[2 * j], accs[2 * j + 1]) for j in range(gps)]
        return [(accs[j], None) for j in range(gps)]

    def kernel(x_gmem, sa_gmem, xs_gmem, w_gmem, sw_gmem, *rest, out_smem):
        z_gmem, out_gmem = rest if four else (None, *rest)
        ti, si, ci = lax.axis_index("tile"), lax.axis_index("split"), lax.axis_index("col")
        c0 = ci * cols  # this CTA's first activation row
        wg = lax.axis_index("wg")  # compute warpgroups 0 .. wgs-1; the last one issues the copies
        r0 = ti * cta_rows
        grp = pl.ds(si * gs, gs)
        # this warpgroup's rows of the CTA tile (multiple_of: Mosaic GPU's layout inference must see the
        # dynamic offset is tile-aligned, jax 0.11)
        wg_rows = pl.ds(pl.multiple_of(wg * TILE_ROWS, TILE_ROWS), TILE_ROWS)

        def body(_, x_ref, w_ref, sw_ref, *refs):
            if fold:
                (sa_ref, acc), z_ref, xs_ref = refs, None, None
            else:
                z_ref, sa_ref, xs_ref, acc = refs if four else (None, *refs)
            shape = (TILE_ROWS, cols)
            for j, (p1, p2) in enumerate(group_partials(x_ref, w_ref.at[wg_rows])):
                sw = _load_vector(sw_ref.at[j], wg_rows, row_layout, interpret)  # [64]
                sa = _load_vector(sa_ref.at[j], pl.ds(0, cols), col_layout, interpret)  # [cols]
                scale = lax.broadcast_in_dim(sw, shape, [0]) * lax.broadcast_in_dim(sa, shape, [1])  # s_w ⊗ s_a
                if not four:
                    acc = acc + p1.astype(jnp.float32) * scale
                    continue
                if fold:  # P1 = Σ_lo x·u_lo, P2 = 16·Σ_hi x·(u_hi − 8): exact in f32 (|P| < 2^24)
                    acc = acc + (p1.astype(jnp.float32) + p2.astype(jnp.float32) * (1.0 / 16.0)) * scale
                    continue
                z_rows = pl.ds(pl.multiple_of(r0 % zero_rows + wg * TILE_ROWS, TILE_ROWS), TILE_ROWS)  # in the block
                z = _load_vector(z_ref.at[j], z_rows, row_layout, interpret).astype(jnp.float32)
                xs = _load_vector(xs_ref.at[j], pl.ds(0, cols), col_layout, interpret).astype(jnp.float32)
                p = p1.astype(jnp.float32) + p2.astype(jnp.float32) * (1.0 / 16.0)  # exact: |P| < 2^24
                shift = lax.broadcast_in_dim(sw * z, shape, [0]) * lax.broadcast_in_dim(sa * xs, shape, [1])
                acc = acc + (p * scale - shift)
            return acc

        def compute_context(run):
            acc = run(_with_layout(jnp.zeros((TILE_ROWS, cols), jnp.float32), plgpu.Layout.WGMMA, interpret))
            out_smem[wg] = acc
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(out_smem.at[wg], out_gmem.at[si, pl.ds(r0, cta_rows), pl.ds(c0, cols)].at[wg_rows])
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)

        def spec(shape, transforms=()):  # one block per step along K, rows fixed
            return plgpu.BlockSpec(shape, lambda k: (0, k), transforms=transforms)

        def row_spec(width):  # gps rows of a group-major [G, width] array per step
            return plgpu.BlockSpec((gps, width), lambda k: (k, 0))

        cta = pl.ds(r0, cta_rows)
        group_bytes = HALF_GROUP if four else GROUP_SIZE  # bytes of a weight row per group
        w_k = pl.ds(si * gs * group_bytes, gs * group_bytes)
        # TMA copies are whole multiples of 128 bytes: zeros come as 128-row blocks, activation scales
        # and sums as all Mp (≥ 32) rows
        z_specs, z_args = [], []
        if four and not fold:
            z_specs = [row_spec(zero_rows)]
            z_args = [z_gmem.at[grp, pl.ds((r0 // zero_rows) * zero_rows, zero_rows)]]
        act = pl.ds(0 if col_tiles == 1 else c0, span)  # the scale and sum columns copied
        xs_specs, xs_args = ([], []) if fold else ([row_spec(span)], [xs_gmem.at[grp, act]])
        plgpu.emit_pipeline_warp_specialized(
            body,
            grid=(gs // gps,),
            memory_registers=40,
            in_specs=[spec((cols, gps * GROUP_SIZE), _HALF_TRANSFORMS), spec((cta_rows, gps * group_bytes), _HALF_TRANSFORMS),
                      row_spec(cta_rows), *z_specs, row_spec(span), *xs_specs],
            wg_axis="wg",
            num_compute_wgs=wgs,
            max_concurrent_steps=stages,
            compute_context=compute_context,
        )(x_gmem.at[pl.ds(c0, cols), pl.ds(si * gs * GROUP_SIZE, gs * GROUP_SIZE)], w_gmem.at[cta, w_k],
          sw_gmem.at[grp, cta], *z_args, sa_gmem.at[grp, act], *xs_args)

    out_swizzle = plgpu.find_swizzle(cols * 32)
    out_transforms = (plgpu.TilingTransform((8, out_swizzle // 4)), plgpu.SwizzleTransform(out_swizzle))
    call = plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct((split, r, cols * col_tiles), jnp.float32),
        grid=(col_tiles, tiles, split),  # the column tiles of a weight tile side by side (its reads from L2)
        grid_names=("col", "tile", "split"),
        num_threads=wgs + 1,
        thread_name="wg",
        scratch_types=dict(out_smem=plgpu.SMEM((wgs, TILE_ROWS, cols), jnp.float32, transforms=out_transforms)),
        interpret=_interpret_params() if interpret else None,
    )
    return call(x_q, a_scale, x_sum, w, w_scale, *([zero] if four else []))


def zero_point_terms(x_q: jax.Array, a_scale: jax.Array, x_sum: jax.Array, w_scale: jax.Array, zero: jax.Array,
                     cols: int) -> jax.Array:
    """What `rows_matmul(fold=True)` leaves out for the 4-bit rows, f32 [R, cols]:
    Σ_g s_w[g, r]·s_a[g, m]·(8·Σ_hi x[m, g] − z[g, r]·Σx[g, m]), Σ_hi over each group's high-nibble half (its
    last 64 columns). Two [R, G] × [G, cols] products in f32."""
    g = a_scale.shape[0]
    x = x_q[:cols].astype(jnp.int32).reshape(cols, g, 2, HALF_GROUP)
    hi = jnp.sum(x[:, :, 1], axis=-1).T  # [G, cols] Σ_hi x
    sa = a_scale[:, :cols]
    eight = (8.0 * hi.astype(jnp.float32)) * sa  # [G, cols]
    zsum = x_sum[:, :cols].astype(jnp.float32) * sa  # [G, cols]
    hp = lax.Precision.HIGHEST
    return (jnp.einsum("gr,gm->rm", w_scale, eight, precision=hp)
            - jnp.einsum("gr,gm->rm", w_scale * zero.astype(jnp.float32), zsum, precision=hp))


MAX_SHORT_M = 1024  # activation rows `mixed_matmul_mgpu_decode` takes in column tiles (short prompts)


def _smem_bytes(cols: int, span: int, wgs: int, gps: int, stages: int, four: bool, fold: bool) -> int:
    """Estimated shared memory of `rows_matmul`: `stages` copies of a step's operands (each buffer rounded up to
    1 KB, the 128-byte swizzle's alignment) and the f32 epilogue tile of every compute warpgroup."""
    def kb(n):
        return -(-n // 1024) * 1024

    rows = wgs * TILE_ROWS
    step = (kb(cols * gps * GROUP_SIZE) + kb(rows * gps * (HALF_GROUP if four else GROUP_SIZE)) + kb(gps * rows * 4)
            + (kb(gps * 2 * TILE_ROWS) if four and not fold else 0) + kb(gps * span * 4)
            + (0 if fold else kb(gps * span * 4)))
    return stages * step + wgs * TILE_ROWS * cols * 4


def _fit_stages(stages: int, **shape) -> int:
    """The most pipeline stages, up to `stages`, whose estimated shared memory fits a CTA (at least 1)."""
    while stages > 1 and _smem_bytes(stages=stages, **shape) > _SMEM_BYTES:
        stages -= 1
    return stages


@functools.partial(jax.jit, static_argnames=("config", "interpret"))
def mixed_matmul_mgpu_decode(x: jax.Array | QuantizedActivations, qw: MixedWeight, *,
                             config: DecodeConfig = DEFAULT_DECODE_CONFIG, interpret: bool = False) -> jax.Array:
    """x [M, K] float → [M, N] x.dtype in channel order: quantize activations, one swapped-operand wgmma kernel
    per channel set (8-bit, 4-bit), partial sums gathered into channel order. M ≤ `MAX_COLS`: one column tile
    (decode); up to `MAX_SHORT_M`: tiles of `config.tile_cols` activation rows (short prompts: the packed
    weight unpacked in registers by every column tile, no int8 copy of it; not yet measured). x may also be
    `QuantizedActivations` from its producer (a norm or SwiGLU kernel at prefill): its codes, scales and sums
    are taken as they are (rows padded to the column tiles if needed)."""
    from pallas_kernels.reference import quantize_activations_ref

    m = x.m if isinstance(x, QuantizedActivations) else x.shape[0]
    dtype = jnp.dtype(x.dtype)
    if not 0 < m <= MAX_SHORT_M:
        raise ValueError(f"mixed_matmul_mgpu_decode: M={m} activation rows; this kernel takes 1..{MAX_SHORT_M}")
    if m <= MAX_COLS:
        cols, col_tiles, rows = _cols(m), 1, _act_rows(_cols(m))
    else:
        cols = config.tile_cols
        col_tiles = -(-m // cols)
        rows = cols * col_tiles
    if isinstance(x, QuantizedActivations):
        if x.x_q.shape[1] != qw.k_padded:
            raise ValueError(f"mixed_matmul_mgpu_decode: codes of {x.x_q.shape[1]} columns for a weight of "
                             f"K = {qw.k_padded} (padded)")
        x_q, sa, x_sum = x.rows(rows if col_tiles == 1 else cols)
    elif interpret:
        x_q, sa = quantize_activations_ref(jnp.pad(x, [(0, rows - m), (0, 0)]))
        x_sum = x_q.astype(jnp.int32).reshape(x_q.shape[0], -1, GROUP_SIZE).sum(-1).T  # [G, Mp]
        sa = sa.T
    else:
        from pallas_kernels.kernels import quantize_activations_pallas

        # column tiles: `mgpu.QUANT_ROWS` rows a program, as before the prefill GEMM (item 77: at 256 rows half the
        # time of 128-row programs); one decode tile (≤ 64 rows) stays one program a group
        x_q, sa, x_sum = quantize_activations_pallas(x, block_m=rows, block_rows=QUANT_ROWS if col_tiles > 1 else None)
    qw = qw.untiled()  # (a row-major read: tiled codes are restored first, a copy)
    g = qw.num_groups
    ctas = config.ctas or _num_sms()
    parts = []
    for w, sw, z in ((qw.q8, qw.scale8, None), (qw.q4, qw.scale4, qw.zero4)):
        if not w.shape[0]:
            continue
        split, gps = _plan(w.shape[0], g, config, ctas, col_tiles)
        fold = config.fold and z is not None
        stages = config.stages if col_tiles == 1 else _fit_stages(  # 128 columns: fewer stages fit
            config.stages, cols=cols, span=cols, wgs=1 if interpret else config.wgs, gps=gps, four=z is not None,
            fold=fold)
        part = rows_matmul(x_q, sa, x_sum, w, sw, z, cols=cols, split=split, stages=stages,
                           wgs=config.wgs, gps=gps, fold=fold, col_tiles=col_tiles, interpret=interpret)
        part = part.sum(0)  # [R, cols·col_tiles]
        parts.append(part + zero_point_terms(x_q, sa, x_sum, sw, z, cols * col_tiles) if fold else part)
    y = jnp.concatenate(parts) if len(parts) > 1 else parts[0]  # [N8p + N4p, cols·col_tiles], packed row order
    return y[qw.row_of_channel, :m].T.astype(dtype)
