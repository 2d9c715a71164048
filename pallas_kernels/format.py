"""The packed weight format of one mixed-precision (W4/W8) linear, and packing into it.

A linear weight is [N, K] (out_features, in_features), `y = x @ w.T`. MixLLM gives each output channel
(row) either 8 bits or 4 bits. `MixedWeight` stores the two channel sets as two sub-matrices, both
K-contiguous (row-major [rows, K]) because Triton's 8-bit MMA needs K-major operands:

- `q8`  int8 [N8p, Kp]     8-bit codes, symmetric: w ≈ q · s, q ∈ [-127, 127].
- `q4`  int8 [N4p, Kp/2]   4-bit codes, asymmetric: w ≈ (u − z) · s, u ∈ [0, 15], two per byte (below).
- `scale8` f32 [G, N8p], `scale4` f32 [G, N4p], `zero4` int8 [G, N4p]: per group of 128 along K,
  stored group-major (N-contiguous) so one K step of a kernel reads its scales in one coalesced row.
- `channel` int32 [N8p + N4p]: the output channel of each packed row (8-bit rows first); padding rows
  hold N (out of range: kernels mask them, `.at[].set` drops them).
- `row_of_channel` int32 [N]: the inverse, position of channel c in the concatenation [q8 rows; q4 rows].

Padding: K is zero-padded to Kp = G·128 (e.g. 576 → 640); each sub-matrix's rows are zero-padded to a
multiple of `ROW_ALIGN` = 128 so kernel tiles never need row masks on weight loads (zero codes, zero
scales: padding rows compute 0 and are never stored).

Nibble order (signed-nibble layout): within each group of 128 along K, byte j (0 ≤ j < 64) of a 4-bit row
holds k = 128·g + j in its low nibble and k = 128·g + 64 + j in its high nibble, each stored as the signed
value u − 8 ∈ [-8, 7] in two's complement. A kernel unpacks with two int8 ops and no zero point:
`lo = b << 4` and `hi = b & -16` are exactly 16·(u − 8) as int8, fed to two K=64 int8 dots against
x[:, k..k+63] and x[:, k+64..k+127]; the zero point is restored per group with
x·(u − z) = x·(u − 8) + (8 − z)·Σx.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

GROUP_SIZE = 128
ROW_ALIGN = 128
HALF_GROUP = GROUP_SIZE // 2


@dataclasses.dataclass(frozen=True)
class MixedWeight:
    """One linear's mixed W8/W4 weight, logical shape (N, K) = (out_features, in_features).

    Invariants: for an 8-bit channel c at packed row r, w[c, k] ≈ q8[r, k] · scale8[k // 128, r];
    for a 4-bit channel at packed 4-bit row r, w[c, k] ≈ (u[r, k] − zero4[g, r]) · scale4[g, r]
    with g = k // 128 and u unpacked from `q4` by the nibble order in the module docstring
    (byte j of group g: low nibble k = 128g + j, high nibble k = 128g + 64 + j, each stored as u − 8).
    All code arrays are K-contiguous; scales and zeros are group-major [G, rows]. Each channel set holds
    its channels in ascending order, and a weight whose channels are all 8-bit (n8 == n) holds channel c
    at row c of `q8`, its padding rows last: `pack_mixed` and `fuse.concat_mixed` keep this, and the
    Mosaic GPU prefill GEMM reads such a `q8` as it is (`mgpu.mixed_matmul_mgpu`).
    """

    q8: jax.Array  # int8 [N8p, Kp]
    scale8: jax.Array  # f32 [G, N8p]
    q4: jax.Array  # int8 [N4p, Kp // 2]
    scale4: jax.Array  # f32 [G, N4p]
    zero4: jax.Array  # int8 [G, N4p]
    channel: jax.Array  # int32 [N8p + N4p], N for padding rows
    row_of_channel: jax.Array  # int32 [N]
    n: int  # out_features N
    k: int  # in_features K (true, unpadded)
    n8: int  # number of 8-bit channels (unpadded)
    # Optional, runtime only (never saved): the whole weight as one int8 matrix in channel order, [Np, Kp]
    # with Np = N rounded up to ROW_ALIGN, and its scales f32 [G, Np] (`unpack.int8_weight`: 4-bit rows as
    # u − z). The Hopper prefill GEMM then reads it instead of unpacking the 4-bit rows at every call, for
    # one more byte a weight held (`mgpu.with_int8_prefill`, `mixjax.model.int8_prefill`).
    prefill_w: jax.Array | None = None
    prefill_s: jax.Array | None = None
    # Runtime only (never saved): the codes of `q8` and `q4` in blocks of 64 rows × `tiled` K groups instead of
    # row-major (`tile_codes`; shapes unchanged; 0: row-major). The Pallas decode tiles, the GEMV and the prefill
    # unpack read this order directly (a tile's group within one block instead of 64 rows' pieces 2 KB apart:
    # benchmarks/NOTES-kernels.md item 125); every other reader first restores the row-major codes (`untiled`).
    tiled: int = 0

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n, self.k)

    @property
    def n4(self) -> int:
        return self.n - self.n8

    @property
    def k_padded(self) -> int:
        return self.q8.shape[1] if self.q8.shape[0] else self.q4.shape[1] * 2

    @property
    def num_groups(self) -> int:
        return self.k_padded // GROUP_SIZE

    def dequantize(self) -> jax.Array:  # f32 [N, k]
        return dequantize(self)

    def untiled(self) -> "MixedWeight":
        return untiled(self)

    def without_int8_prefill(self) -> "MixedWeight":
        """The stored form: this weight without the runtime-only int8 prefill matrix (`prefill_w`, `prefill_s`)."""
        return dataclasses.replace(self, prefill_w=None, prefill_s=None)

    def take_rows(self, ids: jax.Array) -> jax.Array:  # f32 [..., k]
        return take_rows(self, ids)

    def matmul(self, x, *, implementation: str = "auto", partials: bool = False) -> jax.Array:
        """x [..., K] float, or `QuantizedActivations` of such an x → [..., N] in x's dtype (leading dims
        flattened for the kernel). partials: f32 [S, ..., N] whose sum over S is the result before its
        rounding to x's dtype (a split-K kernel's unsummed partials, S = 1 otherwise), for a consumer that
        sums them itself (`pallas_kernels.rms_norm_quant`)."""
        from pallas_kernels.api import mixed_matmul

        if isinstance(x, (QuantizedActivations, NormedActivations)):
            lead, x2 = x.lead, x
        else:
            lead, x2 = x.shape[:-1], x.reshape(-1, x.shape[-1])
        y = mixed_matmul(x2, self, implementation=implementation, partials=partials)
        return y.reshape(-1, *lead, self.n) if partials else y.reshape(*lead, self.n)


jax.tree_util.register_dataclass(
    MixedWeight,
    data_fields=["q8", "scale8", "q4", "scale4", "zero4", "channel", "row_of_channel", "prefill_w", "prefill_s"],
    meta_fields=["n", "k", "n8", "tiled"],
)


@dataclasses.dataclass(frozen=True)
class QuantizedActivations:
    """Activations quantized ahead of a mixed linear, as `kernels.quantize_activations_pallas` lays them
    out: int8 codes per (row, group of 128), symmetric, with group-major scales and code sums. Made by a
    producer that quantizes while it writes (`pallas_kernels.rms_norm_quant`), so the linear's kernel
    skips its own quantization. Rows [0, M) hold the input's M = prod(lead) rows; rows ≥ M and columns
    ≥ k are zero.

    `row_scale` True: one scale a row (the row's maximum over all its groups), stored repeated in each of the
    row's G scales, so every consumer of per-group scales computes the right product; the prefill GEMM
    (`mgpu.mixed_matmul_mgpu`) reads one of them and rescales with s_w alone (`MgpuConfig(act_scale="token")`,
    `mgpu.PREFILL_ACT_SCALE`)."""

    x_q: jax.Array  # int8 [Mp, Kp]
    a_scale: jax.Array  # f32 [G, Mp]
    x_sum: jax.Array  # int32 [G, Mp], Σ of each group's codes
    lead: tuple[int, ...]  # the input's leading shape
    k: int  # in_features (unpadded)
    dtype: str  # the float dtype the input had: outputs come back in it
    row_scale: bool = False  # each row's G scales are one value (see above)

    @property
    def m(self) -> int:
        return int(np.prod(self.lead, dtype=np.int64))

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.lead, self.k)

    def rows(self, block_m: int) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(x_q, a_scale, x_sum) with a multiple of `block_m` rows covering M (zero rows appended if needed)."""
        mp = self.x_q.shape[0]
        want = _round_up(max(self.m, 1), block_m)
        if mp % block_m == 0 and mp >= want:
            return self.x_q, self.a_scale, self.x_sum
        pad = _round_up(max(mp, want), block_m) - mp
        return (jnp.pad(self.x_q, ((0, pad), (0, 0))), jnp.pad(self.a_scale, ((0, 0), (0, pad))),
                jnp.pad(self.x_sum, ((0, 0), (0, pad))))

    def dequantize(self) -> jax.Array:  # [*lead, k] in `dtype`: codes × scales (the XLA path's input)
        g = self.a_scale.shape[0]
        xq = self.x_q[: self.m].reshape(self.m, g, GROUP_SIZE).astype(jnp.float32)
        x = (xq * self.a_scale[:, : self.m].T[..., None]).reshape(self.m, g * GROUP_SIZE)[:, : self.k]
        return x.astype(self.dtype).reshape(self.shape)


jax.tree_util.register_dataclass(
    QuantizedActivations, data_fields=["x_q", "a_scale", "x_sum"], meta_fields=["lead", "k", "dtype", "row_scale"])


@dataclasses.dataclass(frozen=True)
class NormedActivations:
    """RMSNorm(s)·w not yet computed, for a linear that normalizes and quantizes its own groups: the residual
    stream s, its sums of squares per chunk of `chunk` groups (the first launch of the two-launch norm,
    `pallas_kernels.norm.rms_norm_defer_pallas`) and the norm's weight. The GEMV at M ≤ 2 reads it directly
    (each program normalizes and quantizes its groups: the norm's second launch disappears); every other
    path first makes the codes with that launch (`norm.normed_codes`)."""

    s: jax.Array  # [M, K] in `dtype`, the residual stream after the add
    ssq: jax.Array  # f32 [M, C] sums of squares of s per chunk of `chunk` groups of 128
    w: jax.Array  # [K] the norm's weight
    eps: float
    chunk: int
    lead: tuple[int, ...]

    @property
    def m(self) -> int:
        return int(np.prod(self.lead, dtype=np.int64))

    @property
    def k(self) -> int:
        return self.s.shape[-1]

    @property
    def dtype(self) -> str:
        return jnp.dtype(self.s.dtype).name

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.lead, self.k)


