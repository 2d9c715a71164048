"""Pallas-Triton kernels for mixed W8/W4 × A8 GEMMs, beside their references in `reference.py`.

Tiling. One `pallas_call` computes the whole mixed linear. Its grid is (M tiles, N tiles, K splits); the
N tiles cover the packed rows [q8 rows; q4 rows] (`format.py`), so the first `n8_tiles` programs along
axis 1 run the 8-bit branch and the rest the 4-bit branch, in parallel — MixLLM's two sub-problems in one
launch. Each program loops (`fori_loop`, unroll 1, software-pipelined by Triton over `num_stages`) over
its share of the K groups of 128. Per group it issues two K=64 int8 dots against the two halves of the
activation group, so the 8-bit and 4-bit branches share one activation schedule:

  8-bit:  P = x_q[:, :64]·w[:, :64]ᵀ + x_q[:, 64:]·w[:, 64:]ᵀ                        (int32)
          y += P · (s_a ⊗ s_w)
  4-bit:  P = x_q[:, :64]·(b << 4)ᵀ + x_q[:, 64:]·(b & -16)ᵀ = 16·Σ x_q·(u − 8)        (int32)
          y += P · (s_a ⊗ s_w/16) + (s_a·Σx_q) ⊗ ((8 − z)·s_w)   — i.e. Σ x_q·(u − z) · s_a·s_w

The int32 partials reach f32 through MixLLM's seed trick (`_seeded_mma`, `_unseed`): the MMA
accumulator starts at the bits of 1.5·2^23, so the result's bits read as a float are 1.5·2^23 + P
exactly and one subtract replaces the quarter-rate int→float conversion (exact either way; on the H100
it measured no faster, the per-group wait on the MMA dominates — see benchmarks/NOTES-kernels.md).

Two-step dequantization: step 1 turns 4-bit codes into int8 operands with two bit ops on 32-bit words
(`_shift_nibbles`: Triton would shift the bytes one by one), the MMA runs int8 × int8 → int32, and the
zero point joins the integer partial as 16·Σx_q·(8 − z) (one integer multiply-add per element; Σx_q comes
from the activation quantizer); step 2 scales each group's integer partial by s_a·s_w in f32 and
accumulates. H200 (session 9, results/kernels.md): the word unpack took 0–12 % off the decode tiles'
span at M = 2–64 and b8 decode from 1.40× to 1.50× XLA bf16.
Weights are loaded `evict_first` (read once); scales are group-major so each group reads one row.

Epilogue: each tile scatters its columns to channel order through `channel` (padding rows point past
N and are masked), so the output comes out in channel order from the one call. With `split_k > 1` the
programs of one tile `atomic_add` their f32 partials into a zeroed output (decode: many programs for a
small M); with `split_k == 1` they store x's dtype directly.

Configurations (`choose_config`, from the H100 sweeps in benchmarks/NOTES-kernels.md): activations are
quantized first by `quantize_activations_pallas` (int8 codes, group-major scales and Σx_q); decode
(M ≤ `DECODE_MAX_M`) uses 16- or 32-row × 64 tiles, split along K so that the programs fit one wave of
resident tiles (`_wave_split`); M < 256 otherwise 64×64 tiles, split only when the grid would not fill the
chip; prefill 128×64 tiles, 4 warps (wgmma needs block_m % 64 == 0 and num_warps % 4 == 0).
`fuse_quant=True` quantizes inside the GEMM instead (one launch fewer; measured no faster at N = 14336),
`groups_per_iter > 1` issues several groups' MMAs before their rescale (measured slower: more registers,
fewer programs in flight), `xla_quant=True` quantizes with XLA ops (`quantize_activations_xla`, the same
codes; measured slower end to end, XLA does not fuse them into the norms) and `prefetch_meta=3` loads the
small per-group operands two iterations ahead (faster only on down_proj at M = 32, session 33).

Every other way to hide the small per-group operands' latency that sessions 3–32 built measured slower
(NOTES items 14, 42, 45, 47, 111): loaded before the loop (`preload`), warmed into the caches
(`warm_meta`), one iteration ahead (`prefetch_meta` 1 and 2), through the tensor cores (`meta_mma`), the
zero point in the scale's low bits (`zero_in_scale`) and the tile transposed for wgmma (`swap_ab`); so did
the split-K zero fill inside the quantization kernel (`zero_in_quant`). They were removed in session 34;
commit 302f4a7 holds them with their tests. On GPU, `api.mixed_matmul` sends 16-bit prefill (M ≥ 512) to
`dequant_dot` and one-row decode on layers up to 16384 rows to `gemv` instead of this kernel: faster there
(benchmarks/results/kernels.md).

The float-dequantization ablation (`mode="float"`) keeps the same tiling but dequantizes each weight
tile to bf16 and runs a bf16 MMA against unquantized bf16 activations (`reference.dequant_matmul_ref`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import pdl
from pallas_kernels.format import GROUP_SIZE, HALF_GROUP, ROW_ALIGN, TILE_ROWS, MixedWeight, QuantizedActivations

Mode = Literal["int", "float"]


@dataclasses.dataclass(frozen=True)
class GemmConfig:
    """Static tiling of one mixed GEMM call."""

    block_m: int
    block_n: int
    split_k: int  # K groups split over this many programs (>1: f32 atomic_add epilogue)
    num_warps: int
    num_stages: int
    fuse_quant: bool  # quantize activations inside the GEMM (decode)
    groups_per_iter: int = 1  # K groups per loop iteration (their MMAs are in flight together)
    split_partials: bool = False  # split-K: each split stores its own f32 partial [S·M, N] and XLA sums
    # them (the sum fuses into the consumer) instead of atomics into a zero-filled output
    prefetch_meta: int = 0  # 3: the small per-group operands (weight scales and zeros, activation scales and
    # sums; Triton pipelines only a dot's operands, so each group waits on these plain loads) two iterations
    # ahead (session 33): the loop body runs two iterations, each set loaded after its last use and used a
    # whole body later (an odd last iteration runs after the loop). 130 registers at M = 32 (3 programs an SM
    # against 5): faster only on down_proj at M = 32 (NOTES item 114). 0: off. (1 and 2, one iteration ahead,
    # were removed in session 34 with the other measured-slower forms; the numbering stays.)
    word_unpack: bool = True  # 4-bit unpack on 32-bit words (`_shift_nibbles`); False: Triton's 8-bit shift
    xla_quant: bool = False  # quantize the activations with XLA ops (`quantize_activations_xla`) instead of
    # the Pallas quantization kernel: same codes; the hope was that XLA fuses them into the producer of x (the
    # norm, SiLU·mul), but it splits them into reductions of their own (NOTES item 46: decode 7–19 % slower end to end)

    @property
    def atomic(self) -> bool:
        return self.split_k > 1 and not self.split_partials

    def check(self, m: int, num_groups: int) -> None:
        if ROW_ALIGN % self.block_n:
            raise ValueError(f"block_n={self.block_n} must divide the row padding {ROW_ALIGN}")
        if num_groups % self.split_k:
            raise ValueError(f"split_k={self.split_k} must divide the number of K groups {num_groups}")
        if (num_groups // self.split_k) % self.groups_per_iter:
            raise ValueError(f"groups_per_iter={self.groups_per_iter} must divide the groups per split "
                             f"{num_groups // self.split_k}")
        if self.block_m % 16:
            raise ValueError(f"block_m={self.block_m} must be a multiple of 16 (MMA tile)")
        if self.prefetch_meta not in (0, 3):
            raise ValueError(f"prefetch_meta={self.prefetch_meta} must be 0 (off) or 3 (two iterations ahead; 1 and "
                             "2 were removed in session 34)")


def _largest_split(num_groups: int, target: int) -> int:
    return max(d for d in range(1, min(num_groups, target) + 1) if num_groups % d == 0)


def _decode_split(num_groups: int, tiles: int, programs: int = 1024) -> int:
    """Split-K for `tiles` output tiles: about `programs` programs, each with at least 4 K groups."""
    return _largest_split(num_groups, min(max(1, -(-programs // tiles)), max(1, num_groups // 4)))


DECODE_SPLIT_RULE = "wave"  # how the decode tiles pick split-K: "wave" (default since session 33), the largest split
# whose programs still fit one wave of resident tiles (`_wave_split`); "programs", about 1024 programs (sessions 3–32,
# picked before the 4-bit unpack on words), which at M = 32 ran 1.5 waves. H100 (session 33, results/kernels.md):
# M = 32 gate/up 53.1 → 40.7 µs span (split 2 → 1), q/k/v 19.5 → 15.7 (8 → 4), down 29.9 → 28.1 (16 → 8); M = 8–16
# the same or faster; decode b32 7 612 → 8 281 tok/s, b8 unchanged
_SMS = 132  # streaming multiprocessors of an H100 SXM / H200
_PROGRAMS_PER_SM = {16: 6, 32: 5}  # decode tiles resident an SM by registers (75 and 94 a thread at 4 warps,
# `benchmarks/ptx_stats.py`)


_PF3_PROGRAMS_PER_SM = 3  # 32-row decode tiles with `prefetch_meta=3` resident an SM (130 registers a thread)
PF3_MIN_GROUPS = 64  # K groups from which the 32-row decode tiles carry their small operands two iterations ahead
# (`prefetch_meta=3`) at the split that fits their wave: a long K loop (Llama-3-8B's down_proj, K = 14336: 112 groups)
# pays for the lower residency. H100: down_proj at M = 32 26.0–26.9 against 28.1 µs (session 33, results/kernels.md);
# decode b32 +1.3 % end to end (session 34, `@pf3down`, then opt-in; 8 413 against 8 308 tok/s) and +1.2 % as the
# default (session 35: 8 386 against 8 289 tok/s, 1.79× bf16; NOTES item 122). None: off


def _wave_split(num_groups: int, tiles: int, block_m: int, per_sm: int | None = None) -> int:
    """Split-K for `tiles` output tiles: the largest whose programs fit one wave of resident decode tiles (`per_sm`
    an SM; None: `_PROGRAMS_PER_SM`), each program with at least 4 K groups."""
    cap = max(1, _SMS * (per_sm or _PROGRAMS_PER_SM[block_m]) // tiles)
    return _largest_split(num_groups, min(cap, max(1, num_groups // 4)))


DecodeStrategy = Literal["quantize_first", "quantize_partials", "fused_atomic", "fused_partials", "fused_single"]
DECODE_STRATEGIES = ("quantize_first", "quantize_partials", "fused_atomic", "fused_partials", "fused_single")
DEFAULT_DECODE: DecodeStrategy = "quantize_partials"  # fastest at M = 1, 16, 32 on the H100 (device call 8)


def _decode_config(m: int, num_groups: int, rows: int, decode: DecodeStrategy,
                   split_rule: str | None = None) -> GemmConfig:
    """M ≤ 32. Launches per call: quantize_first = quantization + zero fill + GEMM (split-K atomics);
    quantize_partials = quantization + GEMM storing per-split partials (XLA sums them); fused_atomic = zero fill + GEMM quantizing its own activation tiles; fused_partials = one GEMM
    storing per-split partials (XLA sums them into the consumer); fused_single = one GEMM, no split
    (narrow N tiles for parallelism instead)."""
    if decode not in DECODE_STRATEGIES:
        raise ValueError(f"decode={decode!r}; expected one of {DECODE_STRATEGIES}")
    block_m = 16 if m <= 16 else 32  # M ≤ 32: one M tile, every weight tile is read once
    if decode == "fused_single":
        block_n = next((bn for bn in (64, 32) if rows // bn >= 2 * 132), 16)  # ≥ 2 programs per SM
        return GemmConfig(block_m, block_n, 1, 4, 4, fuse_quant=True)
    rule = split_rule or DECODE_SPLIT_RULE
    if rule not in ("programs", "wave"):
        raise ValueError(f"split_rule={rule!r}; expected 'programs' or 'wave'")
    tiles = -(-m // block_m) * (rows // 64)
    pf3 = rule == "wave" and PF3_MIN_GROUPS is not None and block_m == 32 and m <= 32 and num_groups >= PF3_MIN_GROUPS
    if rule == "wave":
        split = _wave_split(num_groups, tiles, block_m, _PF3_PROGRAMS_PER_SM if pf3 else None)
    else:
        split = _decode_split(num_groups, tiles)
    # 3 stages: more blocks per SM (call 11: 5–18 % faster than 4 stages at M = 1 and 16)
    return GemmConfig(block_m, 64, split, 4, 3, fuse_quant=decode.startswith("fused"),
                      split_partials=decode.endswith("partials"), prefetch_meta=3 if pf3 else 0)


DECODE_MAX_M = 128  # rows up to which `choose_config` takes the 32-row split-K decode tiles. H200 (session 8,
# results/kernels.md): at M = 64 they ran 0.70–0.83× XLA bf16 against 0.34–0.64× for the 64×64 tiles without
# split that took M = 33..255 before; session 9: at M = 128 0.60–0.64× against 0.35–0.58×, at M = 256 the
# 64×64 tiles and the Mosaic GPU path win again (0.43–0.54× vs 0.42–0.59× and 0.44–0.73×).


def choose_config(m: int, num_groups: int, rows: int, *, mode: Mode = "int",
                  decode: DecodeStrategy = DEFAULT_DECODE, decode_max_m: int = DECODE_MAX_M,
                  split_rule: str | None = None) -> GemmConfig:
    """Decode (M ≤ `decode_max_m`), medium and prefill (M ≥ 256) configurations from M, K (groups) and
    N (rows).

    Picked from sweeps on the H100 (benchmarks/NOTES-kernels.md): decode wants 64-wide tiles split along K
    into as many programs as one wave of resident tiles holds (`split_rule`, `DECODE_SPLIT_RULE`;
    `_decode_config` for the launch strategies). Beyond 32 rows the decode tiles run several 32-row tiles
    over the same weight tiles with split-K partials (`DECODE_MAX_M`, measured on the H200); the medium
    tiles (float mode, M < 256) take no split unless the grid would not fill the chip."""
    if m <= decode_max_m and mode == "int":
        return _decode_config(m, num_groups, rows, decode, split_rule)
    if m <= 32:
        split = _decode_split(num_groups, -(-m // 16) * (rows // 64))
        return GemmConfig(16, 64, split, 4, 4, fuse_quant=False)
    if m < 256:
        tiles = -(-m // 64) * (rows // 64)
        split = 1 if tiles >= 132 else _largest_split(num_groups, 2)
        return GemmConfig(64, 64, split, 4, 4, fuse_quant=False)
    if mode == "float":  # bf16 MMA: the wider tile measured faster (call 3: 1997 vs 3343 µs at M=4096)
        return GemmConfig(128, 128, 1, 8, 3, fuse_quant=False)
    return GemmConfig(128, 64, 1, 4, 4, fuse_quant=False)


# ------------------------------------------------------------------------------ activation quantization


def _quantize_halves(xa, xb):
    """Two halves [bm, 64] f32 of one group → (x_q halves int8, s_a f32 [bm], Σx_q int32 [bm]).

    Same arithmetic as `reference.quantize_groups`."""
    amax = jnp.maximum(jnp.max(jnp.abs(xa), axis=1), jnp.max(jnp.abs(xb), axis=1))  # [bm]
    inv = jnp.where(amax > 0, 127.0 / jnp.where(amax > 0, amax, 1.0), 0.0)
    qa = jnp.clip(jnp.floor(xa * inv[:, None] + 0.5), -127.0, 127.0)
    qb = jnp.clip(jnp.floor(xb * inv[:, None] + 0.5), -127.0, 127.0)
    x_sum = (jnp.sum(qa, axis=1) + jnp.sum(qb, axis=1)).astype(jnp.int32)  # exact: |Σ| ≤ 16256
    return qa.astype(jnp.int8), qb.astype(jnp.int8), amax / 127.0, x_sum


def _load_x_halves(x_ref, m0, g, *, block_m, m, k):
    """Masked loads of one activation group as two halves [block_m, 64] f32 (rows ≥ M, cols ≥ K → 0)."""
    rows = m0 + jnp.arange(block_m)
    halves = []
    for h in range(2):
        cols = g * GROUP_SIZE + h * HALF_GROUP + jnp.arange(HALF_GROUP)
        mask = (rows < m)[:, None] & (cols < k)[None, :]
        tile = plgpu.load(x_ref.at[pl.ds(m0, block_m), pl.ds(g * GROUP_SIZE + h * HALF_GROUP, HALF_GROUP)],
                          mask=mask, other=0.0)
        halves.append(tile.astype(jnp.float32))  # [block_m, 64]
    return halves


def store_quantized_halves(xq_ref, scale_ref, sum_ref, m0, g, block_m, xa, xb) -> None:
    """Quantizes group g of rows [m0, m0 + block_m) from its two halves [block_m, 64] f32 (`_quantize_halves`)
    and stores codes, scale and code sum as `quantize_activations_pallas` lays them out."""
    qa, qb, a_scale, x_sum = _quantize_halves(xa, xb)
    xq_ref[pl.ds(m0, block_m), pl.ds(g * GROUP_SIZE, HALF_GROUP)] = qa
    xq_ref[pl.ds(m0, block_m), pl.ds(g * GROUP_SIZE + HALF_GROUP, HALF_GROUP)] = qb
    scale_ref[g, pl.ds(m0, block_m)] = a_scale
    sum_ref[g, pl.ds(m0, block_m)] = x_sum


def _quant_kernel(x_ref, xq_ref, scale_ref, sum_ref, *, block_m, m, k, pdl_on=False):
    m0, g = pdl.program_ids(2, pdl_on)
    m0 = m0 * block_m
    xa, xb = _load_x_halves(x_ref, m0, g, block_m=block_m, m=m, k=k)
    store_quantized_halves(xq_ref, scale_ref, sum_ref, m0, g, block_m, xa, xb)


@functools.partial(jax.jit, static_argnames=("block_m", "block_rows", "interpret"))
def quantize_activations_pallas(x: jax.Array, *, block_m: int = 64, block_rows: int | None = None,
                                interpret: bool = False):
    """x [M, K] float → (x_q int8 [Mp, Kp], a_scale f32 [G, Mp], x_sum int32 [G, Mp]), Mp = ⌈M/block_m⌉·block_m.

    Scales and sums are group-major (the GEMM reads one row of them per K step). A program quantizes one
    group of `block_rows` rows (None: block_m; it must divide block_m)."""
    m, k = x.shape
    g = -(-k // GROUP_SIZE)
    mp = -(-m // block_m) * block_m
    rows = block_rows or block_m
    if block_m % rows or rows % 8:
        raise ValueError(f"quantize_activations_pallas: block_rows={block_rows} must be a multiple of 8 dividing "
                         f"block_m={block_m}")
    out_shape = (
        jax.ShapeDtypeStruct((mp, g * GROUP_SIZE), jnp.int8),
        jax.ShapeDtypeStruct((g, mp), jnp.float32),
        jax.ShapeDtypeStruct((g, mp), jnp.int32),
    )
    kernel = functools.partial(_quant_kernel, pdl_on=pdl.active(interpret), block_m=rows, m=m, k=k)
    return pl.pallas_call(
        kernel, out_shape=out_shape, grid=(mp // rows, g), interpret=interpret,
        name="quantize_activations", compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),
    )(x)


def _row_quant_kernel(x_ref, q_ref, sc_ref, sum_ref, *, m: int, k: int, groups: int, gp: int, pdl_on: bool = False):
    """One program a row of the codes (rows ≥ M: their zero padding): the row's maximum, one scale for its groups."""
    from pallas_kernels.norm import store_group_codes

    (r,) = pdl.program_ids(1, pdl_on, trigger=True)
    gi = lax.broadcasted_iota(jnp.int32, (gp, GROUP_SIZE), 0)
    col = gi * GROUP_SIZE + lax.broadcasted_iota(jnp.int32, (gp, GROUP_SIZE), 1)  # [gp, 128] feature index
    h = plgpu.load(x_ref.at[jnp.minimum(r, m - 1), col], mask=(col < k) & (r < m), other=0.0).astype(jnp.float32)
    store_group_codes(h, q_ref, sc_ref, sum_ref, r, col, 0, groups, jnp.max(jnp.abs(h)))


