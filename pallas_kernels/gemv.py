"""Decode GEMV for one activation row (`api` sends M = 1 here): integer dot products on the CUDA cores.

At M = 1 the MMA kernel (`kernels.py`) pads the activation to a 16-row tile: 15/16 of its tensor-core work
and of its per-group f32 rescale tile are padding, and it needs a separate activation-quantization launch.
This kernel reads the same packed weight (`format.MixedWeight`) as 32-bit words and runs `dp4a` (4 int8
products summed into int32, one instruction) per word and activation row:

- 4-bit word = 4 bytes = the low nibbles of k = 4c..4c+3 and the high nibbles of k = 64+4c..64+4c+3
  (signed-nibble layout, `format.py`). `(w << 4) & 0xF0F0F0F0` and `w & 0xF0F0F0F0` are four int8 values
  16·(u − 8) each: three integer ops unpack eight weights, two `dp4a` multiply them with the activation
  words of k = 4c.. and k = 64+4c.. .
- 8-bit word = four int8 codes, one `dp4a`.

Each program quantizes its activation groups itself (int8 symmetric per (row, group of 128), the same
arithmetic as `reference.quantize_groups`, packed into words), so one launch does the whole product; the
per-group step 2 (× s_a·s_w, the zero point through Σx_q) runs on [rows] vectors, not on a padded tile.
Split-K programs store f32 partials [S·M, N] that XLA sums in the consumer (as `kernels`' partials
epilogue). The integer partial of a group is exact, so the result matches the reference up to f32
summation order. In interpret mode `dp4a` is emulated with shifts (Pallas has no CPU rule for inline PTX).

Measured (H100, session 3, benchmarks/results/kernels.md): at M = 1 5–14 % faster than the MMA kernel on
4096→4096/6144 and 14336→4096, 10 % slower on 4096→28672; each further row adds its dp4a and its
in-kernel quantization (block-wide reductions per group), so M = 2 is already slower than the MMA kernel.

Session 6: `groups_per_iter` (on codes from the quantization kernel, `quantize_first`): each iteration
loads `gpi` groups of a row at once (64·gpi contiguous bytes of a 4-bit row) and waits once for their
scales and zeros, so the small per-group operands Triton cannot pipeline cost one latency per iteration
instead of per group; with 32-row tiles and split-K to ≈ 4096 programs most programs run one iteration.
Default since then (`choose_gemv_config`): 6–18 % less span than before on every Llama-3-8B layer,
17.2 µs at 4096→14336 (2.71× XLA's bf16 dot), 30.1 µs at 4096→28672 (2.73×, now faster than the MMA
kernel there).

Session 7: `groups_per_iter > 1` also without `quantize_first` — every program quantizes its own gpi
groups of x (`_pack_codes`, the same codes as the quantization kernel) and the call is one launch
instead of two. H200 (session 8, results/kernels.md): 3–16 % less span at M = 1 on the four 8B layers
(6.7 µs at 4096→4096 … 23.3 µs at 4096→28672, 1.86–2.51× XLA's bf16 dot), so the M = 1 default; at
M = 2 the two-launch form beat the MMA kernel on every layer (1.31–2.21× XLA bf16), so the API takes the
GEMV for M ≤ 2 (`api.GEMV_MAX_M`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import pdl
from pallas_kernels.format import GROUP_SIZE, ROW_ALIGN, TILE_ROWS, MixedWeight, NormedActivations, QuantizedActivations

_WORDS = GROUP_SIZE // 8  # 16 words of 4 bytes per half group of activations / per 4-bit group row


@dataclasses.dataclass(frozen=True)
class GemvConfig:
    block_n: int = 64  # packed rows per program
    split_k: int = 1  # K groups split over this many programs (f32 partials summed by XLA)
    num_warps: int = 4
    num_stages: int = 3
    quantize_first: bool = False  # take the activation codes from `kernels.quantize_activations_pallas`
    # (one more launch) instead of quantizing every group in every program (block-wide reductions)
    groups_per_iter: int = 1  # K groups per loop iteration: each row's bytes of all of them in one load
    # (64·gpi contiguous bytes of a 4-bit row), one wait on the small per-group operands per iteration
    # instead of per group; without quantize_first each program quantizes its gpi groups of x itself
    xla_quant: bool = False  # with quantize_first: the codes from `kernels.quantize_activations_xla` (XLA
    # ops that a jitted model can fuse into the producer of x) instead of the Pallas quantization kernel
    word_rescale: bool = False  # (groups_per_iter > 1) rescale every word's dp4a sum in f32, then reduce the
    # [bn, gpi, 16] tile once: the group partials never change layout (offline PTX: no shared-memory round
    # trips), for 4× the conversions and FMAs
    prefetch: bool = False  # (groups_per_iter > 1) load iteration i + 1's words and small operands before
    # computing iteration i (carried in registers): programs of several iterations keep loads in flight

    def check(self, m: int, num_groups: int) -> None:
        if ROW_ALIGN % self.block_n:
            raise ValueError(f"block_n={self.block_n} must divide the row padding {ROW_ALIGN}")
        if num_groups % self.split_k:
            raise ValueError(f"split_k={self.split_k} must divide the number of K groups {num_groups}")
        gpi = self.groups_per_iter
        if gpi not in (1, 2, 4, 8) or (num_groups // self.split_k) % gpi:
            raise ValueError(f"groups_per_iter={gpi} must be 1, 2, 4 or 8 and divide the {num_groups // self.split_k} "
                             f"K groups of a split (split_k={self.split_k})")
        if not 1 <= m <= 16:
            raise ValueError(f"the GEMV kernel takes 1–16 activation rows, got M={m}: use kernels.mixed_matmul_pallas")
        if self.xla_quant and not self.quantize_first:
            raise ValueError("xla_quant=True quantizes x before the GEMV: set quantize_first=True as well")


def choose_gemv_config(num_groups: int, rows: int, *, programs: int = 4096, m: int = 1,
                       quantize_first: bool | None = None, xla_quant: bool = False, block_n: int = 32) -> GemvConfig:
    """32-row tiles on pre-quantized codes, 4 groups an iteration (2 or 1 where the groups do not divide),
    and the largest split-K that keeps whole iterations and at most `programs` programs — so most
    programs run one iteration. H100 sweep (session 6, call 8, results/kernels.md): within 0.5 µs of the
    best of 10–17 configurations on every Llama-3-8B shape, 6–18 % less span than the previous default
    (64-row tiles, one group an iteration, in-kernel quantization). `quantize_first` None picks by `m`:
    one launch (each program quantizes its own groups) at M = 1 — H200 (session 8): 3–16 % less span than
    the two launches on the four 8B layers — and the codes from the quantization kernel from M = 2 (the
    form measured there: with M rows every program would quantize M rows of its groups). `xla_quant`
    takes the codes from XLA ops (implies quantize_first). Programs of two or more iterations prefetch
    (`prefetch`): H200 (session 14, on codes, M = 1) 4096→28672 22.7 → 21.5 µs, its 3584 programs two
    iterations each; on layers whose programs run one iteration it changes nothing. Measured and left off
    there: the per-word rescale (±5 %), 8 warps, 16- or 64-row tiles, fewer programs with prefetch (up to
    −11 % on 4096→4096 with 64-row tiles and 8 warps, +3–18 % on 14336→4096)."""
    gpi = 4 if num_groups % 4 == 0 else 2 if num_groups % 2 == 0 else 1
    tiles = max(1, rows // block_n)
    split = max(d for d in range(1, num_groups + 1)
                if num_groups % d == 0 and (num_groups // d) % gpi == 0 and (tiles * d <= programs or d == 1))
    qf = xla_quant or (m > 1 if quantize_first is None else quantize_first)
    return GemvConfig(block_n, split, quantize_first=qf, groups_per_iter=gpi, xla_quant=xla_quant, prefetch=True)


def _dp4a(a: jax.Array, b: jax.Array, c: jax.Array, *, interpret: bool) -> jax.Array:
    """Elementwise Σ_j int8(a)_j · int8(b)_j + c over the 4 bytes of int32 words (PTX dp4a.s32.s32)."""
    if not interpret:
        return plgpu.elementwise_inline_asm(
            "dp4a.s32.s32 $0, $1, $2, $3;", args=[a, b, c], constraints="=r,r,r,r", pack=1,
            result_shape_dtypes=[jax.ShapeDtypeStruct(a.shape, jnp.int32)])[0]
    for j in range(4):  # byte j sign-extended: shift it to the top, arithmetic shift back
        up = 24 - 8 * j
        c = c + ((a << up) >> 24) * ((b << up) >> 24)
    return c


def _quantize_words(x_ref, row, g):
    """Row `row`, group g of x [M, Kp/4, 4] → (lo words [16], hi words [16] int32, s_a, Σx_q f32 scalars)."""
    lo = x_ref[row, pl.ds(g * 2 * _WORDS, _WORDS), :]  # [16, 4]: k = 4c + j
    hi = x_ref[row, pl.ds(g * 2 * _WORDS + _WORDS, _WORDS), :]  # k = 64 + 4c + j
    return _pack_codes(lo, hi)


def _pack_codes(lo, hi):
    """The two halves [..., 16, 4] of groups of x (any float) → their int8 codes as lo / hi words [..., 16]
    int32, s_a and Σx_q [...] f32 (one group per leading index).

    Same arithmetic as `reference.quantize_groups`: s_a = amax/127, codes clip(floor(x·127/amax + ½))."""
    lo, hi = lo.astype(jnp.float32), hi.astype(jnp.float32)
    amax = jnp.maximum(jnp.max(jnp.abs(lo), axis=(-2, -1)), jnp.max(jnp.abs(hi), axis=(-2, -1)))
    inv = jnp.where(amax > 0, 127.0 / jnp.where(amax > 0, amax, 1.0), 0.0)[..., None, None]
    shifts = 8 * lax.broadcasted_iota(jnp.int32, (1,) * (lo.ndim - 1) + (4,), lo.ndim - 1)

    def words(v):
        q = jnp.clip(jnp.floor(v * inv + 0.5), -127.0, 127.0).astype(jnp.int32)  # [..., 16, 4]
        return jnp.sum((q & 255) << shifts, axis=-1), jnp.sum(q, axis=(-2, -1))  # disjoint bytes: the sum is the OR

    (w_lo, s_lo), (w_hi, s_hi) = words(lo), words(hi)
    return w_lo, w_hi, amax / 127.0, (s_lo + s_hi).astype(jnp.float32)


def _load_words(xw_ref, as_ref, ax_ref, row, g):
    """Row `row`, group g of pre-quantized activations: words [16] lo / hi int32, s_a, Σx_q f32 scalars."""
    lo = xw_ref[row, pl.ds(g * 2 * _WORDS, _WORDS)]
    hi = xw_ref[row, pl.ds(g * 2 * _WORDS + _WORDS, _WORDS)]
    return lo, hi, as_ref[g, row], ax_ref[g, row].astype(jnp.float32)


def _by_channel_set(tile, bn: int, n8_tiles: int, n4_tiles: int, run8, run4) -> None:
    """Tiles [0, n8_tiles) are 8-bit rows, the rest 4-bit: run8 / run4 (first packed row); an empty channel
    set's placeholders are never traced."""
    if n8_tiles:
        @pl.when(tile < n8_tiles)
        def _():
            run8(tile * bn)

    if n4_tiles:
        @pl.when(tile >= n8_tiles)
        def _():
            run4((tile - n8_tiles) * bn)