jax.tree_util.register_dataclass(
    NormedActivations, data_fields=["s", "ssq", "w"], meta_fields=["eps", "chunk", "lead"])


@dataclasses.dataclass(frozen=True)
class RowRms:
    """The one factor of RMSNorm(s)·w that needs the whole row: r = rsqrt(Σ s² / width + eps), one per row
    (token), as sums of squares per chunk of the row that the consumer adds up. `norm.rms_norm_codes_pallas`
    hands a linear the codes of w·s and this; since the linear commutes with a per-row factor, the
    consumer of the linear's output (the attention kernel after q/k/v, SwiGLU after gate/up) multiplies by
    r: W·(r·(w·s)) = r·(W·(w·s)). So the norm needs no second launch to wait for the row's sum."""

    ssq: jax.Array  # f32 [M, C]: sums of squares of s over C chunks of each of the M rows
    width: int  # the row's features D (the mean's divisor)
    eps: float

    def inv(self) -> jax.Array:
        """r f32 [M] (the reference; kernels add the chunks themselves)."""
        return jax.lax.rsqrt(jnp.sum(self.ssq, axis=-1) / self.width + self.eps)


jax.tree_util.register_dataclass(RowRms, data_fields=["ssq"], meta_fields=["width", "eps"])


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _concrete(name: str, value) -> np.ndarray:
    if isinstance(value, jax.core.Tracer):
        raise TypeError(f"pack_mixed: {name} must be a concrete array (pack outside jit), got a tracer")
    return np.asarray(value)