@functools.partial(jax.jit, static_argnames=("block_m", "interpret"))
def quantize_rows_pallas(x: jax.Array, *, block_m: int = 64, interpret: bool = False):
    """`quantize_activations_xla(x, block_m=..., row_scale=True)` in one launch, one program a row: x [M, K] float
    (K ≤ 65536) → (x_q int8 [Mp, Kp], a_scale f32 [G, Mp] with each row's one scale in its G places, x_sum int32
    [G, Mp]); the per-token prefill GEMM's input (`mgpu.PREFILL_ACT_SCALE = "token"`, o_proj's)."""
    m, k = x.shape
    g = -(-k // GROUP_SIZE)
    mp = -(-m // block_m) * block_m
    gp = pl.next_power_of_2(g)
    if gp * GROUP_SIZE > 65536:
        raise ValueError(f"quantize_rows_pallas: rows of {k} values: one program holds at most 65536")
    return pl.pallas_call(
        functools.partial(_row_quant_kernel, m=m, k=k, groups=g, gp=gp, pdl_on=pdl.active(interpret)),
        out_shape=(jax.ShapeDtypeStruct((mp, g * GROUP_SIZE), jnp.int8), jax.ShapeDtypeStruct((g, mp), jnp.float32),
                   jax.ShapeDtypeStruct((g, mp), jnp.int32)),
        grid=(mp,), interpret=interpret, name="quantize_rows",
        compiler_params=plgpu.CompilerParams(num_warps=4 if gp * GROUP_SIZE <= 4096 else 8, num_stages=1),
    )(x)


def quantize_activations_xla(x: jax.Array, *, block_m: int = 64, row_scale: bool = False):
    """`quantize_activations_pallas` in XLA ops: the same outputs, bit for bit —
    x_q int8 [Mp, Kp], a_scale f32 [G, Mp], x_sum int32 [G, Mp], rows ≥ M and columns ≥ K zero. Inside a
    jitted model XLA can fuse it into the producer of x, which a Pallas call cannot. row_scale: one scale a
    row (its maximum over all groups), repeated in each group's place (`QuantizedActivations.row_scale`)."""
    from pallas_kernels.reference import quantize_groups

    m, k = x.shape
    g = -(-k // GROUP_SIZE)
    mp = -(-m // block_m) * block_m
    xp = jnp.pad(x, ((0, mp - m), (0, g * GROUP_SIZE - k)))
    if row_scale:
        x_q, sa = quantize_groups(xp)  # [Mp, Kp], [Mp]
        x_q, a_scale = x_q.reshape(mp, g, GROUP_SIZE), jnp.broadcast_to(sa[:, None], (mp, g))
    else:
        x_q, a_scale = quantize_groups(xp.reshape(mp, g, GROUP_SIZE))  # [Mp, G, 128], [Mp, G]
    x_sum = jnp.sum(x_q.astype(jnp.int32), axis=-1)  # [Mp, G]
    return x_q.reshape(mp, g * GROUP_SIZE), a_scale.T, x_sum.T


# ------------------------------------------------------------------------------------------ mixed GEMM


def _dot_nt(a: jax.Array, b: jax.Array) -> jax.Array:
    """a [m, k] · b [n, k]ᵀ with both operands K-contiguous (the layout 8-bit wgmma needs).

    int8 × int8 → int32; bf16 × bf16 → f32. (`lax.dot_general`: `pl.dot` is gone in jax 0.11.)"""
    out = jnp.int32 if jnp.issubdtype(a.dtype, jnp.integer) else jnp.float32
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=out)


_MAGIC = 0x4B400000  # the bits of 12582912.0 = 1.5·2^23: float ulp 1 for |offset| < 2^22


def _seeded_mma(xa, wa, xb, wb) -> jax.Array:
    """Σ of two int8 K=64 dots, int32 [bm, bn], seeded with the bits of 1.5·2^23 (MixLLM's trick).

    seed + P read as f32 is exactly 1.5·2^23 + P while |P| < 2^22 (a group of 128 int8×int8 products
    stays ≤ 2.1e6), so `_unseed` recovers P with one subtract instead of an int→float conversion (a
    quarter-rate instruction). Triton folds `dot + seed` into the MMA's accumulator input."""
    seed = jnp.full((xa.shape[0], wa.shape[0]), _MAGIC, jnp.int32)
    acc = _dot_nt(xa, wa) + seed
    return _dot_nt(xb, wb) + acc


def _unseed(acc: jax.Array) -> jax.Array:  # int32 seeded partial → f32 exact integer
    return lax.bitcast_convert_type(acc, jnp.float32) - 12582912.0


def _tiled_load(ref, g, n0, cols, *, block_n, tiled, evict):
    """Group g's [block_n, ·] codes from the [tiles, G/Q, 64, Q, ·] view of tiled codes: one 64-row block, a part of
    one (block_n < 64: its rows are contiguous in the block), or block_n / 64 blocks (each its own contiguous run)
    loaded as [blocks, 64, ·] and merged along rows."""
    blocks = block_n // TILE_ROWS
    if blocks <= 1:
        rows = slice(None) if blocks else pl.ds(n0 % TILE_ROWS, block_n)
        return plgpu.load(ref.at[n0 // TILE_ROWS, g // tiled, rows, g % tiled, cols], eviction_policy=evict)
    w = plgpu.load(ref.at[pl.ds(n0 // TILE_ROWS, blocks), g // tiled, :, g % tiled, cols], eviction_policy=evict)
    return w.reshape(block_n, w.shape[-1])


def _w8_load(g, n0, q8_ref, *, block_n, evict, tiled=0):
    """The group's 8-bit weight tile as two K halves [bn, 64] int8 (tiled: from the [tiles, G/Q, 64, Q, 128] view
    of `MixedWeight.tiled` codes, Q = tiled: the 64 rows of one block)."""
    if tiled:
        return tuple(_tiled_load(q8_ref, g, n0, pl.ds(h * HALF_GROUP, HALF_GROUP), block_n=block_n, tiled=tiled,
                                 evict=evict) for h in (0, 1))
    rows = pl.ds(n0, block_n)
    wa = plgpu.load(q8_ref.at[rows, pl.ds(g * GROUP_SIZE, HALF_GROUP)], eviction_policy=evict)  # [bn, 64]
    wb = plgpu.load(q8_ref.at[rows, pl.ds(g * GROUP_SIZE + HALF_GROUP, HALF_GROUP)], eviction_policy=evict)
    return wa, wb


def _w8_mma(xh, w, *, mode):
    """Phase 1 of one K group of the 8-bit branch: the MMAs (int32 seeded, or f32 in float mode)."""
    wa, wb = w
    if mode == "float":
        return wa, wb  # dequantized in phase 2 (needs the scales)
    return _seeded_mma(xh[0], wa, xh[1], wb)


def _w8_meta(g, n0, s8_ref, *, block_n):
    """The group's small weight operands: f32 scales [bn]."""
    return (plgpu.load(s8_ref.at[g, pl.ds(n0, block_n)]),)


def _w8_scale(partial, xh, a_meta, w_meta, *, mode):
    """Phase 2: f32 [bm, bn] contribution of the group."""
    (w_scale,) = w_meta
    if mode == "float":
        wa, wb = ((w.astype(jnp.float32) * w_scale[:, None]).astype(jnp.bfloat16) for w in partial)
        return _dot_nt(xh[0], wa) + _dot_nt(xh[1], wb)
    factor = a_meta[0][:, None] * w_scale[None, :]  # s_a·s_w [bm, bn]
    return _unseed(partial) * factor


def _w4_load(g, n0, q4_ref, *, block_n, evict, tiled=0):
    """The group's packed 4-bit tile [bn, 64] int8 (two codes per byte; tiled: from the [tiles, G/Q, 64, Q, 64]
    view, Q = tiled)."""
    if tiled:
        return _tiled_load(q4_ref, g, n0, slice(None), block_n=block_n, tiled=tiled, evict=evict)
    return plgpu.load(q4_ref.at[pl.ds(n0, block_n), pl.ds(g * HALF_GROUP, HALF_GROUP)], eviction_policy=evict)


def _shift_nibbles(packed: jax.Array, *, word_ops: bool) -> jax.Array:
    """packed << 4 on int8 [bn, 64]: the low nibbles as 16·(u − 8).

    word_ops: on 32-bit words, four bytes per shl + and (inline PTX, `pack=4`). Triton lowers an 8-bit
    shift byte by byte (PTX per byte: prmt, cvt, shl.b16, cvt — ≈ 150 of the 4-bit loop's ≈ 525
    instructions per thread at 32×64 tiles, compiled offline with `benchmarks/ptx_stats.py`); bitwise
    and/or stay 32-bit either way. Off in interpret mode (no CPU rule for inline PTX)."""
    if not word_ops:
        return jnp.left_shift(packed, jnp.int8(4))
    return plgpu.elementwise_inline_asm(
        "{ .reg .b32 t; shl.b32 t, $1, 4; and.b32 $0, t, 0xF0F0F0F0; }", args=[packed], constraints="=r,r",
        pack=4, result_shape_dtypes=[jax.ShapeDtypeStruct(packed.shape, jnp.int8)])[0]


def _w4_mma(xh, packed, *, mode, word_ops=False):
    """Phase 1 of one K group of the 4-bit branch: unpack with two bit ops, then the MMAs."""
    lo = _shift_nibbles(packed, word_ops=word_ops)  # 16·(u − 8) for k in [0, 64)
    hi = packed & jnp.int8(-16)  # 16·(u − 8) for k in [64, 128)
    if mode == "float":
        return lo, hi
    return _seeded_mma(xh[0], lo, xh[1], hi)  # 16·Σ x_q·(u − 8)


def _w4_meta(g, n0, s4_ref, z4_ref, *, block_n):
    """The group's scales f32 and zero points int8, [bn] each."""
    rows = pl.ds(n0, block_n)
    return plgpu.load(s4_ref.at[g, rows]), plgpu.load(z4_ref.at[g, rows])


def _w4_scale(partial, xh, a_meta, w_meta, *, mode):
    """Phase 2: f32 [bm, bn] contribution, zero point restored through Σx_q.

    Int mode: the zero point goes in the integer domain: 16·Σ x_q·(u − 8) + 16·Σx_q·(8 − z) =
    16·Σ x_q·(u − z), one integer multiply-add per element on the seeded partial; exact (|16·Σ x_q·(u − z)| ≤
    16·127·15·128 < 2^22, the seed's range), then one rounding instead of two f32 terms, and one multiply by
    s_a·s_w/16."""
    w_scale, zero = w_meta
    if mode == "float":
        zero_off = 8.0 - zero.astype(jnp.float32)  # [bn] 8 − z
        scale16, shift = w_scale * (1.0 / 16.0), zero_off * w_scale

        def deq(w16):  # ((u − 8) + (8 − z))·s in bf16
            return (w16.astype(jnp.float32) * scale16[:, None] + shift[:, None]).astype(jnp.bfloat16)

        return _dot_nt(xh[0], deq(partial[0])) + _dot_nt(xh[1], deq(partial[1]))
    a_scale, x_sum = a_meta
    shift = (16 * x_sum.astype(jnp.int32))[:, None] * (8 - zero.astype(jnp.int32))[None, :]  # int32 [bm, bn]
    factor = a_scale[:, None] * (w_scale * (1.0 / 16.0))[None, :]  # s_a·s_w/16
    return _unseed(partial + shift) * factor


def _mixed_kernel(*refs, cfg: GemmConfig, mode: Mode, n8_tiles: int, n4_tiles: int, groups_per_split: int,
                  m: int, k: int, n_out: int, interpret: bool, pdl_on: bool = False, tiled: int = 0):
    if cfg.fuse_quant or mode == "float":
        x_ref, q8_ref, s8_ref, q4_ref, s4_ref, z4_ref, chan_ref, *o_refs = refs
    else:
        xq_ref, as_ref, ax_ref, q8_ref, s8_ref, q4_ref, s4_ref, z4_ref, chan_ref, *o_refs = refs
    o_ref = o_refs[-1]
    bm, bn = cfg.block_m, cfg.block_n
    m0, tile, split = pdl.program_ids(3, pdl_on)
    m0 = m0 * bm
    g0 = split * groups_per_split
    evict = "evict_first"

    def load_x(g):  # → (operand halves, activation meta): meta = (a_scale [bm], Σx_q [bm]) or ()
        if mode == "float":
            xa, xb = _load_x_halves(x_ref, m0, g, block_m=bm, m=m, k=k)
            return (xa.astype(jnp.bfloat16), xb.astype(jnp.bfloat16)), ()
        if cfg.fuse_quant:
            qa, qb, a_scale, x_sum = _quantize_halves(*_load_x_halves(x_ref, m0, g, block_m=bm, m=m, k=k))
            return (qa, qb), (a_scale, x_sum)
        xa = xq_ref[pl.ds(m0, bm), pl.ds(g * GROUP_SIZE, HALF_GROUP)]  # [bm, 64] int8
        xb = xq_ref[pl.ds(m0, bm), pl.ds(g * GROUP_SIZE + HALF_GROUP, HALF_GROUP)]
        return (xa, xb), None  # meta loaded by load_meta (possibly ahead)

    def run(load_fn, mma_fn, meta_fn, scale_fn, n0):
        unroll = cfg.groups_per_iter
        iters = groups_per_split // unroll
        with_a_meta = not cfg.fuse_quant and mode != "float"
        rows = m0 + jnp.arange(bm)  # [bm]
        cols = chan_ref[pl.ds(tile * bn, bn)]  # [bn] output channels, ≥ n_out on padding rows (read first)

        def load_meta(i):  # small operands of iteration i's groups
            gs = [g0 + i * unroll + j for j in range(unroll)]
            a = [(as_ref[g, pl.ds(m0, bm)], ax_ref[g, pl.ds(m0, bm)]) if with_a_meta else () for g in gs]
            return tuple(a), tuple(meta_fn(g, n0) for g in gs)

        def step(i, acc, metas):  # all loads of the iteration's groups are issued before any MMA
            a_metas, w_metas = metas
            groups = [g0 + i * unroll + j for j in range(unroll)]
            xs = [load_x(g) for g in groups]
            ws = [load_fn(g, n0) for g in groups]
            partials = [mma_fn(xh, w) for (xh, _), w in zip(xs, ws)]
            for partial, (xh, a_in), a_meta, w_meta in zip(partials, xs, a_metas, w_metas):
                acc = acc + scale_fn(partial, xh, a_meta if a_in is None else a_in, w_meta)
            return acc

        def paired(j, state):  # prefetch_meta=3: two iterations a body, each set loaded after its last use
            acc, ma, mb = state
            acc = step(2 * j, acc, ma)
            ma = load_meta(jnp.minimum(2 * j + 2, iters - 1))
            acc = step(2 * j + 1, acc, mb)
            return acc, ma, load_meta(jnp.minimum(2 * j + 3, iters - 1))

        zero = jnp.zeros((bm, bn), jnp.float32)
        if cfg.prefetch_meta == 3:
            acc, ma, _ = lax.fori_loop(0, iters // 2, paired, (zero, load_meta(0), load_meta(min(1, iters - 1))))
            if iters % 2:
                acc = step(iters - 1, acc, ma)
        else:
            acc = lax.fori_loop(0, iters, lambda i, acc: step(i, acc, load_meta(i)), zero)
        mask = (rows < m)[:, None] & (cols < n_out)[None, :]
        out_rows = rows + split * m if cfg.split_partials else rows  # split s: rows [s·M, (s+1)·M)
        idx = (out_rows[:, None], cols[None, :])
        if cfg.atomic:
            plgpu.atomic_add(o_ref, idx, acc, mask=None if interpret else mask)
        else:
            plgpu.store(o_ref.at[idx], acc.astype(o_ref.dtype), mask=mask)

    if n8_tiles:
        @pl.when(tile < n8_tiles)
        def _():
            load = functools.partial(_w8_load, q8_ref=q8_ref, block_n=bn, evict=evict, tiled=tiled)
            meta = functools.partial(_w8_meta, s8_ref=s8_ref, block_n=bn)
            run(load, functools.partial(_w8_mma, mode=mode), meta, functools.partial(_w8_scale, mode=mode), tile * bn)

    if n4_tiles:
        @pl.when(tile >= n8_tiles)
        def _():
            load = functools.partial(_w4_load, q4_ref=q4_ref, block_n=bn, evict=evict, tiled=tiled)
            meta = functools.partial(_w4_meta, s4_ref=s4_ref, z4_ref=z4_ref, block_n=bn)
            mma = functools.partial(_w4_mma, mode=mode, word_ops=cfg.word_unpack and not interpret)
            run(load, mma, meta, functools.partial(_w4_scale, mode=mode), (tile - n8_tiles) * bn)


def _nonempty(*arrays):
    """A channel set with no rows is passed as (1, 1) placeholders: its branch is never traced."""
    return tuple(a if a.size else jnp.zeros((1, 1), a.dtype) for a in arrays)


@functools.partial(jax.jit, static_argnames=("cfg", "mode", "interpret", "out_dtype", "partials"))
def _mixed_gemm(x, qw: MixedWeight, *, cfg: GemmConfig, mode: Mode, interpret: bool, out_dtype=None,
                partials: bool = False):
    pre = isinstance(x, QuantizedActivations)  # codes from the producer of x (int mode, quantize-first configs)
    m = x.m if pre else x.shape[0]
    g = qw.num_groups
    cfg.check(m, g)
    n8_tiles = qw.q8.shape[0] // cfg.block_n
    n4_tiles = qw.q4.shape[0] // cfg.block_n
    atomic = cfg.atomic
    q8, q4 = qw.q8, qw.q4
    if qw.tiled:  # (tile, group) blocks: free 5-D views
        # (block_n divides ROW_ALIGN = 2·TILE_ROWS, `GemmConfig.check`: a part of a block, one, or two)
        quad = qw.tiled
        q8 = q8.reshape(q8.shape[0] // TILE_ROWS, g // quad, TILE_ROWS, quad, GROUP_SIZE) if q8.size else q8
        q4 = q4.reshape(q4.shape[0] // TILE_ROWS, g // quad, TILE_ROWS, quad, HALF_GROUP) if q4.size else q4
    weights = (*_nonempty(q8, qw.scale8), *_nonempty(q4, qw.scale4, qw.zero4), qw.channel)
    if cfg.fuse_quant or mode == "float":
        args = (x, *weights)
    else:
        if pre:
            x_q, a_scale, x_sum = x.rows(cfg.block_m)
        elif cfg.xla_quant:
            x_q, a_scale, x_sum = quantize_activations_xla(x, block_m=cfg.block_m)
        else:
            x_q, a_scale, x_sum = quantize_activations_pallas(x, block_m=cfg.block_m, interpret=interpret)
        args = (x_q, a_scale, x_sum, *weights)
    out_dtype = out_dtype or jnp.dtype(x.dtype)
    acc_dtype = jnp.float32 if cfg.split_k > 1 or partials else out_dtype
    out_rows = m * cfg.split_k if cfg.split_partials else m
    aliases = {}
    if atomic:
        args = (*args, jnp.zeros((m, qw.n), jnp.float32))  # the split-K accumulator
        aliases = {len(args) - 1: 0}
    kernel = functools.partial(
        _mixed_kernel, pdl_on=pdl.active(interpret),
        cfg=cfg, mode=mode, n8_tiles=n8_tiles, n4_tiles=n4_tiles, groups_per_split=g // cfg.split_k, m=m,
        k=qw.k, n_out=qw.n, interpret=interpret, tiled=qw.tiled,
    )
    y = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((out_rows, qw.n), acc_dtype),
        grid=(-(-m // cfg.block_m), n8_tiles + n4_tiles, cfg.split_k),
        input_output_aliases=aliases,
        interpret=interpret,
        name=f"mixed_gemm_{mode}",
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
    )(*args)
    if partials:  # f32 [S, M, N] for a consumer that sums them itself
        return y.reshape(cfg.split_k, m, qw.n) if cfg.split_partials else y[None]
    if cfg.split_partials:
        y = y.reshape(cfg.split_k, m, qw.n).sum(0)  # fused by XLA into the consumer of y
    return y.astype(out_dtype)  # split-K: f32 → x.dtype, fused into the consumer when inside a jitted model


def mixed_matmul_pallas(x, qw: MixedWeight, *, config: GemmConfig | None = None,
                        decode: DecodeStrategy = DEFAULT_DECODE, decode_max_m: int = DECODE_MAX_M,
                        interpret: bool = False, out_dtype=None, partials: bool = False) -> jax.Array:
    """x [M, K] float → [M, N] in channel order (W8A8 + W4A8, two-step dequantization), x.dtype unless
    `out_dtype` (e.g. f32: the split-K accumulator itself, no conversion). `decode` picks the launch
    strategy for M ≤ `decode_max_m` when no `config` is given (`_decode_config`). x may be
    `QuantizedActivations`: the kernel then runs on those codes (no quantization launch). partials: the
    split-K partials f32 [S, M, N] unsummed (S = 1 without split)."""
    pre = isinstance(x, QuantizedActivations)
    m = x.m if pre else x.shape[0]
    cfg = config or choose_config(m, qw.num_groups, qw.q8.shape[0] + qw.q4.shape[0], decode=decode,
                                  decode_max_m=decode_max_m)
    if pre:  # the codes exist: no in-kernel or XLA quantization, no zero fill by the quantizer
        cfg = dataclasses.replace(cfg, fuse_quant=False, xla_quant=False)
    return _mixed_gemm(x, qw, cfg=cfg, mode="int", interpret=interpret,
                       out_dtype=None if out_dtype is None else jnp.dtype(out_dtype), partials=partials)


def dequant_matmul_pallas(x: jax.Array, qw: MixedWeight, *, config: GemmConfig | None = None,
                          interpret: bool = False) -> jax.Array:
    """The ablation: dequantize weight tiles to bf16, bf16 MMA with bf16 activations (no int8 path)."""
    rows = qw.q8.shape[0] + qw.q4.shape[0]
    cfg = config or choose_config(x.shape[0], qw.num_groups, rows, mode="float")
    return _mixed_gemm(x, qw, cfg=dataclasses.replace(cfg, fuse_quant=False), mode="float", interpret=interpret)
