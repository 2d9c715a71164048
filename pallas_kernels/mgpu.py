"""Prefill on Hopper through Mosaic GPU: int8 wgmma with per-group float rescale (two-step dequantization).

Why a second backend: the Pallas-Triton kernel cannot keep the tensor cores busy at prefill — its
per-group rescale waits on the MMA of the same group, and Triton has no warp specialisation
(benchmarks/NOTES-kernels.md, items 3–4). Mosaic GPU gives the pieces by name: TMA copies into
shared-memory stages filled by a memory warpgroup, `wgmma` on int8 operands into an int32 accumulator,
and two compute warpgroups. H100 (session 4, results/kernels.md): the GEMM runs 1.0–1.3× XLA's bf16
dot at M = 4096, 40 % of the int8 tensor-core peak; the per-group rescale (3 instructions per output
element and group) is what holds it there.

Data flow for y = x @ W.T (M ≥ a few hundred rows; the weight is read once per row tile):

1. `unpack.int8_weight(qw)`: the packed MixedWeight → one int8 matrix in channel order, [Np, Kp]:
   8-bit rows keep their codes q, 4-bit rows become u − z ∈ [-15, 15] (exact in int8), with their
   scales [G, Np]. One pass over the weight (reads the packed bytes, writes 1 byte per weight; a
   Pallas-Triton kernel, `UNPACK`, or its XLA reference) keeps the GEMM one int8 GEMM.
   A weight with every channel 8-bit (W8A8) skips the pass: its stored codes are that matrix already; so does
   a weight that holds the matrix (`with_int8_prefill`: one more byte a weight, for prefill-heavy use).
2. Activations: int8 symmetric per (token, group of 128), scales group-major [G, Mp]
   (`kernels.quantize_activations_pallas`, or the reference formula under interpret mode).
3. `w8a8_group_matmul`: per CTA output tile, each pipeline step of 256 along K (two quantization
   groups) issues each group's four K=32 int8 wgmmas into its own fresh int32 accumulator, waits for
   the first group only and rescales it, `acc += f32(P) · (s_a ⊗ s_w)`, while the second group's MMAs
   run, then rescales the second (H200, session 17: 7–10 % less time than one group a step). This is
   exactly the reference's order (`reference.w8a8_ref`): the integer partial P of a group is exact, so
   the kernel matches the reference to f32 rounding of the accumulate.

Tiles: each of the two compute warpgroups owns a `tile_m × tile_n` block (two int32 partials and the
f32 accumulator in registers: 3 × 64 registers a thread at 64×128), split along M or N.
The grid is persistent (one CTA per SM, a planar-snake walk over output tiles). Shapes must tile:
`mixed_matmul_mgpu` pads M and N to the CTA tile and K is already padded to 128 by the format.

Requires an sm_90 GPU (wgmma) with jax's Mosaic GPU backend; on CPU it runs in Mosaic GPU interpret
mode (`interpret=True`), which the tests use.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.format import GROUP_SIZE, ROW_ALIGN, MixedWeight, QuantizedActivations, _round_up
from pallas_kernels.unpack import int8_weight
from pallas_kernels.kernels import _MAGIC  # bits of 1.5·2^23: as a float, seed + P = 1.5·2^23 + P, |P| < 2^22

_MAGIC_F = 1.5 * 2**23
UNPACK = "pallas"  # the int4 → int8 unpack before the GEMM: `unpack.int8_weight_pallas`, or "xla" (its reference)
PREFILL_ACT_SCALE = "group"  # "group" (MixLLM's, default): one activation scale a (row, group of 128); "token": one a
# row (`MgpuConfig.act_scale`) in every prefill GEMM, the GEMM 12 % faster at 2048 rows (H200, session 27);
# "selective": one a row in o_proj and gate/up only (the model's codes, `mixjax.model._row_scale_codes`), the
# GEMMs where a per-token prompt cost nothing measurable on the embedded model, while q/k/v (their keys and values
# stay in the cache) and down_proj cost +0.12 and +0.08 perplexity (results/accuracy.md, session 28). Decode's
# kernels keep per-group scales in every mode. Opt-in (`prefill_act_scale`, `mixjax generate --prefill-scales`);
# "token" costs +0.14 ± 0.07 perplexity over the decoded tokens. H200, session 30, Llama-3-8B shape, 2048-token
# prefill against bf16 queued: "group" 1.21×, "token" 1.26×, "selective" 1.27×; with the int8 prefill matrices
# 1.27×, 1.35×, 1.35× (NOTES-kernels.md item 99). With "token" the GEMM quantizes a float input a row at a time
# (`ROW_QUANT`); in both modes the model's producers (the norms, SwiGLU) hand it codes with one scale a row
# (`QuantizedActivations.row_scale`).
PREFILL_ACT_SCALES = ("group", "token", "selective")
SELECTIVE_CONSUMERS = ("o", "gate_up")  # the GEMMs "selective" gives one activation scale a row
ROW_QUANT = "pallas"  # with PREFILL_ACT_SCALE = "token", how a float input (o_proj's) is quantized a row at a time:
# "pallas" (`kernels.quantize_rows_pallas`, one program a row, one pass) or "xla" (`quantize_rows`: XLA's row
# reduction and the quantizing pass); the interpreter takes "xla". H200 (session 30, `bench_norm.py --row-scale`,
# 2048 × 4096): 10.6 µs against 19.0
QUANT_ROWS = 32  # rows a program of the activation quantization before the GEMM (None: the CTA's cta_m). H200
# (session 21, bench_norm --prefill-quant): 32 rows 1.9 µs a launch at 256 rows against 3.8 for 128, the same
# 7.0 µs at 2048 rows (at the copy rate); a 256-token W4.4A8 prefill −0.16 ms busy (96 launches)
_SMEM_BYTES = 232448  # shared memory a CTA may use on sm_90 (227 KB)
_SWIZZLE = 128  # bytes: one 128-wide int8 group row is exactly one swizzle span
M_ALIGN = 64  # the GEMM's activation rows are a multiple of this (one warpgroup's wgmma M), at least a CTA's
_INT8_TRANSFORMS = (plgpu.TilingTransform((8, _SWIZZLE)), plgpu.SwizzleTransform(_SWIZZLE))


@dataclasses.dataclass(frozen=True)
class MgpuConfig:
    """Tile and pipeline shape of `w8a8_group_matmul`.

    tile_m × tile_n: one compute warpgroup's output block (tile_m % 64 == 0, tile_n % 8 == 0, ≤ 256);
    wg_along: "m" or "n", how the compute warpgroups split the CTA tile;
    wgs: compute warpgroups a CTA (2; 3 gives each scheduler a third compute warp to interleave with the
    rescales, but leaves each thread (512 − 40) / 3 → 152 registers instead of 232: 64×64 tiles with two
    groups a step, or 64×128 with one, fit; not yet measured);
    stages: shared-memory stages the memory warpgroup keeps in flight;
    snake: width of the planar-snake walk over output tiles (L2 reuse of weight columns);
    epi_n: columns per epilogue store (shared memory → global by TMA);
    programs: CTAs of the persistent grid (None: one per SM of the device);
    overlap: issue a group's MMAs, then rescale the previous group's partial while they run (one more
    int32 tile of registers) instead of waiting first;
    seed: start each group's int32 accumulator at the bits of 1.5·2^23 (MixLLM's trick, as in
    `kernels._seeded_mma`), so the partial becomes a float with one FMA that also applies s_w,
    and a second FMA applies s_a (measured slower on the H100: seeding costs a move per element);
    pingpong: the two compute warpgroups take turns on the tensor cores (a pair of barriers) so that
    one warpgroup's MMAs run while the other rescales (one group a step: measured 5–14 % slower on
    the H100, the default lets both issue together; with gps=2 a turn is both groups' MMAs);
    gps: quantization groups per pipeline step. With 2, a step issues both groups' MMAs into two int32
    partials, waits for the first only, and rescales it while the second group's MMAs run; nothing is
    carried across steps (unlike `overlap`, whose carried partial costs a register copy). K/128 must
    be a multiple of gps;
    convert: how a group's int32 partial P becomes f32 in the rescale. "i2f": one int→float conversion
    (I2FP: 16 results a clock an SM on sm_90 by the CUDA guide's throughput table, an eighth of FP32's
    128; ncu, session 17, counted one per element and group, 58.7 M at 4096×4096×14336, NOTES item 63);
    "magic": an integer add of the bits of 1.5·2^23 and
    one float subtract of 1.5·2^23 (exact: |P| ≤ 128·128·128 < 2^22, and the subtract of two floats
    within a factor of two is exact), the same f32 value from full-rate integer and FP32 instructions.
    Unlike `seed`, the accumulator of the wgmma starts at zero (no move per element before the MMAs).
    "magic_fma": the same integer add, then `seed`'s two FMAs (P·s_w as (1.5·2^23 + P)·s_w − 1.5·2^23·s_w,
    then · s_a into the accumulator): three instructions an element instead of four, at `seed`'s
    precision (one f32 rounding of 1.5·2^23·s_w a group: at most about one unit of P, times s_w);
    act_scale: "group" (MixLLM: one activation scale per token and group of 128, a_scale [G, Mp]) or "token"
    (one scale per token, a_scale [1, Mp]; not MixLLM's format, a speed ablation). Per token, the scale factors
    out of the sum over groups: the rescale is acc + f32(P)·s_w, two instructions an element and group instead
    of three, and s_a multiplies the tile once before the epilogue."""

    tile_m: int = 64
    tile_n: int = 128
    wg_along: str = "m"
    stages: int = 2
    snake: int = 8
    epi_n: int = 64
    programs: int | None = None
    overlap: bool = False
    seed: bool = False
    pingpong: bool = False
    gps: int = 2
    convert: str = "i2f"
    wgs: int = 2
    act_scale: str = "group"

    def __post_init__(self):
        if self.tile_m % 64 or self.tile_m <= 0:
            raise ValueError(f"MgpuConfig: tile_m={self.tile_m} must be a positive multiple of 64 (wgmma M)")
        if self.tile_n % 8 or not 0 < self.tile_n <= 256:
            raise ValueError(f"MgpuConfig: tile_n={self.tile_n} must be a multiple of 8 in (0, 256] (wgmma N)")
        if self.wg_along not in ("m", "n"):
            raise ValueError(f"MgpuConfig: wg_along={self.wg_along!r} must be 'm' or 'n'")
        if self.wgs not in (2, 3) or (self.pingpong and self.wgs != 2):
            raise ValueError(f"MgpuConfig: wgs={self.wgs} must be 2 or 3, and pingpong needs 2")
        if self.stages < 2:
            raise ValueError(f"MgpuConfig: stages={self.stages} must be ≥ 2")
        if self.tile_n % self.epi_n or self.epi_n % 8:
            raise ValueError(f"MgpuConfig: epi_n={self.epi_n} must divide tile_n={self.tile_n} and be a multiple of 8")
        if self.gps not in (1, 2) or (self.gps > 1 and (self.overlap or self.seed)):
            raise ValueError(f"MgpuConfig: gps={self.gps} must be 1 or 2, and 2 goes without overlap and seed")
        if self.convert not in ("i2f", "magic", "magic_fma") or (self.convert != "i2f" and self.seed):
            raise ValueError(f"MgpuConfig: convert={self.convert!r} must be 'i2f', 'magic' or 'magic_fma', and "
                             "the magic ones go without seed (a seeded partial is converted by its seed already)")
        if self.act_scale not in ("group", "token") or (
                self.act_scale == "token" and (self.seed or self.overlap or self.convert == "magic_fma")):
            raise ValueError(f"MgpuConfig: act_scale={self.act_scale!r} must be 'group' or 'token', and 'token' goes "
                             "without seed, overlap and convert='magic_fma' (their rescales apply s_a per group)")

    @property
    def cta_m(self) -> int:
        return self.tile_m * (self.wgs if self.wg_along == "m" else 1)

    @property
    def cta_n(self) -> int:
        return self.tile_n * (self.wgs if self.wg_along == "n" else 1)


DEFAULT_CONFIG = MgpuConfig()
NARROW_CONFIG = MgpuConfig(tile_n=64)  # CTAs of 128 × 64: twice the CTAs of the default, for short prompts
# three compute warpgroups (NOTES-kernels.md items 86, 87): CTAs of 192 × 128, one group a step (152 registers a
# thread leave no room for gps=2's second partial at 64 × 128), three stages (four measured 0–8 % slower)
THREE_WG_CONFIG = MgpuConfig(tile_n=128, epi_n=32, wgs=3, gps=1, stages=3)
THREE_WG_SPEED = 0.96  # its time a row against the default's, same tile count; H200, session 24: 0.958–0.963
THREE_WGS = False  # whether `pick_config` may choose them. Off until measured in the model: session 24 measured the
# GEMM alone at M = 1536 and 3072 (2–13 % faster), not yet a prefill nor the overlapping last row tile on the GPU
# (`bash benchmarks/device_session.sh s24b`; bench_generate's `@wg3` turns it on)


def pick_config(m: int, n: int, sms: int | None = None, three_wgs: bool | None = None) -> MgpuConfig:
    """The CTA tile for M rows and N columns on a device of `sms` SMs.

    128 × 64 (`NARROW_CONFIG`) when those CTAs still fit one wave. Measured (H200, 2026-12-04, results/kernels.md
    Session 19): at M = 256 the narrow CTAs take 4096→4096 from 21.5 to 16.2 µs and 14336→4096 from 66.0 to
    47.3 (64 CTAs of the default leave half the SMs idle); where they need a second wave (4096→6144 at
    M = 256, any N at M = 512) or the default already fills the device (4096→28672) they were slower.

    Otherwise the default 128 × 128 or `THREE_WG_CONFIG`'s 192 × 128, whichever has the smaller estimated
    time: a persistent CTA's tiles (⌈CTAs / SMs⌉) times a tile's rows, the three-warpgroup tile's rows weighted
    by `THREE_WG_SPEED`. Session 24 (H200, results/kernels.md): that estimate matched every measured pair at
    M = 1536 and 3072 on the four Llama-3-8B linears within 2 %; the three warpgroups won all eight, by 1.7–13 %.
    `three_wgs` (None: `THREE_WGS`) False leaves them out (Pallas's interpreter hangs running their four threads
    on two cores)."""
    sms = sms or _num_sms()

    def tiles(cfg):  # tiles of the busiest CTA of the persistent grid; M rows padded to M_ALIGN
        return -(-(-(-max(_round_up(m, M_ALIGN), cfg.cta_m) // cfg.cta_m) * -(-n // cfg.cta_n)) // sms)

    ctas = -(-m // NARROW_CONFIG.cta_m) * -(-n // NARROW_CONFIG.cta_n)
    if ctas <= sms:
        return NARROW_CONFIG
    if not (THREE_WGS if three_wgs is None else three_wgs):
        return DEFAULT_CONFIG
    three = tiles(THREE_WG_CONFIG) * THREE_WG_CONFIG.cta_m * THREE_WG_SPEED
    return THREE_WG_CONFIG if three < tiles(DEFAULT_CONFIG) * DEFAULT_CONFIG.cta_m else DEFAULT_CONFIG


def _num_sms() -> int:
    dev = jax.devices()[0]
    return (getattr(dev, "core_count", None) or 132) if dev.platform == "gpu" else 4


def w8a8_group_matmul(x_q: jax.Array, a_scale: jax.Array, w: jax.Array, w_scale: jax.Array, *,
                      out_dtype=jnp.bfloat16, config: MgpuConfig = DEFAULT_CONFIG,
                      interpret: bool = False) -> jax.Array:
    """x_q int8 [Mp, Kp], a_scale f32 [G, Mp], w int8 [Np, Kp], w_scale f32 [G, Np] → out_dtype [Mp, Np].

    y[m, n] = Σ_g f32(Σ_{k∈g} x_q[m, k]·w[n, k]) · a_scale[g, m] · w_scale[g, n] (`config.act_scale="token"`:
    a_scale [1, Mp], y[m, n] = a_scale[0, m] · Σ_g f32(...) · w_scale[g, n]); Np must be a multiple of
    `config.cta_n` and Kp of 128. Mp must be a multiple of 64 and at least `config.cta_m`: where it is not a
    multiple of cta_m, the last row tile starts at Mp − cta_m and recomputes rows of the one before it (the
    same values written twice), so 192-row CTAs (`wgs=3`) take 2048 rows without padding them."""
    mp, kp = x_q.shape
    np_, kp2 = w.shape
    g = kp // GROUP_SIZE
    cfg = config
    if x_q.dtype != jnp.int8 or w.dtype != jnp.int8:
        raise TypeError(f"w8a8_group_matmul: x_q and w must be int8, got {x_q.dtype}, {w.dtype}")
    if kp != kp2 or kp % GROUP_SIZE:
        raise ValueError(f"w8a8_group_matmul: K mismatch or not a multiple of 128: x_q {x_q.shape}, w {w.shape}")
    token = cfg.act_scale == "token"
    sa_rows = 1 if token else g
    if a_scale.shape != (sa_rows, mp) or w_scale.shape != (g, np_):
        raise ValueError(f"w8a8_group_matmul: scales must be [{'1' if token else 'G'}, Mp] = {(sa_rows, mp)} "
                         f"(act_scale={cfg.act_scale!r}) and [G, Np] = {(g, np_)}, got {a_scale.shape}, "
                         f"{w_scale.shape}")
    if g % cfg.gps:
        raise ValueError(f"w8a8_group_matmul: K/128 = {g} groups is not a multiple of config.gps={cfg.gps}")
    if mp % M_ALIGN or mp < cfg.cta_m or np_ % cfg.cta_n:
        raise ValueError(f"w8a8_group_matmul: Mp={mp} must be a multiple of {M_ALIGN} and at least the CTA's "
                         f"{cfg.cta_m} rows, and Np={np_} a multiple of its {cfg.cta_n} columns (pad them, as "
                         "mixed_matmul_mgpu does)")
    out_dtype = jnp.dtype(out_dtype)
    smem = (cfg.stages * (cfg.cta_m + cfg.cta_n) * (cfg.gps * GROUP_SIZE + 4 * cfg.gps)  # x, w and scale stages
            + 2 * cfg.wgs * cfg.tile_m * cfg.epi_n * out_dtype.itemsize)  # two epilogue slots per warpgroup
    if smem > _SMEM_BYTES:
        raise ValueError(f"w8a8_group_matmul: config {cfg} with {out_dtype.name} output needs ≈ {smem // 1024} KB "
                         f"of shared memory, more than the {_SMEM_BYTES // 1024} KB of a Hopper SM; lower stages, "
                         "gps or epi_n")
    if interpret and cfg.wgs > 2 and (os.cpu_count() or 1) < 4:
        raise ValueError(f"w8a8_group_matmul: config.wgs={cfg.wgs} in interpret mode on {os.cpu_count()} CPU cores: "
                         "Pallas's Mosaic GPU interpreter hangs running its four warpgroup threads on two cores; "
                         "run it on a Hopper GPU, or interpret a config with wgs=2")
    if token:  # the pipeline takes only inputs that move with its K steps: the row scales repeated per group
        a_scale = jnp.broadcast_to(a_scale, (g, mp))
    m_iters, n_iters = -(-mp // cfg.cta_m), np_ // cfg.cta_n
    tm, tn, epi_n = cfg.tile_m, cfg.tile_n, cfg.epi_n
    gps = cfg.gps
    kstep = gps * GROUP_SIZE
    programs = min(cfg.programs or _num_sms(), m_iters * n_iters)

    def kernel(x_gmem, sa_gmem, w_gmem, sw_gmem, out_gmem, out_smem):
        def pipeline(body, compute_context):
            return plgpu.emit_pipeline_warp_specialized(
                body,
                grid=(g // gps,),
                memory_registers=40,
                in_specs=[
                    plgpu.BlockSpec((cfg.cta_m, kstep), lambda k: (0, k), transforms=_INT8_TRANSFORMS),
                    plgpu.BlockSpec((gps, cfg.cta_m), lambda k: (k, 0)),
                    plgpu.BlockSpec((cfg.cta_n, kstep), lambda k: (0, k), transforms=_INT8_TRANSFORMS),
                    plgpu.BlockSpec((gps, cfg.cta_n), lambda k: (k, 0)),
                ],
                wg_axis="wg",
                num_compute_wgs=cfg.wgs,
                max_concurrent_steps=cfg.stages,
                compute_context=compute_context,
            )

        def no_op(*_, **__):
            return None

        @functools.partial(
            pl.run_scoped,
            allocs=pipeline(no_op, no_op).get_allocations(x_gmem, sa_gmem, w_gmem, sw_gmem),
            turn=plgpu.Barrier(num_arrivals=1, num_barriers=2),
            collective_axes="wg",
        )
        def _scope(allocs, turn):
            wg = lax.axis_index("wg")
            if cfg.pingpong:  # warpgroup 0 goes first: its first wait finds warpgroup 1's turn done

                @pl.when(wg == 1)
                def _():
                    plgpu.barrier_arrive(turn.at[1])

            @plgpu.nd_loop((m_iters * n_iters,), collective_axes="sm")
            def _tile_loop(info):
                (lin,) = info.index
                mi, ni = plgpu.planar_snake(lin, (m_iters, n_iters), 1, cfg.snake)
                if mp % cfg.cta_m:  # the last row tile ends at Mp, overlapping the one before it; multiple_of:
                    # the offset stays visibly aligned to the tiled layouts (Mp and cta_m are multiples of it)
                    cta_m = pl.ds(pl.multiple_of(jnp.minimum(mi * cfg.cta_m, mp - cfg.cta_m), M_ALIGN), cfg.cta_m)
                else:
                    cta_m = pl.ds(mi * cfg.cta_m, cfg.cta_m)
                cta_n = pl.ds(ni * cfg.cta_n, cfg.cta_n)
                if cfg.wg_along == "m":
                    wg_m, wg_n = pl.ds(wg * tm, tm), pl.ds(0, tn)
                else:
                    wg_m, wg_n = pl.ds(0, tm), pl.ds(wg * tn, tn)

                def accumulate(acc, partial, sa, sw):  # acc + f32(P) · (s_a ⊗ s_w); token: acc + f32(P) · s_w
                    sw_b = lax.broadcast_in_dim(sw, (tm, tn), [1])
                    if cfg.convert == "magic_fma":  # seed it here, then as `seed`
                        partial = partial + _MAGIC
                    if cfg.seed or cfg.convert == "magic_fma":  # the bits of 1.5·2^23 + P: two FMAs an element
                        q = (lax.bitcast_convert_type(partial, jnp.float32) * sw_b
                             + lax.broadcast_in_dim(sw * -_MAGIC_F, (tm, tn), [1]))
                        return acc + q * lax.broadcast_in_dim(sa, (tm, tn), [0])
                    if cfg.convert == "magic":  # 1.5·2^23 + P, read as a float, less 1.5·2^23: exactly P
                        p = lax.bitcast_convert_type(partial + _MAGIC, jnp.float32) - _MAGIC_F
                    else:
                        p = partial.astype(jnp.float32)
                    if token:  # s_a waits for the epilogue (MgpuConfig refuses token with seed or magic_fma)
                        return acc + p * sw_b
                    return acc + p * (lax.broadcast_in_dim(sa, (tm, tn), [0]) * sw_b)

                def load_sa(sa_smem, j):
                    return _load_vector(sa_smem.at[j], wg_m, plgpu.Layout.WGMMA.reduce(1), interpret)

                def body_gps(step, x_smem, sa_smem, w_smem, sw_smem, carry):
                    if token:  # the row scales ride along in the carry to the epilogue, applied once
                        return (body_gps_acc(step, x_smem, sa_smem, w_smem, sw_smem, carry[0]), load_sa(sa_smem, 0))
                    return body_gps_acc(step, x_smem, sa_smem, w_smem, sw_smem, carry)

                def body_gps_acc(_, x_smem, sa_smem, w_smem, sw_smem, acc):
                    def operands(j):
                        cols = pl.ds(j * GROUP_SIZE, GROUP_SIZE)
                        return x_smem.at[wg_m, cols], w_smem.at[wg_n, cols]

                    def scales(j):
                        return (None if token else load_sa(sa_smem, j),
                                _load_vector(sw_smem.at[j], wg_n, plgpu.Layout.WGMMA.reduce(0), interpret))

                    if interpret:  # the interpreter's wgmma takes no transposed operand: same product
                        if cfg.pingpong:
                            plgpu.barrier_wait(turn.at[1 - wg])
                            plgpu.barrier_arrive(turn.at[wg])
                        for j in range(gps):
                            xs, ws = operands(j)
                            partial = lax.dot_general(xs[...], ws[...], (((1,), (1,)), ((), ())),
                                                      preferred_element_type=jnp.int32)
                            acc = accumulate(acc, partial, *scales(j))
                        return acc

                    def group_mmas(*p_refs):
                        if cfg.pingpong:  # the other warpgroup's MMAs of its turn are done
                            plgpu.barrier_wait(turn.at[1 - wg])
                        for p_ref, j in zip(p_refs, range(gps)):
                            xs, ws = operands(j)
                            plgpu.wgmma(p_ref, xs, plgpu.transpose_ref(ws, (1, 0)))
                        out = acc
                        for j, p_ref in enumerate(p_refs):  # group j's partial while later groups' MMAs run
                            partial = plgpu.wgmma_accumulator_load(p_ref, wait_n=gps - 1 - j)
                            if cfg.pingpong and j == gps - 1:  # this turn's MMAs are done: the other's turn
                                plgpu.barrier_arrive(turn.at[wg])
                            out = accumulate(out, partial, *scales(j))
                        return out

                    return pl.run_scoped(group_mmas, *[plgpu.ACC((tm, tn), jnp.int32)] * gps)

                def body(_, x_smem, sa_smem, w_smem, sw_smem, carry):
                    def group_mma(p_ref):
                        if cfg.seed:
                            p_ref[...] = _with_layout(jnp.full((tm, tn), _MAGIC, jnp.int32), plgpu.Layout.WGMMA,
                                                      interpret)
                        plgpu.wgmma(p_ref, x_smem.at[wg_m], plgpu.transpose_ref(w_smem.at[wg_n], (1, 0)))
                        if cfg.overlap:  # rescale the previous group while this group's MMAs run
                            acc, prev, prev_sa, prev_sw = carry
                            # the barrier pins the rescale before the wait below (LLVM may sink it past)
                            acc = lax.optimization_barrier(accumulate(acc, prev, prev_sa, prev_sw))
                        else:
                            acc = carry
                        return acc, p_ref[...]  # p_ref[...] waits for this warpgroup's MMAs

                    if cfg.pingpong:  # wait until the other warpgroup's MMAs of its turn are done
                        plgpu.barrier_wait(turn.at[1 - wg])
                    if interpret:  # the interpreter's wgmma takes no transposed operand: same product
                        acc = accumulate(*carry) if cfg.overlap else carry
                        partial = lax.dot_general(x_smem[wg_m], w_smem[wg_n], (((1,), (1,)), ((), ())),
                                                  preferred_element_type=jnp.int32)
                        if cfg.seed:
                            partial = partial + _MAGIC
                    else:
                        acc, partial = pl.run_scoped(group_mma, plgpu.ACC((tm, tn), jnp.int32))
                    if cfg.pingpong:  # the tensor cores are free: the other warpgroup's turn
                        plgpu.barrier_arrive(turn.at[wg])
                    sa = load_sa(sa_smem, 0)
                    sw = _load_vector(sw_smem.at[0], wg_n, plgpu.Layout.WGMMA.reduce(0), interpret)
                    if cfg.overlap:
                        return acc, partial, sa, sw
                    if token:  # acc is (acc, s_a of the rows): the scales ride along to the epilogue
                        return accumulate(acc[0], partial, None, sw), sa
                    return accumulate(acc, partial, sa, sw)

                def compute_context(run):
                    acc0 = _with_layout(jnp.full((tm, tn), 0, jnp.float32), plgpu.Layout.WGMMA, interpret)
                    if cfg.overlap:  # a first "previous group" with zero scales adds exactly 0
                        p0 = _with_layout(jnp.full((tm, tn), _MAGIC if cfg.seed else 0, jnp.int32),
                                          plgpu.Layout.WGMMA, interpret)
                        sa0 = _with_layout(jnp.full((tm,), 0, jnp.float32), plgpu.Layout.WGMMA.reduce(1), interpret)
                        sw0 = _with_layout(jnp.full((tn,), 0, jnp.float32), plgpu.Layout.WGMMA.reduce(0), interpret)
                        acc = accumulate(*run((acc0, p0, sa0, sw0)))
                    elif token:
                        sa0 = _with_layout(jnp.full((tm,), 0, jnp.float32), plgpu.Layout.WGMMA.reduce(1), interpret)
                        acc, sa = run((acc0, sa0))
                        acc = acc * lax.broadcast_in_dim(sa, (tm, tn), [0])
                    else:
                        acc = run(acc0)
                    acc = acc.astype(out_dtype)
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                    for e in range(tn // epi_n):
                        slot = e % 2
                        plgpu.wait_smem_to_gmem(1, wait_read_only=True)
                        out_smem[wg, slot] = acc[:, e * epi_n:(e + 1) * epi_n]
                        plgpu.commit_smem()
                        plgpu.copy_smem_to_gmem(
                            out_smem.at[wg, slot],
                            out_gmem.at[cta_m, cta_n].at[wg_m, wg_n].at[:, pl.ds(e * epi_n, epi_n)],
                        )

                pipeline(body_gps if gps > 1 else body, compute_context)(
                    x_gmem.at[cta_m, :], sa_gmem.at[:, cta_m], w_gmem.at[cta_n, :], sw_gmem.at[:, cta_n],
                    allocations=allocs,
                )

            if cfg.pingpong:  # consume warpgroup 1's last turn (every arrival is waited for)

                @pl.when(wg == 0)
                def _():
                    plgpu.barrier_wait(turn.at[1])

        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    out_bits = out_dtype.itemsize * 8
    out_swizzle = plgpu.find_swizzle(epi_n * out_bits)
    out_transforms = (plgpu.TilingTransform((8, out_swizzle * 8 // out_bits)), plgpu.SwizzleTransform(out_swizzle))
    call = plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct((mp, np_), out_dtype),
        grid=(programs,),
        grid_names=("sm",),
        num_threads=cfg.wgs + 1,
        thread_name="wg",
        scratch_types=dict(out_smem=plgpu.SMEM((cfg.wgs, 2, tm, epi_n), out_dtype, transforms=out_transforms)),
        interpret=_interpret_params() if interpret else None,
    )
    return call(x_q, a_scale, w, w_scale)


def _load_vector(ref, idx, layout, interpret: bool):
    """A row or column of scales in the accumulator's broadcast layout. The Mosaic GPU interpreter has
    no rule for `plgpu.load` (jax 0.10–0.11); layouts do not exist there, so a plain read is the same."""
    return ref[idx] if interpret else plgpu.load(ref, idx, layout=layout)


def _with_layout(x, layout, interpret: bool):
    """x with a register layout; the interpreter has no layouts (nor a rule for layout_cast)."""
    return x if interpret else plgpu.layout_cast(x, layout)


def _interpret_params():
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

    return InterpretGPUParams()


def with_int8_prefill(qw: MixedWeight) -> MixedWeight:
    """qw holding its `int8_weight` matrix (rows rounded up to 128) for the prefill GEMM to read, so a prefill
    call skips the unpack pass (≈ 3.4 ms of a 2048-token Llama-3-8B prefill, 2.6 of a 256-token one on the H200)
    for one byte a weight more memory. An all-8-bit weight is returned as it is: the GEMM reads its codes already.
    Runtime only: `mixjax.quant.save_quantized` drops the matrix, and `fuse.concat_mixed` does not carry it (fuse
    first)."""
    if not isinstance(qw, MixedWeight):
        raise TypeError(f"with_int8_prefill: expected a MixedWeight, got {type(qw).__name__}")
    if qw.n8 == qw.n:
        return qw
    w, s = int8_weight(qw, rows=_round_up(qw.n, ROW_ALIGN))
    return dataclasses.replace(qw, prefill_w=w, prefill_s=s)


def quantize_rows(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x [M, K] float → (x_q int8 [M, Kp], a_scale f32 [1, M]): one symmetric int8 scale a row (XLA ops; the
    formula of `reference.quantize_groups` over the whole row), K zero-padded to Kp = G·128."""
    from pallas_kernels.reference import pad_k, quantize_groups

    m, k = x.shape
    x_q, sa = quantize_groups(pad_k(x, _round_up(k, GROUP_SIZE)))  # [M, Kp], [M]
    return x_q, sa[None, :]


@contextlib.contextmanager
def prefill_act_scale(mode: str):
    """Runs the block with `PREFILL_ACT_SCALE = mode`, then restores it. The constant is read when a program is
    traced, so jax's caches are cleared on the way in and out: no program traced under the other mode is reused
    (the next calls compile again)."""
    global PREFILL_ACT_SCALE
    if mode not in PREFILL_ACT_SCALES:
        raise ValueError(f"prefill activation scales {mode!r}; expected one of {PREFILL_ACT_SCALES}")
    old = PREFILL_ACT_SCALE
    if mode == old:
        yield
        return
    PREFILL_ACT_SCALE = mode
    jax.clear_caches()
    try:
        yield
    finally:
        PREFILL_ACT_SCALE = old
        jax.clear_caches()


def check_prefill_act_scale() -> str:
    """`PREFILL_ACT_SCALE`, or a ValueError naming the choices."""
    if PREFILL_ACT_SCALE not in PREFILL_ACT_SCALES:
        raise ValueError(f"mgpu.PREFILL_ACT_SCALE = {PREFILL_ACT_SCALE!r}; expected one of {PREFILL_ACT_SCALES}")
    return PREFILL_ACT_SCALE


def _takes_token(config: MgpuConfig) -> bool:
    """Whether `config` may rescale per token (`MgpuConfig` refuses it with seed, overlap or magic_fma)."""
    return not (config.seed or config.overlap or config.convert == "magic_fma")


def _row_block(m: int, config: MgpuConfig) -> int:
    """The multiple the GEMM's M rows are padded to: for 192-row CTAs `M_ALIGN` once they fill one (the last row
    tile then overlaps the one before it, `w8a8_group_matmul`: 2048 rows are not padded to 2112), else whole CTAs
    (128-row CTAs keep the padding they had before session 24: the overlap is not yet checked on the GPU)."""
    return M_ALIGN if m >= config.cta_m and config.cta_m % 128 else config.cta_m


def _rows_in_channel_order(qw: MixedWeight, cta_n: int) -> bool:
    """True when `qw.q8` with `qw.scale8` already is `int8_weight`'s matrix for a CTA width of cta_n: every
    channel 8-bit (rows in channel order, `MixedWeight`'s invariant; zero padding rows at the end) and the
    padded rows a whole number of CTA tiles. The GEMM then reads the stored codes and no copy is made."""
    return qw.n8 == qw.n and qw.q8.shape[0] % cta_n == 0 and not qw.tiled


@functools.partial(jax.jit, static_argnames=("config", "interpret"))
def mixed_matmul_mgpu(x: jax.Array | QuantizedActivations, qw: MixedWeight, *, config: MgpuConfig | None = None,
                      interpret: bool = False) -> jax.Array:
    """x [M, K] float → [M, N] x.dtype in channel order: quantize activations, unpack the weight to
    int8 (`int8_weight`), one Mosaic GPU int8 GEMM with per-group rescale. Pads M and N to the tile.
    x may also be `QuantizedActivations` from its producer (a norm or SwiGLU kernel): its codes and
    scales go to the GEMM as they are (rows padded to the tile), no quantization step; codes with one scale a
    row (`row_scale`) take the per-token rescale (`MgpuConfig(act_scale="token")`) where the config allows it.
    config None: `pick_config` for this M and N."""
    from pallas_kernels.reference import quantize_activations_ref

    check_prefill_act_scale()
    if config is None:
        config = pick_config(x.m if isinstance(x, QuantizedActivations) else x.shape[0], qw.n,
                             three_wgs=THREE_WGS and not interpret)
    if qw.num_groups % config.gps:  # an odd number of groups: one group a step, as many groups in flight
        config = dataclasses.replace(config, gps=1, stages=config.stages * config.gps)
    if isinstance(x, QuantizedActivations):
        if x.x_q.shape[1] != qw.k_padded:
            raise ValueError(f"mixed_matmul_mgpu: codes of {x.x_q.shape[1]} columns for a weight of "
                             f"K = {qw.k_padded} (padded)")
        m, dtype = x.m, jnp.dtype(x.dtype)
        x_q, sa, _ = x.rows(_row_block(m, config))
        if x.row_scale and _takes_token(config):  # a row's G scales are one value: read it once
            sa, config = sa[:1], dataclasses.replace(config, act_scale="token")
    elif PREFILL_ACT_SCALE == "token":  # a float input, quantized a row at a time
        m, dtype = x.shape[0], x.dtype
        if ROW_QUANT not in ("pallas", "xla"):
            raise ValueError(f"mgpu.ROW_QUANT = {ROW_QUANT!r}; expected 'pallas' or 'xla'")
        if ROW_QUANT == "pallas" and not interpret:
            from pallas_kernels.kernels import quantize_rows_pallas

            x_q, sa, _ = quantize_rows_pallas(x, block_m=_row_block(m, config))
            sa = sa[:1]
        else:
            x_q, sa = quantize_rows(jnp.pad(x, [(0, _round_up(m, _row_block(m, config)) - m), (0, 0)]))
        config = dataclasses.replace(config, act_scale="token")
    elif interpret:
        m, dtype = x.shape[0], x.dtype
        x_q, sa = quantize_activations_ref(jnp.pad(x, [(0, _round_up(m, _row_block(m, config)) - m), (0, 0)]))
        sa = sa.T
    else:
        from pallas_kernels.kernels import quantize_activations_pallas

        m, dtype = x.shape[0], x.dtype
        x_q, sa, _ = quantize_activations_pallas(x, block_m=_row_block(m, config), block_rows=QUANT_ROWS)
    if _rows_in_channel_order(qw, config.cta_n):  # W8A8: the stored codes are already the int8 matrix
        w, sw = qw.q8, qw.scale8
    elif qw.prefill_w is not None and qw.prefill_w.shape[0] % config.cta_n == 0:  # held since `with_int8_prefill`
        w, sw = qw.prefill_w, qw.prefill_s
    else:
        # Tie the unpack to this call's activations: without it XLA may hoist the (activation-independent)
        # unpacks of every layer of a model to the program's start and hold all their int8 copies at once.
        x_q, qw = lax.optimization_barrier((x_q, qw))
        w, sw = int8_weight(qw, rows=_round_up(qw.n, config.cta_n), implementation="xla" if interpret else UNPACK)
    y = w8a8_group_matmul(x_q, sa, w, sw, out_dtype=dtype, config=config, interpret=interpret)
    return y[:m, : qw.n]