def _check_pack_inputs(q, scale, zero, is_int8, k, group_size) -> None:
    if group_size != GROUP_SIZE:
        raise ValueError(f"pack_mixed: group_size={group_size}; the kernels support only {GROUP_SIZE}")
    if q.ndim != 2 or q.shape[1] % GROUP_SIZE:
        raise ValueError(f"pack_mixed: q must be [N, Kp] with Kp a multiple of {GROUP_SIZE}, got {q.shape}")
    n, kp = q.shape
    g = kp // GROUP_SIZE
    if not 0 < k <= kp or kp - k >= GROUP_SIZE:
        raise ValueError(f"pack_mixed: k={k} must satisfy Kp - 128 < k <= Kp for q of shape {q.shape}")
    if scale.shape != (n, g) or zero.shape != (n, g):
        raise ValueError(f"pack_mixed: scale and zero must be [N, G] = {(n, g)}, got {scale.shape}, {zero.shape}")
    if is_int8.shape != (n,) or is_int8.dtype != np.bool_:
        raise ValueError(f"pack_mixed: is_int8 must be bool [{n}], got {is_int8.dtype} {is_int8.shape}")
    q8, q4 = q[is_int8], q[~is_int8]
    if q8.size and (q8.min() < -127 or q8.max() > 127):
        raise ValueError("pack_mixed: 8-bit codes must lie in [-127, 127] (symmetric, w ≈ q·s)")
    if q4.size and (q4.min() < 0 or q4.max() > 15):
        raise ValueError("pack_mixed: 4-bit codes must lie in [0, 15] (asymmetric, w ≈ (q − z)·s)")
    z4 = zero[~is_int8]
    if z4.size and (z4.min() < 0 or z4.max() > 15):
        raise ValueError("pack_mixed: 4-bit zero points must lie in [0, 15]")
    if np.any(q[:, k:] != 0):
        raise ValueError(f"pack_mixed: codes in the K padding (columns {k}..{kp - 1}) must be zero")