def _gemv_kernel(*refs, cfg: GemvConfig, m: int,
                 n8_tiles: int, n4_tiles: int, groups_per_split: int, n_out: int, interpret: bool,
                 pdl_on: bool = False, tiled: int = 0):
    if cfg.quantize_first:
        xw_ref, as_ref, ax_ref, q8_ref, s8_ref, q4_ref, s4_ref, z4_ref, chan_ref, o_ref = refs
        load_x = functools.partial(_load_words, xw_ref, as_ref, ax_ref)
    else:
        x_ref, q8_ref, s8_ref, q4_ref, s4_ref, z4_ref, chan_ref, o_ref = refs
        load_x = functools.partial(_quantize_words, x_ref)
    bn = cfg.block_n
    tile, split = pdl.program_ids(2, pdl_on)
    g0 = split * groups_per_split
    cols = chan_ref[pl.ds(tile * bn, bn)]  # [bn] output channels (≥ n_out on padding rows)
    dp4a = functools.partial(_dp4a, interpret=interpret)
    zero = jnp.zeros((bn, _WORDS), jnp.int32)

    def run(partial_fn, scale_fn, n0):
        def body(i, accs):
            g = g0 + i
            xs = [load_x(r, g) for r in range(m)]
            parts = partial_fn(g, n0, xs)  # per row: [bn] int32 exact group partial
            w_meta = scale_fn(g, n0)
            return tuple(acc + step2(p, x, w_meta) for acc, p, x in zip(accs, parts, xs))

        accs = lax.fori_loop(0, groups_per_split, body, tuple(jnp.zeros((bn,), jnp.float32) for _ in range(m)))
        for r, acc in enumerate(accs):
            plgpu.store(o_ref.at[split * m + r, cols], acc, mask=cols < n_out)

    def step2(p, x, w_meta):
        _, _, a_scale, x_sum = x
        w_scale, zero_off = w_meta  # zero_off None for 8-bit rows
        y = p.astype(jnp.float32) * (a_scale * w_scale)
        return y if zero_off is None else y + (a_scale * x_sum) * zero_off

    def group_dots(w_lo, w_hi, xs):  # per row: Σ over the group's words of dp4a with the lo / hi activations
        return [jnp.sum(dp4a(w_hi, jnp.broadcast_to(hi[None, :], w_hi.shape),
                             dp4a(w_lo, jnp.broadcast_to(lo[None, :], w_lo.shape), zero)), axis=1)
                for lo, hi, _, _ in xs]

    def w8_partial(g, n0, xs):
        if tiled:  # [tiles, G/Q, 64, Q, 32] words
            at = (n0 // TILE_ROWS, g // tiled, pl.ds(n0 % TILE_ROWS, bn), g % tiled)
            wa = plgpu.load(q8_ref.at[(*at, pl.ds(0, _WORDS))], eviction_policy="evict_first")
            wb = plgpu.load(q8_ref.at[(*at, pl.ds(_WORDS, _WORDS))], eviction_policy="evict_first")
            return group_dots(wa, wb, xs)
        rows = pl.ds(n0, bn)
        wa = plgpu.load(q8_ref.at[rows, pl.ds(g * 2 * _WORDS, _WORDS)], eviction_policy="evict_first")  # [bn, 16]
        wb = plgpu.load(q8_ref.at[rows, pl.ds(g * 2 * _WORDS + _WORDS, _WORDS)], eviction_policy="evict_first")
        return group_dots(wa, wb, xs)

    def w8_scale(g, n0):
        return plgpu.load(s8_ref.at[g, pl.ds(n0, bn)]), None

    def w4_partial(g, n0, xs):
        if tiled:  # [tiles, G/Q, 64, Q, 16] words
            w = plgpu.load(q4_ref.at[n0 // TILE_ROWS, g // tiled, pl.ds(n0 % TILE_ROWS, bn), g % tiled, :],
                           eviction_policy="evict_first")
        else:
            w = plgpu.load(q4_ref.at[pl.ds(n0, bn), pl.ds(g * _WORDS, _WORDS)], eviction_policy="evict_first")
        mask = jnp.int32(-252645136)  # 0xF0F0F0F0
        return group_dots((w << 4) & mask, w & mask, xs)  # four int8 16·(u − 8) in each word

    def w4_scale(g, n0):
        rows = pl.ds(n0, bn)
        w_scale = plgpu.load(s4_ref.at[g, rows])
        zero_off = (8.0 - plgpu.load(z4_ref.at[g, rows]).astype(jnp.float32)) * w_scale
        return w_scale * (1.0 / 16.0), zero_off

    _by_channel_set(tile, bn, n8_tiles, n4_tiles, lambda n0: run(w8_partial, w8_scale, n0),
                    lambda n0: run(w4_partial, w4_scale, n0))


def _quantize_group_words(x_ref, row, gs):
    """Row `row`, groups `gs` (gpi of them) of x [M, G, 2, 16, 4] float → lo / hi words [gpi, 16] int32,
    s_a and Σx_q [gpi] f32: `_quantize_words` for gpi groups at once."""
    return _pack_codes(x_ref[row, gs, 0, :, :], x_ref[row, gs, 1, :, :])  # halves [gpi, 16, 4]


def _grouped_kernel(*refs, cfg: GemvConfig, m: int, n8_tiles: int, n4_tiles: int, groups_per_split: int,
                    n_out: int, interpret: bool, normed: tuple | None = None, pdl_on: bool = False,
                    tiled: int = 0):
    """`groups_per_iter` groups a loop iteration. Activation refs: with `quantize_first`, xw int32
    [Mp, G, 2, 16] (words, lo / hi half of each group) and as / ax [G, Mp] (scales, Σ codes); without,
    x [M, G, 2, 16, 4] float, quantized group by group in every program (one launch in all). Weight refs:
    q8 int32 [N8p, G, 2, 16], q4 int32 [N4p, G, 16], scales / zeros [G, rows]. Per iteration every
    operand is a [bn, gpi, 16] or [gpi, bn] block; group partials [bn, gpi] are rescaled and summed over
    the gpi groups."""
    if cfg.quantize_first:
        xw_ref, as_ref, ax_ref, q8_ref, s8_ref, q4_ref, s4_ref, z4_ref, chan_ref, o_ref = refs

        def acts(gs, off):  # per row: lo, hi words [gpi, 16], s_a, Σx_q [gpi]
            return [(xw_ref[r, gs, 0, :], xw_ref[r, gs, 1, :], as_ref[gs, r], ax_ref[gs, r]) for r in range(m)]
    elif normed is not None:  # RMSNorm(s)·w of the program's groups, then their codes (`NormedActivations`)
        x_ref, ssq_ref, nw_ref, q8_ref, s8_ref, q4_ref, s4_ref, z4_ref, chan_ref, o_ref = refs
        eps, width, chunks, dtype = normed

        def acts(gs, off):  # the arithmetic of `norm._quant_chunk_kernel`, so the codes are the norm kernel's
            ci = jnp.arange(pl.next_power_of_2(chunks))
            out = []
            for r in range(m):
                mean = jnp.sum(plgpu.load(ssq_ref.at[r, ci + off], mask=ci < chunks, other=0.0)) / width
                inv = lax.rsqrt(mean + eps)

                def half(h):
                    y = (x_ref[r, gs, h, :, :].astype(jnp.float32) * inv).astype(dtype)
                    return (nw_ref[gs, h, :, :].astype(dtype) * y).astype(jnp.float32)

                out.append(_pack_codes(half(0), half(1)))
            return out
    else:
        x_ref, q8_ref, s8_ref, q4_ref, s4_ref, z4_ref, chan_ref, o_ref = refs

        def acts(gs, off):
            return [_quantize_group_words(x_ref, r, gs) for r in range(m)]

    bn, gpi = cfg.block_n, cfg.groups_per_iter
    tile, split = pl.program_id(0), pl.program_id(1)
    g0 = split * groups_per_split
    # PDL: every activation address derives from g0 passed through griddepcontrol.wait; the weights need
    # nothing from the previous kernel. WEIGHTS_FIRST moves the wait after the first iteration's weight loads.
    g0_waited = None if pdl.WEIGHTS_FIRST else pdl.wait_then(g0, pdl_on)
    cols = chan_ref[pl.ds(tile * bn, bn)]
    dp4a = functools.partial(_dp4a, interpret=interpret)
    # tiled codes with Q ≥ gpi groups a block row (`format.tile_codes`): a row's gpi groups are contiguous, the
    # blocks read as row-major ones. Q = 1 < gpi (`gather`): the iteration's words are indexed [bn, gpi, 16] with
    # offsets computed here on the flat codes, so Triton's coalescing (threads along the words, then along the next
    # dimension of the index) gives each thread one group's words and activations, as in row-major — the same loads
    # (16-byte vectors, 4 groups × 2 rows × 64 B a warp) and registers in the offline PTX. Measured (H100, session
    # 38): 0.99–1.06× row-major's time at M = 1, 0.94–0.96× at M = 2. Loaded through the [gpi, bn, 16] view of the
    # blocks instead, threads went along rows and each held gpi groups of activations (+25–100 registers, 1.03–1.11×;
    # sessions 37–38, removed after `s38b`); as gpi separate one-group blocks, 1.2–2.3× (`s37e`).
    quad = tiled
    gather = bool(quad) and quad < gpi
    num_groups = groups_per_split * cfg.split_k
    zero = jnp.zeros((bn, gpi, _WORDS), jnp.int32)
    first = dict(eviction_policy="evict_first")

    def run(load_w, load_meta, prep, n0):
        rows = pl.ds(n0, bn)
        iters = groups_per_split // gpi
        waited = [g0_waited]

        def fetch(i):  # everything iteration i reads
            gs = pl.ds(g0 + i * gpi, gpi)
            w, meta = load_w(gs, rows), load_meta(gs, rows)
            if waited[0] is None:  # WEIGHTS_FIRST: after this first fetch's weight loads
                waited[0] = pdl.wait_then(g0, pdl_on)
            g0x = waited[0]
            return w, meta, acts(pl.ds(g0x + i * gpi, gpi), g0x - g0)  # (g0x - g0: 0, not foldable)

        def compute(data, accs):
            (w_lo, w_hi), (w_scale, zero_off) = prep(data[0], data[1])  # words [bn, gpi, 16]; meta [bn, gpi]
            out = []  # (zero_off None: 8-bit rows)
            for acc, (lo, hi, a_scale, x_sum) in zip(accs, data[2]):
                x_sum = x_sum.astype(jnp.float32)
                d = dp4a(w_hi, jnp.broadcast_to(hi[None], w_hi.shape),
                         dp4a(w_lo, jnp.broadcast_to(lo[None], w_lo.shape), zero))  # [bn, gpi, 16]
                if cfg.word_rescale:  # f32 per word, one reduction of the tile
                    y = d.astype(jnp.float32) * (w_scale * a_scale[None, :])[:, :, None]
                    if zero_off is not None:  # 1/16 of the group's zero term on each of its 16 words
                        y = y + (zero_off * (a_scale * x_sum * (1.0 / _WORDS))[None, :])[:, :, None]
                    out.append(acc + jnp.sum(jnp.sum(y, axis=2), axis=1))
                    continue
                p = jnp.sum(d, axis=2)  # [bn, gpi]
                y = p.astype(jnp.float32) * (w_scale * a_scale[None, :])
                if zero_off is not None:
                    y = y + zero_off * (a_scale * x_sum)[None, :]
                out.append(acc + jnp.sum(y, axis=1))
            return tuple(out)

        accs = tuple(jnp.zeros((bn,), jnp.float32) for _ in range(m))
        if cfg.prefetch and iters > 1:
            # Two register sets, a pair of iterations a loop step: b's loads are issued before a's arithmetic,
            # the next a's after a's last use (so they can land in a's registers: a single carried set
            # would need a copy at the back edge, which waits on the load — session 10, item 39).
            def pair(j, carry):
                a, accs = carry
                b = fetch(2 * j + 1)
                accs = compute(a, accs)
                a = fetch(2 * j + 2)
                return a, compute(b, accs)

            pairs = (iters - 1) // 2
            a, accs = lax.fori_loop(0, pairs, pair, (fetch(0), accs))
            if iters - 2 * pairs == 2:  # one more pair, without a next fetch
                b = fetch(iters - 1)
                accs = compute(b, compute(a, accs))
            else:
                accs = compute(a, accs)
        else:
            accs = lax.fori_loop(0, iters, lambda i, a: compute(fetch(i), a), accs)
        for r, acc in enumerate(accs):
            plgpu.store(o_ref.at[split * m + r, cols], acc, mask=cols < n_out)

    # Loads (raw, so a prefetched load is not waited on where it is issued) and what compute derives from them.
    def flat_at(gs, rows, halves=1, h=0):  # [bn, gpi, 16] word offsets into the flat [tiles, G, 64, halves, 16] codes
        t, r0 = rows.start // TILE_ROWS, rows.start % TILE_ROWS
        ri, gi, wi = (lax.broadcasted_iota(jnp.int32, (bn, gpi, _WORDS), d) for d in range(3))
        return (((t * num_groups + gs.start + gi) * TILE_ROWS + r0 + ri) * halves + h) * _WORDS + wi

    def tile_at(gs, rows):  # the block's index (Q ≥ gpi): tile, block row (Q groups), rows in the tile, groups in it
        t, r = rows.start // TILE_ROWS, pl.ds(rows.start % TILE_ROWS, bn)
        return t, gs.start // quad, r, pl.ds(gs.start % quad, gpi)

    def w8(gs, rows):
        if gather:
            return tuple(plgpu.load(q8_ref.at[flat_at(gs, rows, 2, h)], **first) for h in (0, 1))
        if quad:  # [tiles, G/Q, 64, Q, 2, 16] words → [bn, gpi, 16] per half
            half = lambda h: plgpu.load(q8_ref.at[(*tile_at(gs, rows), pl.ds(h, 1), slice(None))],  # noqa: E731
                                        **first).reshape(bn, gpi, _WORDS)
            return half(0), half(1)
        half = lambda h: plgpu.load(q8_ref.at[rows, gs, pl.ds(h, 1), :], **first).reshape(-1, gpi, _WORDS)  # noqa: E731
        return half(0), half(1)

    def w8_meta(gs, rows):
        return plgpu.load(s8_ref.at[gs, rows]), None

    def w8_prep(words, meta):
        return words, (meta[0].T, None)

    def w4(gs, rows):
        if gather:
            return plgpu.load(q4_ref.at[flat_at(gs, rows)], **first)
        if quad:  # [tiles, G/Q, 64, Q, 16] words → [bn, gpi, 16]
            return plgpu.load(q4_ref.at[(*tile_at(gs, rows), slice(None))], **first).reshape(bn, gpi, _WORDS)
        return plgpu.load(q4_ref.at[rows, gs, :], **first)

    def w4_meta(gs, rows):
        return plgpu.load(s4_ref.at[gs, rows]), plgpu.load(z4_ref.at[gs, rows])  # [gpi, bn]

    def w4_prep(w, meta):
        mask = jnp.int32(-252645136)  # 0xF0F0F0F0: four int8 16·(u − 8) in each word
        w_scale = meta[0].T  # [bn, gpi]
        zero_off = ((8.0 - meta[1].astype(jnp.float32)) * meta[0]).T
        return ((w << 4) & mask, w & mask), (w_scale * (1.0 / 16.0), zero_off)

    _by_channel_set(tile, bn, n8_tiles, n4_tiles, lambda n0: run(w8, w8_meta, w8_prep, n0),
                    lambda n0: run(w4, w4_meta, w4_prep, n0))


def _words(a: jax.Array) -> jax.Array:
    """int8 [R, C] → int32 [R, C/4] (little-endian: byte j of a word is column 4c + j)."""
    return lax.bitcast_convert_type(a.reshape(a.shape[0], -1, 4), jnp.int32)


@functools.partial(jax.jit, static_argnames=("cfg", "interpret", "out_dtype", "partials"))
def _gemv(x, qw: MixedWeight, *, cfg: GemvConfig, interpret: bool, out_dtype, partials: bool = False):
    pre = isinstance(x, QuantizedActivations)
    normed = None
    if isinstance(x, NormedActivations):  # each program normalizes and quantizes its groups of s
        if cfg.quantize_first or cfg.groups_per_iter == 1:
            raise ValueError("normed activations take the one-launch grouped GEMV: quantize_first=False, "
                             "groups_per_iter > 1")
        normed = (x.eps, x.k, x.ssq.shape[1], jnp.dtype(x.dtype))
        x_normed = x
        x = x.s
    m, k = (x.m, x.k) if pre else x.shape
    g = qw.num_groups
    cfg.check(m, g)
    if cfg.quantize_first:
        from pallas_kernels.kernels import quantize_activations_pallas, quantize_activations_xla

        if pre:  # codes from the producer of x
            x_q, a_scale, x_sum = x.rows(16)
        elif cfg.xla_quant:
            x_q, a_scale, x_sum = quantize_activations_xla(x, block_m=16)  # [Mp, Kp] int8
        else:
            x_q, a_scale, x_sum = quantize_activations_pallas(x, block_m=16, interpret=interpret)
        x_in = (_words(x_q), a_scale, x_sum)
    else:
        if k != g * GROUP_SIZE:
            x = jnp.pad(x, ((0, 0), (0, g * GROUP_SIZE - k)))
        x_in = (x.reshape(m, g * GROUP_SIZE // 4, 4),)
    n8_tiles, n4_tiles = qw.q8.shape[0] // cfg.block_n, qw.q4.shape[0] // cfg.block_n
    from pallas_kernels.kernels import _nonempty

    q8, q4 = (_words(q) if q.size else jnp.zeros((1, 1), jnp.int32) for q in (qw.q8, qw.q4))
    s8, s4, z4 = _nonempty(qw.scale8, qw.scale4, qw.zero4)
    quad, gpi = qw.tiled, cfg.groups_per_iter
    if quad and TILE_ROWS % cfg.block_n:
        raise ValueError(f"block_n={cfg.block_n}: tiled codes (MixedWeight.tiled) need a block_n dividing "
                         f"{TILE_ROWS}, or the row-major weight (MixedWeight.untiled())")
    if 1 < quad < gpi or (gpi <= quad and quad % gpi):
        raise ValueError(f"groups_per_iter={gpi} with codes tiled {quad} groups a block row: pick groups_per_iter "
                         f"dividing {quad} (or 1 < it with 1 group a block row), or the row-major weight")
    gpi_view = gpi > 1
    if quad and quad < gpi:  # flat codes: the kernel computes the offsets of its [bn, gpi, 16] blocks
        q8, q4 = q8.reshape(-1), q4.reshape(-1)
    elif quad:  # free reshapes: blocks [tiles, G/Q, 64 rows, Q groups, words]
        q8_tail = (2, _WORDS) if gpi_view else (2 * _WORDS,)
        q8 = q8.reshape(-1, g // quad, TILE_ROWS, quad, *q8_tail) if qw.q8.size else \
            jnp.zeros((1, 1, 1, 1, *q8_tail), jnp.int32)
        q4 = q4.reshape(-1, g // quad, TILE_ROWS, quad, _WORDS) if qw.q4.size else \
            jnp.zeros((1, 1, 1, 1, _WORDS), jnp.int32)
    if gpi_view:  # free reshapes: group-major views of the words (or of x)
        x_in = (x_in[0].reshape(x_in[0].shape[0], g, 2, _WORDS, *x_in[0].shape[2:]), *x_in[1:])
    if gpi_view and not qw.tiled:
        q8 = q8.reshape(q8.shape[0], g, 2, _WORDS) if qw.q8.size else jnp.zeros((1, 1, 2, _WORDS), jnp.int32)
        q4 = q4.reshape(q4.shape[0], g, _WORDS) if qw.q4.size else jnp.zeros((1, 1, _WORDS), jnp.int32)
    body = _grouped_kernel if cfg.groups_per_iter > 1 else _gemv_kernel
    extra = {}
    if normed is not None:  # + the chunks' sums of squares and the norm's weight, group-major like x
        x_in = (*x_in, x_normed.ssq, x_normed.w.reshape(g, 2, _WORDS, 4))
        extra = dict(normed=normed)
    kernel = functools.partial(body, pdl_on=pdl.active(interpret),
                               cfg=cfg, m=m, n8_tiles=n8_tiles, n4_tiles=n4_tiles, groups_per_split=g // cfg.split_k,
                               n_out=qw.n, interpret=interpret, tiled=qw.tiled, **extra)
    y = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((cfg.split_k * m, qw.n), jnp.float32),
        grid=(n8_tiles + n4_tiles, cfg.split_k),
        interpret=interpret,
        name="mixed_gemv",
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
    )(*x_in, q8, s8, q4, s4, z4, qw.channel)
    if partials:  # f32 [S, M, N] for a consumer that sums them itself
        return y.reshape(cfg.split_k, m, qw.n)
    return y.reshape(cfg.split_k, m, qw.n).sum(0).astype(out_dtype)  # the sum fuses into the consumer


def mixed_gemv_pallas(x, qw: MixedWeight, *, config: GemvConfig | None = None,
                      interpret: bool = False, out_dtype=None, partials: bool = False) -> jax.Array:
    """x [M, K] float (M ≤ 16; faster than the MMA kernel at M ≤ 2, `api.GEMV_MAX_M`) → [M, N] in channel
    order; one launch at M = 1, two from M = 2 (`choose_gemv_config`). x may be `QuantizedActivations`
    (the GEMV then runs on those codes, one launch at any M). partials: f32 [S, M, N] unsummed."""
    pre = isinstance(x, QuantizedActivations)
    normed = isinstance(x, NormedActivations)
    m = x.m if pre or normed else x.shape[0]
    rows = qw.q8.shape[0] + qw.q4.shape[0]
    cfg = config or choose_gemv_config(qw.num_groups, rows, m=m, quantize_first=True if pre else False if normed else None)
    if pre:
        cfg = dataclasses.replace(cfg, quantize_first=True, xla_quant=False)
    if normed and cfg.groups_per_iter == 1:  # the per-group kernel has no norm prologue: the codes first
        from pallas_kernels.norm import normed_codes

        x = normed_codes(x, interpret=interpret)
        cfg = dataclasses.replace(cfg, quantize_first=True, xla_quant=False)
    elif normed:
        cfg = dataclasses.replace(cfg, quantize_first=False, xla_quant=False)
    dtype = x.s.dtype if isinstance(x, NormedActivations) else x.dtype
    return _gemv(x, qw, cfg=cfg, interpret=interpret, out_dtype=jnp.dtype(out_dtype or dtype), partials=partials)