def pack_nibbles(u: np.ndarray) -> np.ndarray:
    """u int [R, Kp] in [0, 15] → int8 [R, Kp/2] in the signed-nibble order of the module docstring."""
    r, kp = u.shape
    s = u.astype(np.int16).reshape(r, kp // GROUP_SIZE, 2, HALF_GROUP) - 8  # [R, G, lo|hi, 64]
    byte = (s[:, :, 0] & 0xF) | ((s[:, :, 1] & 0xF) << 4)  # [R, G, 64]
    return byte.astype(np.uint8).view(np.int8).reshape(r, kp // 2)


def unpack_nibbles(b: jax.Array) -> jax.Array:
    """int8 [R, Kp/2] → int32 [R, Kp] codes u ∈ [0, 15] (inverse of `pack_nibbles`)."""
    r, half = b.shape
    b = b.reshape(r, half // HALF_GROUP, 1, HALF_GROUP)
    lo = jnp.left_shift(b, 4) >> 4  # [R, G, 1, 64] signed u - 8 (arithmetic shift)
    hi = b >> 4
    return (jnp.concatenate([lo, hi], axis=2).astype(jnp.int32) + 8).reshape(r, half * 2)


def _pad_rows(a: np.ndarray, rows: int) -> np.ndarray:
    return np.pad(a, [(0, rows - a.shape[0])] + [(0, 0)] * (a.ndim - 1))


def pack_mixed(q, scale, zero, is_int8, *, k: int, group_size: int = GROUP_SIZE) -> MixedWeight:
    """Packs quantizer output into a `MixedWeight`.

    q int [N, Kp] codes (Kp = G·128 ≥ k, zero-padded), 8-bit channels in [-127, 127] (w ≈ q·s),
    4-bit channels in [0, 15] (w ≈ (q − z)·s); scale f32 [N, G]; zero int [N, G] (ignored on 8-bit
    channels); is_int8 bool [N]; k the true in_features. Runs on concrete (host) arrays.
    """
    q, scale, zero, is_int8 = (
        _concrete(name, v) for name, v in (("q", q), ("scale", scale), ("zero", zero), ("is_int8", is_int8))
    )
    _check_pack_inputs(q, scale, zero, is_int8, k, group_size)
    n = q.shape[0]
    rows8 = np.flatnonzero(is_int8)
    rows4 = np.flatnonzero(~is_int8)
    n8p, n4p = _round_up(len(rows8), ROW_ALIGN), _round_up(len(rows4), ROW_ALIGN)
    q8 = _pad_rows(q[rows8].astype(np.int8), n8p)  # [N8p, Kp]
    q4 = _pad_rows(pack_nibbles(q[rows4]), n4p)  # [N4p, Kp/2]
    scale8 = _pad_rows(scale[rows8].astype(np.float32), n8p).T  # [G, N8p]
    scale4 = _pad_rows(scale[rows4].astype(np.float32), n4p).T  # [G, N4p]
    zero4 = _pad_rows(zero[rows4].astype(np.int8), n4p).T  # [G, N4p]
    channel = np.full(n8p + n4p, n, np.int32)
    channel[: len(rows8)] = rows8
    channel[n8p : n8p + len(rows4)] = rows4
    row_of_channel = np.empty(n, np.int32)
    row_of_channel[rows8] = np.arange(len(rows8))
    row_of_channel[rows4] = n8p + np.arange(len(rows4))
    arrays = (q8, scale8, q4, scale4, zero4, channel, row_of_channel)
    return MixedWeight(*(jnp.asarray(np.ascontiguousarray(a)) for a in arrays), n=n, k=k, n8=len(rows8))


def quantize_rtn(w, is_int8, *, group_size: int = GROUP_SIZE):
    """Round-to-nearest codes for `pack_mixed`: w f32 [N, K] → (q [N, Kp], scale [N, G], zero [N, G])."""
    w = np.asarray(w, np.float32)
    is_int8 = np.asarray(is_int8, bool)
    n, k = w.shape
    kp = _round_up(k, group_size)
    wg = np.pad(w, [(0, 0), (0, kp - k)]).reshape(n, kp // group_size, group_size)  # [N, G, 128]
    amax = np.abs(wg).max(-1)
    s8 = np.where(amax > 0, amax / 127, 1.0)
    q8 = np.clip(np.rint(wg / s8[..., None]), -127, 127)
    lo, hi = np.minimum(wg.min(-1), 0), np.maximum(wg.max(-1), 0)
    s4 = np.where(hi > lo, (hi - lo) / 15, 1.0)
    z4 = np.clip(np.rint(-lo / s4), 0, 15)
    q4 = np.clip(np.rint(wg / s4[..., None]) + z4[..., None], 0, 15)
    sel = is_int8[:, None, None]
    q = np.where(sel, q8, q4).reshape(n, kp).astype(np.int32)
    q[:, k:] = 0
    scale = np.where(is_int8[:, None], s8, s4).astype(np.float32)
    zero = np.where(is_int8[:, None], 0, z4).astype(np.int32)
    return q, scale, zero


def pack_rtn(w, is_int8, *, group_size: int = GROUP_SIZE) -> MixedWeight:
    """RTN-quantizes a float weight w [N, K] (8-bit sym where is_int8 [N], else 4-bit asym) and packs it."""
    w = np.asarray(w, np.float32)
    if w.ndim != 2:
        raise ValueError(f"pack_rtn: w must be [N, K], got shape {w.shape}")
    q, scale, zero = quantize_rtn(w, is_int8, group_size=group_size)
    return pack_mixed(q, scale, zero, np.asarray(is_int8, bool), k=w.shape[1], group_size=group_size)


TILE_ROWS = 64  # rows of a code block in the tiled order (`tile_codes`): the decode tiles' block_n
TILE_GROUPS = 1  # K groups side by side in a block row (`tile_codes(groups=)`). H100 (sessions 37–38,
# benchmarks/probe_tile_major.py): 1 — a decode tile's group one 4 KB block — takes 4–21 % off the decode tiles; the
# GEMV reads a row's 4 groups from 4 blocks through computed offsets (`gemv._grouped_kernel`), within −6 / +6 % of
# row-major; 4 — the GEMV's 4 groups a row contiguous — takes only 0–10 % off the decode tiles (their group is then
# 64 pieces 256 bytes apart): the page-sized contiguous block is what the decode tiles need


def block_groups(num_groups: int, groups: int) -> int:
    """The groups a block row holds for a weight of `num_groups` K groups: the largest of groups, groups/2, … 1
    that divides them."""
    while num_groups % groups:
        groups //= 2
    return groups


def _permute_codes(q: jax.Array, groups: int, quad: int, to_tiles: bool) -> jax.Array:
    """Codes [..., R, C] (C = groups · bytes a group) between row-major ([R/64, 64, G/Q, Q, ·]) and the tiled order
    ([R/64, G/Q, 64, Q, ·]: Q = `quad` groups side by side)."""
    *lead, r, c = q.shape
    if not q.size:
        return q
    if r % TILE_ROWS:
        raise ValueError(f"tile_codes: {r} packed rows are not a multiple of {TILE_ROWS}")
    t, w = r // TILE_ROWS, c // groups
    split = (t, TILE_ROWS, groups // quad, quad, w) if to_tiles else (t, groups // quad, TILE_ROWS, quad, w)
    return q.reshape(*lead, *split).swapaxes(-4, -3).reshape(*lead, r, c)


def tile_codes(qw: MixedWeight, groups: int | None = None) -> MixedWeight:
    """`qw` with its codes in blocks of 64 rows × Q K groups (`MixedWeight.tiled` = Q, the largest of `groups`,
    `groups`/2, … dividing G): within the same arrays, row-major [tiles, G/Q, 64, Q, bytes a group], so a block is
    64 rows' Q groups (16 KB of 4-bit codes at Q = 4; `groups` None: `TILE_GROUPS`). A runtime layout for the
    Pallas kernels on a GPU (`mixjax.model.fuse_projections` applies it there): a decode tile reads a group's 64 rows
    within one block, the GEMV a row's groups from their blocks.
    `untiled` is its inverse. Works on stacked weights (leading layer axes). A weight whose channels are all 8-bit
    stays row-major: the Hopper prefill GEMM reads its `q8` as it is stored (`mgpu.mixed_matmul_mgpu`)."""
    if qw.tiled or qw.n8 == qw.n:
        return qw
    g = -(-qw.k // GROUP_SIZE)
    quad = block_groups(g, groups or TILE_GROUPS)
    return dataclasses.replace(qw, q8=_permute_codes(qw.q8, g, quad, True), q4=_permute_codes(qw.q4, g, quad, True),
                               tiled=quad)


def untiled(qw: MixedWeight) -> MixedWeight:
    """`qw` with row-major codes (the stored format): the inverse of `tile_codes` (itself when not tiled)."""
    if not qw.tiled:
        return qw
    g = -(-qw.k // GROUP_SIZE)
    return dataclasses.replace(qw, q8=_permute_codes(qw.q8, g, qw.tiled, False),
                               q4=_permute_codes(qw.q4, g, qw.tiled, False), tiled=0)


def dequantize(qw: MixedWeight) -> jax.Array:  # f32 [N, k]
    """Reference dequantization into channel order."""
    qw = untiled(qw)
    g = qw.num_groups
    w8 = qw.q8.astype(jnp.float32).reshape(-1, g, GROUP_SIZE) * qw.scale8.T[..., None]  # [N8p, G, 128]
    u4 = unpack_nibbles(qw.q4).reshape(-1, g, GROUP_SIZE)  # [N4p, G, 128]
    w4 = (u4 - qw.zero4.T[..., None].astype(jnp.int32)).astype(jnp.float32) * qw.scale4.T[..., None]
    w = jnp.concatenate([w8, w4]).reshape(-1, g * GROUP_SIZE)  # [N8p + N4p, Kp]
    return w[qw.row_of_channel, : qw.k]


def _code_rows(qw: MixedWeight, q: jax.Array, rows: jax.Array, groups: int) -> jax.Array:
    """Packed rows `rows` (any shape) of codes q [R, C] in row-major order, whichever order `qw` stores."""
    if not qw.tiled:
        return q[rows]
    quad = qw.tiled
    blocks = q.reshape(q.shape[0] // TILE_ROWS, groups // quad, TILE_ROWS, quad, q.shape[1] // groups)
    return blocks[rows // TILE_ROWS, :, rows % TILE_ROWS].reshape(*rows.shape, q.shape[1])  # [..., G/Q, Q, ·] → [..., C]


def take_rows(qw: MixedWeight, ids: jax.Array) -> jax.Array:  # f32 [*ids.shape, k]
    """Dequantized rows (output channels) `ids` (int, any shape) of qw: `dequantize(qw)[ids]`, reading only
    those rows. With qw of shape (V, D) it is a quantized embedding table (and `.matmul` its tied LM head).

    Channel c sits at packed row r = row_of_channel[c]: 8-bit when r < N8p, else 4-bit row r − N8p. Both
    branches gather with clipped row indices (a few wasted rows) and `jnp.where` picks per id.
    """
    ids = jnp.asarray(ids)
    g, kp = qw.num_groups, qw.k_padded
    n8p, n4p = qw.q8.shape[0], qw.q4.shape[0]
    row = qw.row_of_channel[ids]  # [...] int32
    parts = []
    if n8p:
        r8 = jnp.clip(row, 0, n8p - 1)
        s8 = jnp.moveaxis(jnp.take(qw.scale8, r8, axis=1), 0, -1)  # [..., G]
        q8 = _code_rows(qw, qw.q8, r8, g).astype(jnp.float32).reshape(*ids.shape, g, GROUP_SIZE)  # [..., G, 128]
        parts.append(q8 * s8[..., None])
    if n4p:
        r4 = jnp.clip(row - n8p, 0, n4p - 1)
        u4 = unpack_nibbles(_code_rows(qw, qw.q4, r4, g).reshape(-1, kp // 2)).reshape(*ids.shape, g, GROUP_SIZE)
        z4 = jnp.moveaxis(jnp.take(qw.zero4, r4, axis=1), 0, -1).astype(jnp.int32)  # [..., G]
        s4 = jnp.moveaxis(jnp.take(qw.scale4, r4, axis=1), 0, -1)  # [..., G]
        parts.append((u4 - z4[..., None]).astype(jnp.float32) * s4[..., None])
    w = parts[0] if len(parts) == 1 else jnp.where((row < n8p)[..., None, None], parts[0], parts[1])
    return w.reshape(*ids.shape, kp)[..., : qw.k]
