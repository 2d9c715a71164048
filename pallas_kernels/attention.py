"""Grouped-query attention over a KV cache, and its decode kernel in one launch (Pallas-Triton).

Why: outside the GEMVs a W4.4A8 decode step on the H200 spends ≈ 0.87 ms of 2.4 ms in small XLA kernels,
and per layer the attention alone is two dots (2.7 + 2.4 µs), the mask, and the softmax's reductions, each a
launch of its own (session 11 profile, benchmarks/NOTES-kernels.md item 32). At decode every query row of a
key/value head reads the same cache rows, so one program per (batch row, KV head) can do all of it: the
scores of its G = H/KVH heads (× the T new tokens) against a block of cached keys on the tensor cores, an
online softmax (running max and sum, the flash-decoding recurrence), and the value dot, looping only over
the blocks that some row may see (up to the largest query position, and from the sliding window's start),
not over the whole cache. Long caches with few programs split the positions over `splits` programs per head;
XLA then merges their partial results. `attend_new_tokens_pallas` goes one step further: it starts from the
fused q/k/v projection's output (or its split-K partials), applies RoPE, writes the new keys and values into
the cache in place and attends to them from registers — one launch where the decoder layer had ≈ 10.

`attend_ref` is the arithmetic mixjax's model uses everywhere (and the kernel's reference): f32 scores of
q·k in q's dtype, × the int8 cache's key scales, / √Dh, masked with the f32 minimum, softmax in f32, × the
value scales, probabilities rounded to q's dtype for the value dot. The kernel computes the same quantities in
another order (exp(s − running max) unnormalized, divided by the running sum at the end), so it agrees
with the reference to the rounding of q's dtype, not bit for bit.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import pdl
from pallas_kernels.format import GROUP_SIZE, QuantizedActivations, RowRms
from pallas_kernels.norm import load_inv_rms, quant_rows

MAX_ROWS = 64  # query rows (T new tokens × G heads per KV head) one program holds: decode, not prefill
_NEG = float(jnp.finfo(jnp.float32).min)
V_BLOCK = 64  # an int8 cache's values in blocks of this many positions, each stored [Dh, V_BLOCK] (`block_values`)


def block_values(v: jax.Array, v_block: int) -> jax.Array:
    """A value store [..., S, Dh] in blocks of `v_block` positions, each block stored transposed ([Dh, v_block]:
    positions contiguous), in an array of the same shape; `v_block` 0: v as it is. S must be a multiple of
    `v_block`. Why: P·V reads the values along positions (the MMA's K), and an int8 cache stored position-major
    gives the kernel one-byte shared-memory loads there (NOTES-kernels.md item 139)."""
    if not v_block:
        return v
    *lead, S, Dh = v.shape
    return v.reshape(*lead, S // v_block, v_block, Dh).swapaxes(-1, -2).reshape(v.shape)


def unblock_values(v: jax.Array, v_block: int) -> jax.Array:
    """The inverse of `block_values`: the position-major [..., S, Dh] values."""
    if not v_block:
        return v
    *lead, S, Dh = v.shape
    return v.reshape(*lead, S // v_block, Dh, v_block).swapaxes(-1, -2).reshape(v.shape)


def value_offsets(pos, d, dh: int, v_block: int):
    """Flat offsets into one (row, KV head)'s [S·Dh] value store of positions `pos` and features `d`
    (broadcast against each other), in `block_values`' order for `v_block` > 0."""
    if not v_block:
        return pos * dh + d
    # truncating division (positions are ≥ 0): jnp's floor forms add sign fix-ups that hide from Triton that
    # a block's positions are contiguous, and the loads would go byte by byte
    return lax.div(pos, v_block) * (v_block * dh) + d * v_block + lax.rem(pos, v_block)


def attend_ref(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
               k_scale: jax.Array | None = None, v_scale: jax.Array | None = None, *, scale: float | None = None,
               softcap: float | None = None) -> jax.Array:
    """Grouped-query attention. q [B, T, H, Dh], k/v [B, KVH, S, Dh], mask [B, T, S] → [B, T, H, Dh].

    With an int8 cache, k/v hold codes and k_scale/v_scale [B, KVH, S] their per-position scales: the
    key scale multiplies the f32 scores and the value scale the probabilities, so the dequantized
    cache is never materialised. scale: the scores' factor (None: 1/√Dh); softcap: scores → cap·tanh(scores / cap)
    before the mask (Gemma 2).
    """
    B, T, H, Dh = q.shape
    KVH = k.shape[1]
    q = q.reshape(B, T, KVH, H // KVH, Dh)  # [B, T, KVH, G, Dh]
    scores = jnp.einsum("btkgd,bksd->bkgts", q, k.astype(q.dtype), preferred_element_type=jnp.float32)
    if k_scale is not None:
        scores = scores * k_scale.astype(jnp.float32)[:, :, None, None, :]
    scores = scores / math.sqrt(Dh) if scale is None else scores * scale  # [B, KVH, G, T, S]
    if softcap is not None:
        scores = softcap * jnp.tanh(scores / softcap)
    scores = jnp.where(mask[:, None, None], scores, _NEG)
    probs = jax.nn.softmax(scores, axis=-1)
    if v_scale is not None:
        probs = probs * v_scale.astype(jnp.float32)[:, :, None, None, :]
    out = jnp.einsum("bkgts,bksd->btkgd", probs.astype(q.dtype), v.astype(q.dtype))  # in q's dtype, as HF does
    return out.reshape(B, T, H, Dh)


def cudnn_attention_available(device=None) -> bool:
    """True on an NVIDIA GPU of compute capability ≥ 8.0, where jax's cuDNN fused attention runs (ROCm
    devices report no compute capability)."""
    device = device or jax.devices()[0]
    try:
        return device.platform == "gpu" and float(getattr(device, "compute_capability", "0")) >= 8.0
    except ValueError:
        return False


def cudnn_head_dim_limit(device=None) -> int:
    """The widest head cuDNN's fused attention takes for inference (jax's own rule): 256 on Hopper and later,
    128 on Ampere and Ada, 0 where `cudnn_attention_available` says no."""
    device = device or jax.devices()[0]
    if not cudnn_attention_available(device):
        return 0
    return 256 if float(device.compute_capability) >= 9.0 else 128


def prefill_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, q_pos: jax.Array | None = None,
                      sliding_window: int | None = None, scale: float | None = None) -> jax.Array:
    """`attend_ref` for a float cache through cuDNN's fused flash attention (`jax.nn.dot_product_attention`,
    implementation "cudnn": NVIDIA GPUs, bf16/f16, head dim a multiple of 8 up to `cudnn_head_dim_limit`):
    q [B, T, H, Dh], k/v [B, KVH, S, Dh], mask [B, T, S] → [B, T, H, Dh] in q's dtype; the scores (× `scale`,
    default Dh^-1/2) are never written to memory.

    The general case hands cuDNN the whole mask (added as a bias), so causality, sliding windows and
    ragged rows are exactly `attend_ref`'s. Given q_pos [B, T] (and the mask's sliding_window), a chunk
    whose rows all sit at positions 0 … T − 1 — a prompt into an empty cache — takes cuDNN's own causal
    mask instead, which skips the blocks above the diagonal (the same visible keys: cache position s ≤
    query row t, and t − s < sliding_window); the choice is made on the device (`lax.cond`). Rounding
    differs from `attend_ref` by q's dtype (the probabilities are rounded to it there too)."""
    keys, values = (a.astype(q.dtype).transpose(0, 2, 1, 3) for a in (k, v))  # [B, S, KVH, Dh]

    def masked():
        return jax.nn.dot_product_attention(q, keys, values, mask=mask[:, None], scale=scale, implementation="cudnn")

    if q_pos is None:
        return masked()

    def causal():
        window = None if sliding_window is None else (sliding_window - 1, 0)
        return jax.nn.dot_product_attention(q, keys, values, scale=scale, is_causal=True, local_window_size=window,
                                            implementation="cudnn")

    fresh = jnp.all(q_pos == jnp.arange(q.shape[1], dtype=q_pos.dtype)[None])
    return lax.cond(fresh, causal, masked)


def cache_mask(q_pos: jax.Array, num_positions: int, sliding_window: int | None) -> jax.Array:
    """q_pos [B, T] (the new tokens' positions) → bool [B, T, S]: cache position s is visible to the token at
    position p when s ≤ p, and p − s < sliding_window if there is a window."""
    diff = q_pos[:, :, None] - jnp.arange(num_positions, dtype=jnp.int32)[None, None, :]
    mask = diff >= 0
    if sliding_window is not None:
        mask &= diff < sliding_window
    return mask


def decode_attention_ref(q: jax.Array, k: jax.Array, v: jax.Array, q_pos: jax.Array, *,
                         sliding_window: int | None = None, k_scale: jax.Array | None = None,
                         v_scale: jax.Array | None = None, scale: float | None = None,
                         softcap: float | None = None) -> jax.Array:
    """`attend_ref` with the causal (and sliding-window) mask of the tokens at q_pos [B, T] over a cache of S
    positions: what `decode_attention_pallas` computes."""
    return attend_ref(q, k, v, cache_mask(q_pos, k.shape[2], sliding_window), k_scale, v_scale, scale=scale,
                      softcap=softcap)


def _dot_nt(a, b):  # a [m, d] · b [n, d]ᵀ in f32 (`pl.dot` is gone in jax 0.11)
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _dot_nn(a, b):  # a [m, s] · b [s, d] in f32
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _rint(y):
    """Round half to even, as jnp.round (which has no Triton lowering). Not (y + 1.5·2^23) − 1.5·2^23: XLA's
    CPU compiler folds that back to y, so interpret mode would not round at all."""
    r = jnp.floor(y + 0.5)
    odd = jnp.floor(r * 0.5) * 2.0 != r
    return jnp.where((r - y == 0.5) & odd, r - 1.0, r)


def _quantize_vec(x, scale_dtype):
    """x [Dh] → (int8 codes, scale in scale_dtype): `mixjax.model._quantize_kv`'s arithmetic for one row."""
    xf = x.astype(jnp.float32)
    scale = (jnp.max(jnp.abs(xf)) / 127.0).astype(scale_dtype)
    sf = scale.astype(jnp.float32)
    codes = jnp.clip(_rint(xf / jnp.where(sf > 0, sf, 1.0)), -127.0, 127.0)
    return codes.astype(jnp.int8), scale


def _kernel(*refs, t: int, g: int, heads: int, kv_heads: int, rows: int, dh: int, s_len: int, block_s: int,
            per_split: int, window: int | None, scaled: bool, splits: int, dtype, fused: bool = False,
            parts: int = 0, has_bias: bool = False, rms: tuple | None = None, codes: int = 0, batch: int = 0,
            pdl_on: bool = False, v_block: int = 0, qk_eps: float | None = None, score_scale: float | None = None,
            softcap: float | None = None):
    """One program per (batch row b, KV head h, split p). Refs, in order: unfused — q [B, T·H·Dh], k, v
    [B, KVH, S·Dh], q_pos [B, T], (k, v scales [B, KVH, S]); fused — the projection [B, T·W] or partials
    [P, B, T·W], (bias [W]), (the RowRms's ssq [B·T, C]), (with `qk_eps`: the query and key head norms' weights
    [2, Dh]), q_pos, cos, sin [B, T·Dh], k, v, (scales); then the
    outputs: the attention [B, T·H·Dh] (splits = 1) or this split's o/m/l, and for fused the cache stores
    (aliased to k, v, scales). `codes` > 0 (splits = 1, Dh = 128): the attention as o_proj's int8 codes instead,
    `QuantizedActivations`' three arrays with `codes` rows (≥ B·T = `batch`·T; the rows past it zero), one group
    a head. `v_block` > 0: the value store in `block_values`' order. `score_scale` (None: 1/√Dh) and `softcap`
    (scores → cap·tanh(scores / cap) before the mask, Gemma 2): `attend_ref`'s."""
    refs = list(refs)

    def take(n):
        return [refs.pop(0) for _ in range(n)]

    b, h, p = pdl.program_ids(3, pdl_on, trigger=True)
    r = jnp.arange(rows)
    # rows past T·G (the MMA takes ≥ 16) repeat the live rows: they compute the same values and store them
    # to the same places, so no store needs a row mask (a masked store with repeated addresses would write
    # the old value back in interpret mode)
    src = r % (t * g)
    ti = src // g
    head = h * g + src % g
    d = jnp.arange(dh)
    q_off = (ti * heads + head)[:, None] * dh + d[None, :]  # into the flat [T·H·Dh] row of batch b
    ks_ref = vs_ref = None
    if fused:  # the projection's output (or its split-K partials) → RoPE → q, and the new keys/values
        (x_ref,) = take(1)
        bias_ref = take(1)[0] if has_bias else None
        ssq_ref = take(1)[0] if rms else None
        qkn_ref = take(1)[0] if qk_eps is not None else None
        pos_ref, cos_ref, sin_ref, k_ref, v_ref = take(5)
        if scaled:
            ks_ref, vs_ref = take(2)
        outs = refs
        k_out, v_out = outs[len(outs) - (4 if scaled else 2):][:2]
        width = (heads + 2 * kv_heads) * dh

        inv_rms = {}

        def row_inv(tok):  # r of token(s) tok: an int, or the [rows, 1] token of every query row (`ti`)
            key = tok if isinstance(tok, int) else "rows"
            if key not in inv_rms:
                inv_rms[key] = load_inv_rms(ssq_ref, b * t + tok, *rms)
            return inv_rms[key]

        def columns(tok, col):  # token(s) tok, columns col (broadcastable) → Σ partials (× r) in the dtype, + bias
            off = tok * width + col
            if parts:
                acc = plgpu.load(x_ref.at[0, b, off]).astype(jnp.float32)
                for j in range(1, parts):
                    acc = acc + plgpu.load(x_ref.at[j, b, off]).astype(jnp.float32)
            else:
                acc = plgpu.load(x_ref.at[b, off])
            if rms:
                acc = acc.astype(jnp.float32) * row_inv(tok)
            val = acc.astype(dtype)
            if has_bias:
                val = (val + plgpu.load(bias_ref.at[col]).astype(dtype)).astype(dtype)
            return val

        def rotated(tok, first, which):  # the head whose features start at column `first`, RoPE'd (rotate-half);
            # with `qk_eps`, first RMS-normalized over its Dh features and scaled by norm `which` (0 query, 1 key)
            other = (d + dh // 2) % dh
            x = columns(tok, first + d)
            partner = columns(tok, first + other)
            if qk_eps is not None:  # as `model.rms_norm`: in f32, cast back, then × the weight in the dtype
                xf = x.astype(jnp.float32)
                inv = jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + qk_eps)
                x = (plgpu.load(qkn_ref.at[which, d]).astype(dtype) * (xf * inv).astype(dtype)).astype(dtype)
                partner = (plgpu.load(qkn_ref.at[which, other]).astype(dtype) *
                           (partner.astype(jnp.float32) * inv).astype(dtype)).astype(dtype)
            rot = jnp.where(d < dh // 2, -partner, partner)
            tab = tok * dh + d
            cos = plgpu.load(cos_ref.at[b, tab]).astype(dtype)
            sin = plgpu.load(sin_ref.at[b, tab]).astype(dtype)
            return ((x * cos).astype(dtype) + (rot * sin).astype(dtype)).astype(dtype)

        if 2 * t * g <= rows:  # mostly padding (decode: T·G = 4 of 16 rows): each live row once, then repeated
            q = jnp.zeros((rows, dh), dtype)
            for i in range(t * g):
                q = jnp.where((src == i)[:, None], rotated(i // g, (h * g + i % g) * dh, 0)[None, :], q)
        else:
            q = rotated(ti[:, None], head[:, None] * dh, 0)  # [rows, Dh]
        # the new tokens' keys and values of this KV head, one [Dh] vector each (T is small: decode)
        new = []
        tp = pl.next_power_of_2(t)
        ts = jnp.arange(tp)
        tpos = plgpu.load(pos_ref.at[b, ts], mask=ts < t, other=0)  # (vector loads only: no scalar ref access)
        one = jnp.arange(1)  # scalar stores as one-element vectors
        for tt in range(t):
            pos_t = jnp.sum(jnp.where(ts == tt, tpos, 0))
            k_t = rotated(tt, (heads + h) * dh, 1)
            v_t = columns(tt, (heads + kv_heads + h) * dh + d)
            write = (pos_t < s_len) & (p == 0)  # positions past the cache are dropped, as `_write_cache` does
            if scaled:
                (k_t, k_sc), (v_t, v_sc) = _quantize_vec(k_t, outs[-2].dtype), _quantize_vec(v_t, outs[-1].dtype)
                plgpu.store(outs[-2].at[b, h, pos_t + one], jnp.broadcast_to(k_sc, (1,)), mask=write & (one == 0))
                plgpu.store(outs[-1].at[b, h, pos_t + one], jnp.broadcast_to(v_sc, (1,)), mask=write & (one == 0))
                k_sc, v_sc = k_sc.astype(jnp.float32), v_sc.astype(jnp.float32)
            else:
                k_t, v_t, k_sc, v_sc = k_t.astype(k_out.dtype), v_t.astype(v_out.dtype), None, None
            plgpu.store(k_out.at[b, h, pos_t * dh + d], k_t, mask=(d < dh) & write)
            plgpu.store(v_out.at[b, h, value_offsets(pos_t, d, dh, v_block)], v_t, mask=(d < dh) & write)
            new.append((pos_t, write, k_t, v_t, k_sc, v_sc))
        old_end = new[0][0]  # the cache holds the positions before the new tokens; those come from registers
    else:
        q_ref, k_ref, v_ref, pos_ref = take(4)
        if scaled:
            ks_ref, vs_ref = take(2)
        outs = refs
        q = plgpu.load(q_ref.at[b, q_off])  # [rows, Dh]
        old_end = s_len
    qpos = plgpu.load(pos_ref.at[b, ti])  # [rows]
    # the cached blocks some row may see: up to the largest position, from the window's start
    hi = jnp.minimum(jnp.minimum(jnp.max(qpos) + 1, s_len), old_end)
    stop = jnp.minimum((p + 1) * per_split, (hi + block_s - 1) // block_s)
    start = p * per_split
    if window is not None:
        start = jnp.maximum(start, jnp.maximum(jnp.min(qpos) - window + 1, 0) // block_s)
    scale = 1.0 / math.sqrt(dh) if score_scale is None else score_scale
    kd = jnp.arange(block_s)

    def scored(s):  # q·k → the scores the softmax takes (before the mask)
        s = s * scale
        return s if softcap is None else softcap * jnp.tanh(s / softcap)

    def seen_by(kpos):  # [rows, n]: causal and inside the window
        seen = kpos[None, :] <= qpos[:, None]
        if window is not None:
            seen &= qpos[:, None] - kpos[None, :] < window
        return seen

    def update(carry, s, seen, vals, v_scale):  # the online softmax over one more block of keys
        m, l, acc = carry
        s = jnp.where(seen, s, _NEG)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp(m - m_new)
        e = jnp.where(seen, jnp.exp(s - m_new[:, None]), 0.0)
        l = l * alpha + jnp.sum(e, axis=1)
        if v_scale is not None:
            e = e * v_scale[None, :]
        return m_new, l, acc * alpha[:, None] + _dot_nn(e.astype(dtype), vals.astype(dtype))

    def body(j, carry):
        kp = j * block_s + kd  # [block_s] cache positions
        inb = kp < hi
        off = kp[:, None] * dh + d[None, :]
        keys = plgpu.load(k_ref.at[b, h, off], mask=inb[:, None], other=0)
        s = _dot_nt(q, keys.astype(dtype))  # [rows, block_s] f32
        if scaled:
            s = s * plgpu.load(ks_ref.at[b, h, kp], mask=inb, other=0.0).astype(jnp.float32)[None, :]
        vs = plgpu.load(vs_ref.at[b, h, kp], mask=inb, other=0.0).astype(jnp.float32) if scaled else None
        if v_block:  # [Dh, block_s], positions contiguous; P·V takes it transposed
            v_off = value_offsets(kp[None, :], d[:, None], dh, v_block)
            # unmasked where every block lies inside the store (a mask along the positions would split the
            # loads into bytes); the positions past `hi` hold finite codes, and their probabilities are 0
            vals = (plgpu.load(v_ref.at[b, h, v_off]) if s_len % block_s == 0 else
                    plgpu.load(v_ref.at[b, h, v_off], mask=inb[None, :], other=0)).T
        else:
            vals = plgpu.load(v_ref.at[b, h, off], mask=inb[:, None], other=0)
        return update(carry, scored(s), seen_by(kp) & inb[None, :], vals, vs)

    init = (jnp.full((rows,), _NEG, jnp.float32), jnp.zeros((rows,), jnp.float32), jnp.zeros((rows, dh), jnp.float32))
    carry = lax.fori_loop(start, jnp.maximum(stop, start), body, init)
    if fused:  # the new tokens' keys and values, straight from registers (split 0 only), one at a time
        for pos_t, write, k_t, v_t, k_sc, v_sc in new:
            m, l, acc = carry
            s_t = jnp.sum(q.astype(jnp.float32) * k_t.astype(dtype).astype(jnp.float32)[None, :], axis=1)  # [rows]
            if scaled:
                s_t = s_t * k_sc
            seen = (pos_t <= qpos) & write
            if window is not None:
                seen &= qpos - pos_t < window
            s_t = jnp.where(seen, scored(s_t), _NEG)
            m_new = jnp.maximum(m, s_t)
            alpha = jnp.exp(m - m_new)
            e = jnp.where(seen, jnp.exp(s_t - m_new), 0.0)
            l = l * alpha + e
            if scaled:
                e = e * v_sc
            pv = e.astype(dtype).astype(jnp.float32)[:, None] * v_t.astype(dtype).astype(jnp.float32)[None, :]
            carry = (m_new, l, acc * alpha[:, None] + pv)
    m, l, acc = carry
    if splits == 1 and codes:  # normalized, rounded to q's dtype, then quantized per head (one K group of o_proj)
        y = (acc / jnp.where(l > 0, l, 1.0)[:, None]).astype(dtype).astype(jnp.float32)
        _store_head_codes(y, *outs[:3], b * t + ti, head, d, b=b, h=h, last=batch - 1, t=t, g=g, codes=codes)
    elif splits == 1:  # normalized, in q's dtype; a row that sees no position (only past the cache) gives 0
        out = acc / jnp.where(l > 0, l, 1.0)[:, None]
        plgpu.store(outs[0].at[b, q_off], out.astype(dtype))
    else:  # this split's unnormalized sum with its max and sum, merged by `_merge`
        o_ref, m_ref, l_ref = outs[:3]
        plgpu.store(o_ref.at[p, b, h, r[:, None] * dh + d[None, :]], acc)
        plgpu.store(m_ref.at[p, b, h, r], m)
        plgpu.store(l_ref.at[p, b, h, r], l)


def _store_head_codes(y, q_ref, sc_ref, sum_ref, row, head, d, *, b, h, last: int, t: int, g: int, codes: int):
    """y [rows, Dh] f32 (Dh = 128, or a multiple with `WIDE_HEAD_CODES`: Dh / 128 groups a head), query row i → code
    row row[i], head head[i] (repeated rows store the same values again): int8 codes, scale and code sum per (row,
    group) as `reference.quantize_groups` and `kernels.quantize_activations_xla` make them (scales and sums
    group-major, [H·Dh/128, codes]). The last batch
    row's programs also zero their heads' groups in the padding rows B·T … codes − 1. Where the T·G live rows tile
    the MMA's rows (a power of two), they are taken out of the repeats first: H200, 2026-12-06 (`s36b`, `@attlive`),
    the attention 504 → 487 µs a b32 step (b32 +0.8 %, b8 +0.3 %) against quantizing all 16 rows."""
    live = t * g
    if live < y.shape[0] and live & (live - 1) == 0:
        y = jnp.max(y.reshape(y.shape[0] // live, live, y.shape[1]), axis=0)  # the repeats are equal: the live rows
        i = jnp.arange(live)
        row, head = b * t + i // g, h * g + i % g
    dh = y.shape[1]
    ng = dh // GROUP_SIZE  # o_proj's K groups a head
    ay = jnp.abs(y)
    amaxes, q_groups = [], []
    for k in range(ng):  # each group of 128 along the head its own scale (one group: no masks, as before)
        in_k = (d // GROUP_SIZE == k)[None, :] if ng > 1 else None
        amax = jnp.max(ay if ng == 1 else jnp.where(in_k, ay, 0.0), axis=1)  # [rows]
        inv = jnp.where(amax > 0, 127.0 / jnp.where(amax > 0, amax, 1.0), 0.0)
        q_k = jnp.clip(jnp.floor(y * inv[:, None] + 0.5), -127.0, 127.0)
        amaxes.append(amax)
        q_groups.append(q_k if ng == 1 else jnp.where(in_k, q_k, 0.0))
    qv = functools.reduce(jnp.add, q_groups)  # (the groups' codes are disjoint along the head)
    plgpu.store(q_ref.at[row[:, None], head[:, None] * dh + d[None, :]], qv.astype(jnp.int8))
    for k in range(ng):
        plgpu.store(sc_ref.at[head * ng + k, row], amaxes[k] / 127.0)
        plgpu.store(sum_ref.at[head * ng + k, row], jnp.sum(q_groups[k], axis=1).astype(jnp.int32))
    pad = codes - (last + 1) * t
    if pad:  # static: the rows past the live ones × this KV head's g heads, one flat index (masked to real counts)
        gp = pl.next_power_of_2(g)
        i = jnp.arange(pl.next_power_of_2(pad) * gp)
        pr, gi = (last + 1) * t + i // gp, i % gp
        on = (b == last) & (pr < codes) & (gi < g)
        hd = h * g + gi
        plgpu.store(q_ref.at[pr[:, None], hd[:, None] * dh + d[None, :]],
                    jnp.zeros((i.shape[0], dh), jnp.int8), mask=on[:, None] & (d < dh)[None, :])
        for k in range(ng):
            plgpu.store(sc_ref.at[hd * ng + k, pr], jnp.zeros(i.shape, jnp.float32), mask=on)
            plgpu.store(sum_ref.at[hd * ng + k, pr], jnp.zeros(i.shape, jnp.int32), mask=on)


def _merge(o, m, l):
    """Splits' partials o [P, B, KVH, R, Dh], m/l [P, B, KVH, R] → the normalized [B, KVH, R, Dh] (f32)."""
    top = jnp.max(m, axis=0)
    w = jnp.where(l > 0, jnp.exp(m - top), 0.0)  # [P, B, KVH, R]
    total = jnp.sum(w * l, axis=0)
    return jnp.sum(w[..., None] * o, axis=0) / jnp.where(total > 0, total, 1.0)[..., None]


def choose_block(dh: int, itemsize: int) -> int:
    """Cache positions a loop iteration: 128 where a block of keys fits 32 KB (bf16 and int8 caches at head dim
    128; keys and values, two stages: at most 128 KB of shared memory, 72 KB as Triton 3.9 compiles the fused step
    offline), else the largest power of two that does (f32 caches: 64). Measured (H200, 2026-12-03, `bench_attention.py`): 128 beats 64 by 1.1–1.3× at b1 and b32 on
    a 384-position cache and ties at 4096."""
    block = 128
    while block > 16 and block * dh * itemsize > 32768:
        block //= 2
    return block


INT8_BLOCK_STAGES = (64, 3)  # the fused decode step's (positions a block, blocks in flight) on an int8 cache. H100,
# 2026-12-06 (`device_session.sh s38c`, `s38d`; 74 KB of shared memory, 167 registers a thread against 243 at 128 × 2
# offline): attention 489 → 454 µs a b32 step (+1 % tok/s), 201 → 163 µs at b1; float caches keep `choose_block` × 2


LONG_CACHE_BLOCK_STAGES = (2048, 64, 3)  # (cache positions from which, block, stages) of a bf16 cache whose
# 64-position blocks take 16 KB: the b1 step of Llama-3-8B heads, H100, 2026-12-07 (`device_session.sh s52a`, µs a
# layer): 11.2 against 12.7 at 2304 positions, 13.4 against 14.6 at 4096, but 5.9 against 5.1 at 384; b32 (`s52b`)
# ties (100.4 against 100.6 at 2304, 173.3 against 173.9 at 4096); a 2048 + 256-token W4.4A8 request 0.676 against
# 0.688 s


def fused_block_stages(dh: int, itemsize: int, positions: int = 0) -> tuple[int, int]:
    """`attend_new_tokens_pallas`' default block and stages: `INT8_BLOCK_STAGES` for an int8 cache,
    `LONG_CACHE_BLOCK_STAGES` for a long bf16 one, else (`choose_block`, 2). positions: the cache's length."""
    if itemsize == 1:
        return min(INT8_BLOCK_STAGES[0], choose_block(dh, itemsize)), INT8_BLOCK_STAGES[1]
    least, block, stages = LONG_CACHE_BLOCK_STAGES
    if itemsize == 2 and positions >= least and block * dh * itemsize <= 16384:
        return block, stages
    return choose_block(dh, itemsize), 2


CODES_ONE_SPLIT = (64, 512)  # (programs, positions): with o_proj's codes asked for, caches of at most that many
# positions (4 blocks of 128; session 38 counts positions, so 64-position blocks keep it) take one split from that
# many (row, KV head) programs on, so the codes come from the programs and neither the
# merge nor the quantization is a launch. H100, 2026-12-06 (`device_session.sh s36a`, b8 × 8 KV heads, 3 blocks of
# 128 positions, 256 steps): 2 712 against 2 643 tok/s (+2.6 %; attention 289 → 319 µs a step, 64 launches fewer)


def choose_splits(batch: int, kv_heads: int, positions: int, block_s: int, codes: bool = False) -> int:
    """Programs per (row, KV head): enough for ≈ 128 programs, each at least one block. Measured (H200,
    2026-12-03, `bench_attention.py --fused-splits`, the fused step on 8 split-K partials, Llama-3-8B heads,
    128-position blocks): at b1 a 384-position cache takes 5.3 µs with 3 splits against 7.0 with one, 4096
    positions 13.5 µs with 16 against 15.2 with 8 (the earlier rule, ≥ 4 blocks a split); at b32 (256
    programs already) splits only cost: 24.1 µs with 3 against 17.8 with one. `codes`: the step hands o_proj
    its codes (`attend_new_tokens_pallas(codes=True)`), which one split makes in the programs: `CODES_ONE_SPLIT`."""
    blocks = -(-positions // block_s)
    if codes and batch * kv_heads >= CODES_ONE_SPLIT[0] and positions <= CODES_ONE_SPLIT[1]:
        return 1
    return max(1, min(-(-128 // (batch * kv_heads)), blocks))


@functools.partial(jax.jit, static_argnames=("sliding_window", "block_s", "splits", "num_warps", "v_block", "scale",
                                             "softcap", "interpret"))
def _decode_attention(q, k, v, q_pos, k_scale, v_scale, *, sliding_window, block_s, splits, num_warps, v_block,
                      scale, softcap, interpret):
    B, T, H, Dh = q.shape
    KVH, S = k.shape[1], k.shape[2]
    g = H // KVH
    rows = max(16, pl.next_power_of_2(T * g))
    blocks = -(-S // block_s)
    per_split = -(-blocks // splits)
    scaled = k_scale is not None
    args = [q.reshape(B, T * H * Dh), k.reshape(B, KVH, S * Dh), v.reshape(B, KVH, S * Dh), q_pos.astype(jnp.int32)]
    if scaled:
        args += [k_scale, v_scale]
    if splits == 1:
        out_shape = jax.ShapeDtypeStruct((B, T * H * Dh), q.dtype)
    else:
        out_shape = (jax.ShapeDtypeStruct((splits, B, KVH, rows * Dh), jnp.float32),
                     jax.ShapeDtypeStruct((splits, B, KVH, rows), jnp.float32),
                     jax.ShapeDtypeStruct((splits, B, KVH, rows), jnp.float32))
    res = pl.pallas_call(
        functools.partial(_kernel, pdl_on=pdl.active(interpret),
                          t=T, g=g, heads=H, kv_heads=KVH, rows=rows, dh=Dh, s_len=S, block_s=block_s,
                          per_split=per_split, window=sliding_window, scaled=scaled, splits=splits, dtype=q.dtype,
                          v_block=v_block, score_scale=scale, softcap=softcap),
        out_shape=out_shape,
        grid=(B, KVH, splits),
        interpret=interpret,
        name="decode_attention",
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=2),
    )(*args)
    if splits == 1:
        return res.reshape(B, T, H, Dh)
    out = _merge(res[0].reshape(splits, B, KVH, rows, Dh), res[1], res[2])[:, :, : T * g]  # [B, KVH, T·G, Dh]
    return out.reshape(B, KVH, T, g, Dh).transpose(0, 2, 1, 3, 4).reshape(B, T, H, Dh).astype(q.dtype)


def decode_attention_pallas(q: jax.Array, k: jax.Array, v: jax.Array, q_pos: jax.Array, *,
                            sliding_window: int | None = None, k_scale: jax.Array | None = None,
                            v_scale: jax.Array | None = None, block_s: int | None = None, splits: int | None = None,
                            num_warps: int = 4, v_block: int = 0, scale: float | None = None,
                            softcap: float | None = None, interpret: bool = False) -> jax.Array:
    """`decode_attention_ref` in one launch (two with splits > 1): q [B, T, H, Dh] the new tokens' queries at
    positions q_pos [B, T]; k/v [B, KVH, S, Dh] the cache (float, or int8 codes with k_scale/v_scale
    [B, KVH, S]) already holding the new tokens → [B, T, H, Dh] in q's dtype.

    T·H/KVH ≤ MAX_ROWS (decode and short chunks; prefill takes `attend_ref`). splits: programs per (row, KV
    head) over the positions (None: `choose_splits`). A row whose every position is masked (only positions
    past the cache) gives zeros where the reference averages the whole cache. `v_block`: an int8 cache's
    values in `block_values`' order (the order of an int8 `KVCache` with `v_block` set)."""
    if q.ndim != 4 or k.ndim != 4 or v.shape != k.shape:
        raise ValueError(f"decode_attention: q must be [B, T, H, Dh] and k, v the same [B, KVH, S, Dh]; "
                         f"got q {q.shape}, k {k.shape}, v {v.shape}")
    B, T, H, Dh = q.shape
    if k.shape[0] != B or k.shape[3] != Dh or k.shape[1] == 0 or H % k.shape[1]:
        raise ValueError(f"decode_attention: k {k.shape} does not match q {q.shape} "
                         "(same batch and head dim, KV heads dividing the query heads)")
    if q_pos.shape != (B, T):
        raise ValueError(f"decode_attention: q_pos must be [B, T] = {(B, T)}; got {q_pos.shape}")
    if (k_scale is None) != (v_scale is None) or (k_scale is None) != (k.dtype != jnp.int8):
        raise ValueError("decode_attention: an int8 cache needs both k_scale and v_scale, a float cache neither")
    if k_scale is not None and (k_scale.shape != k.shape[:3] or v_scale.shape != k.shape[:3]):
        raise ValueError(f"decode_attention: k_scale/v_scale must be [B, KVH, S] = {k.shape[:3]}; "
                         f"got {k_scale.shape}, {v_scale.shape}")
    _check_v_block("decode_attention", v_block, v)
    g = H // k.shape[1]
    if T * g > MAX_ROWS:
        raise ValueError(f"decode_attention: {T} tokens × {g} heads per KV head = {T * g} query rows > {MAX_ROWS}; "
                         "use attend_ref (XLA) for prefill-sized chunks")
    if block_s is None:
        block_s = choose_block(Dh, k.dtype.itemsize)
    if block_s < 16 or block_s & (block_s - 1) or Dh < 16 or Dh & (Dh - 1):
        raise ValueError(f"decode_attention: block_s ({block_s}) and the head dim ({Dh}) must be powers of two ≥ 16")
    if q.size == 0 or k.shape[2] == 0:
        return decode_attention_ref(q, k, unblock_values(v, v_block), q_pos, sliding_window=sliding_window,
                                    k_scale=k_scale, v_scale=v_scale, scale=scale, softcap=softcap)
    if splits is None:
        splits = choose_splits(B, k.shape[1], k.shape[2], block_s)
    splits = max(1, min(int(splits), -(-k.shape[2] // block_s)))
    return _decode_attention(q, k, v, q_pos, k_scale, v_scale, sliding_window=sliding_window, block_s=block_s,
                             splits=splits, num_warps=num_warps, v_block=v_block,
                             scale=None if scale is None else float(scale),
                             softcap=None if softcap is None else float(softcap), interpret=interpret)


def _check_v_block(name: str, v_block: int, v: jax.Array) -> None:
    if v_block and (v.dtype != jnp.int8 or v_block < 16 or v_block & (v_block - 1) or v.shape[-2] % v_block):
        raise ValueError(f"{name}: v_block={v_block} needs an int8 value store whose positions ({v.shape[-2]}) are a "
                         "multiple of it, a power of two ≥ 16 (init_cache sets it only where they are)")


# ------------------------------------------------------------------ projection → RoPE → cache write → attention
#
# One step further for a decode step: the same launch takes the fused q/k/v projection's output (or its
# split-K partials, whose sum XLA would otherwise fuse into the RoPE), applies RoPE to the queries and the
# new keys, writes the new keys and values into the cache in place (quantized for an int8 cache) and
# attends to them from registers, so the split, the two RoPE fusions and the two cache scatters of
# `mixjax.model._decoder_layer` are not launches of their own.


def _split_qkv(y, heads: int, kv_heads: int):
    B, T = y.shape[-3], y.shape[-2]
    dh = y.shape[-1] // (heads + 2 * kv_heads)
    q, k, v = jnp.split(y, [heads * dh, (heads + kv_heads) * dh], axis=-1)
    return q.reshape(B, T, heads, dh), k.reshape(B, T, kv_heads, dh), v.reshape(B, T, kv_heads, dh)


def attend_new_tokens_ref(qkv: jax.Array, q_pos: jax.Array, cos: jax.Array, sin: jax.Array, k_store: jax.Array,
                          v_store: jax.Array, *, heads: int, kv_heads: int, dtype=None, bias: jax.Array | None = None,
                          k_scale_store: jax.Array | None = None, v_scale_store: jax.Array | None = None,
                          sliding_window: int | None = None, rms: RowRms | None = None, codes: bool = False,
                          v_block: int = 0, qk_norm: tuple[jax.Array, jax.Array] | None = None,
                          norm_eps: float = 1e-6, scale: float | None = None, softcap: float | None = None):
    """What mixjax's decoder layer does between the q/k/v projection and o_proj, for one layer's cache:
    qkv [B, T, (H + 2·KVH)·Dh] in the activations' dtype, or f32 split-K partials [P, B, T, ...] summed and
    rounded to `dtype` (first multiplied per token by `rms`'s r when given: the projection ran on the codes of
    `norm.rms_norm_codes_pallas`); + bias; with `qk_norm` (Qwen3's query and key norm weights, [Dh] each) an RMSNorm
    of every q and k head (epsilon `norm_eps`); RoPE (cos/sin [B, T, 1, Dh] of `model.rope_tables`) on q and k; k,
    v written at q_pos [B, T] into k_store/v_store [B, KVH, S, Dh] (int8 with scale stores [B, KVH, S]: quantized
    first); `attend_ref` over the cache. Returns (out [B, T, H, Dh], k_store, v_store, k_scale_store,
    v_scale_store); `codes`: out as o_proj's input codes instead (`head_codes_ref`); `v_block`: v_store in
    `block_values`' order."""
    from mixjax import model

    dtype = jnp.dtype(dtype or qkv.dtype)
    y = jnp.sum(qkv.astype(jnp.float32), axis=0) if qkv.ndim == 4 else qkv
    if rms is not None:
        y = y.astype(jnp.float32) * rms.inv().reshape(y.shape[:-1])[..., None]
    y = y.astype(dtype)
    if bias is not None:
        y = y + bias.astype(dtype)
    q, k, v = _split_qkv(y, heads, kv_heads)
    if qk_norm is not None:
        q, k = model.rms_norm(q, qk_norm[0], norm_eps), model.rms_norm(k, qk_norm[1], norm_eps)
    q, k = model.apply_rope(q, cos, sin), model.apply_rope(k, cos, sin)
    k_store, k_scale_store, _, k_scale = model._write_cache(k_store, k_scale_store, None, k, q_pos)
    v_store, v_scale_store, _, v_scale = model._write_cache(v_store, v_scale_store, None, v, q_pos, v_block)
    out = attend_ref(q, k_store, unblock_values(v_store, v_block), cache_mask(q_pos, k_store.shape[2], sliding_window),
                     k_scale, v_scale, scale=scale, softcap=softcap)
    return head_codes_ref(out) if codes else out, k_store, v_store, k_scale_store, v_scale_store


def head_codes_ref(out: jax.Array) -> QuantizedActivations:
    """The attention out [B, T, H, Dh] in its float dtype → o_proj's input codes, `QuantizedActivations` of
    out.reshape(B, T, H·Dh) with `norm.quant_rows` rows (the decode tiles' row count), per group of 128: what
    o_proj's own quantization makes of that input, and what `attend_new_tokens_pallas(codes=True)` stores."""
    from pallas_kernels.kernels import quantize_activations_xla

    B, T, H, Dh = out.shape
    rows = out.reshape(B * T, H * Dh)
    x_q, a_scale, x_sum = quantize_activations_xla(rows, block_m=quant_rows(B * T))
    return QuantizedActivations(x_q, a_scale, x_sum, (B, T), H * Dh, jnp.dtype(out.dtype).name)


WIDE_HEAD_CODES = True  # heads of 256 (Gemma's; any multiple of 128) quantize o_proj's input in the fused
# attention's epilogue too, a scale per group of 128 along the head (`_store_head_codes`). H100, 2026-12-07,
# Gemma-3-4B: b32 +0.8 % (bf16 cache) and +1.3 % (int8 cache), b1 unchanged (NOTES items 155–156). False (bench
# `@nwcodes`): only heads of 128 take the epilogue, wider ones are quantized by XLA after the kernel


def head_codes_fit(dh: int) -> bool:
    """Whether heads of dh map onto o_proj's K groups of 128 in the attention's epilogue: one group a head, or
    (`WIDE_HEAD_CODES`) several."""
    return dh == GROUP_SIZE or (WIDE_HEAD_CODES and dh % GROUP_SIZE == 0)


def codes_in_kernel(batch: int, kv_heads: int, positions: int, dh: int, itemsize: int, *, block_s: int | None = None,
                    splits: int | None = None) -> bool:
    """Whether `attend_new_tokens_pallas(codes=True)` quantizes in its own programs (one split, so each program
    holds its heads' whole outputs, and heads that `head_codes_fit`); otherwise the codes come from XLA ops
    after the splits' merge."""
    block_s = block_s or fused_block_stages(dh, itemsize, positions)[0]
    return head_codes_fit(dh) and _fused_splits(splits, batch, kv_heads, positions, block_s, codes=True) == 1


def _fused_splits(splits: int | None, batch: int, kv_heads: int, positions: int, block_s: int, codes: bool) -> int:
    """The splits `attend_new_tokens_pallas` runs: `splits` (None: `choose_splits`), at most one a block."""
    splits = choose_splits(batch, kv_heads, positions, block_s, codes) if splits is None else splits
    return max(1, min(int(splits), -(-positions // block_s)))


@functools.partial(jax.jit, static_argnames=("heads", "kv_heads", "dtype", "sliding_window", "block_s", "splits",
                                             "num_warps", "num_stages", "codes", "codes_fit", "v_block", "norm_eps",
                                             "scale", "softcap", "interpret"))
def _attend_new_tokens(qkv, q_pos, cos, sin, k_store, v_store, bias, ks_store, vs_store, rms, qk_norm, *, heads,
                       kv_heads, dtype, sliding_window, block_s, splits, num_warps, num_stages, codes, codes_fit, v_block,
                       norm_eps, scale, softcap, interpret):
    parts = qkv.shape[0] if qkv.ndim == 4 else 0
    B, T, width = qkv.shape[-3:]
    KVH, S, Dh = kv_heads, k_store.shape[2], k_store.shape[3]
    g = heads // KVH
    rows = max(16, pl.next_power_of_2(T * g))
    per_split = -(-(-(-S // block_s)) // splits)
    scaled = ks_store is not None
    x = qkv.reshape(parts, B, T * width) if parts else qkv.reshape(B, T * width)
    args = [x] + ([bias] if bias is not None else []) + ([rms.ssq] if rms is not None else [])
    args += [jnp.stack([jnp.asarray(w) for w in qk_norm])] if qk_norm is not None else []
    args += [q_pos.astype(jnp.int32), cos.reshape(B, T * Dh), sin.reshape(B, T * Dh)]
    first_store = len(args)
    args += [k_store.reshape(B, KVH, S * Dh), v_store.reshape(B, KVH, S * Dh)]
    if scaled:
        args += [ks_store, vs_store]
    in_kernel = codes and splits == 1 and codes_fit  # (`head_codes_fit`) else the codes of the merged output, below
    mp = quant_rows(B * T)
    if in_kernel:  # o_proj's input codes: QuantizedActivations' x_q, a_scale, x_sum (Dh / 128 groups a head)
        groups = heads * Dh // GROUP_SIZE
        o_shape = [jax.ShapeDtypeStruct((mp, heads * Dh), jnp.int8), jax.ShapeDtypeStruct((groups, mp), jnp.float32),
                   jax.ShapeDtypeStruct((groups, mp), jnp.int32)]
    elif splits == 1:
        o_shape = [jax.ShapeDtypeStruct((B, T * heads * Dh), dtype)]
    else:
        o_shape = [jax.ShapeDtypeStruct((splits, B, KVH, rows * Dh), jnp.float32),
                   jax.ShapeDtypeStruct((splits, B, KVH, rows), jnp.float32),
                   jax.ShapeDtypeStruct((splits, B, KVH, rows), jnp.float32)]
    stores = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in args[first_store:]]
    aliases = {first_store + i: len(o_shape) + i for i in range(len(stores))}  # the cache is written in place
    res = pl.pallas_call(
        functools.partial(_kernel, pdl_on=pdl.active(interpret),
                          t=T, g=g, heads=heads, kv_heads=KVH, rows=rows, dh=Dh, s_len=S, block_s=block_s,
                          per_split=per_split, window=sliding_window, scaled=scaled, splits=splits, dtype=dtype,
                          fused=True, parts=parts, has_bias=bias is not None,
                          rms=None if rms is None else (rms.ssq.shape[1], rms.width, rms.eps),
                          codes=mp if in_kernel else 0, batch=B, v_block=v_block,
                          qk_eps=None if qk_norm is None else norm_eps, score_scale=scale, softcap=softcap),
        out_shape=(*o_shape, *stores),
        grid=(B, KVH, splits),
        input_output_aliases=aliases,
        interpret=interpret,
        name="attend_new_tokens",
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
    )(*args)
    res = list(res)
    k_new, v_new = res[len(o_shape)].reshape(k_store.shape), res[len(o_shape) + 1].reshape(v_store.shape)
    ks_new, vs_new = (res[len(o_shape) + 2], res[len(o_shape) + 3]) if scaled else (None, None)
    if in_kernel:
        out = QuantizedActivations(*res[:3], (B, T), heads * Dh, jnp.dtype(dtype).name)
    elif splits == 1:
        out = res[0].reshape(B, T, heads, Dh)
    else:
        out = _merge(res[0].reshape(splits, B, KVH, rows, Dh), res[1], res[2])[:, :, : T * g]
        out = out.reshape(B, KVH, T, g, Dh).transpose(0, 2, 1, 3, 4).reshape(B, T, heads, Dh).astype(dtype)
    if codes and not in_kernel:
        out = head_codes_ref(out)
    return out, k_new, v_new, ks_new, vs_new


def attend_new_tokens_pallas(qkv: jax.Array, q_pos: jax.Array, cos: jax.Array, sin: jax.Array, k_store: jax.Array,
                             v_store: jax.Array, *, heads: int, kv_heads: int, dtype=None,
                             bias: jax.Array | None = None, k_scale_store: jax.Array | None = None,
                             v_scale_store: jax.Array | None = None, sliding_window: int | None = None,
                             block_s: int | None = None, splits: int | None = None, num_warps: int = 4,
                             num_stages: int | None = None, rms: RowRms | None = None, codes: bool = False,
                             v_block: int = 0, qk_norm: tuple[jax.Array, jax.Array] | None = None,
                             norm_eps: float = 1e-6, scale: float | None = None, softcap: float | None = None,
                             interpret: bool = False):
    """`attend_new_tokens_ref` in one launch (two with splits > 1); the cache stores are updated in place
    (`input_output_aliases`: a donated or loop-carried cache is not copied). T·H/KVH ≤ MAX_ROWS. `num_stages`:
    the key/value blocks in flight (None, and block_s None: `fused_block_stages`); `num_warps`: a program's warps
    (2, 8 and 16 measured slower than 4: NOTES-kernels.md item 134). Shared memory a program at b32, 128 positions of head dim 128, compiled offline by
    Triton 3.9 (`benchmarks/ptx_stats.py`): bf16 cache 40 / 72 / 136 KB at 1 / 2 / 3 stages, int8 41 / 74 KB at 2 / 3.
    `codes`: the attention comes back as o_proj's input codes (`head_codes_ref`: `QuantizedActivations`, per group
    of 128, `norm.quant_rows` rows) — quantized in the programs' epilogue where `codes_in_kernel` says so (one split,
    Dh = 128: o_proj's quantization launch saved), else by XLA ops after the splits' merge. `v_block`: an int8
    cache's value store in `block_values`' order (read and written so). `qk_norm`: Qwen3's query and key head
    norm weights ([Dh] each), applied before RoPE with epsilon `norm_eps`. `scale` (None: 1/√Dh) and `softcap`: the
    scores' factor and Gemma 2's cap, as `attend_ref` takes them."""
    if qkv.ndim not in (3, 4) or (qkv.ndim == 4 and qkv.dtype != jnp.float32):
        raise ValueError(f"attend_new_tokens: qkv must be [B, T, W] or f32 partials [P, B, T, W]; got {qkv.shape} "
                         f"{qkv.dtype}")
    B, T, width = qkv.shape[-3:]
    if k_store.ndim != 4 or v_store.shape != k_store.shape or k_store.shape[:2] != (B, kv_heads):
        raise ValueError(f"attend_new_tokens: k_store/v_store must be the same [B, KVH, S, Dh] = [{B}, {kv_heads}, S, Dh]; "
                         f"got {k_store.shape}, {v_store.shape}")
    dh = k_store.shape[3]
    if heads % kv_heads or width != (heads + 2 * kv_heads) * dh:
        raise ValueError(f"attend_new_tokens: qkv's last dim {width} is not (H + 2·KVH)·Dh = ({heads} + 2·{kv_heads})·{dh} "
                         "(q, k, v fused in that order), or KVH does not divide H")
    if q_pos.shape != (B, T) or cos.shape != (B, T, 1, dh) or sin.shape != cos.shape:
        raise ValueError(f"attend_new_tokens: q_pos must be [B, T] = {(B, T)} and cos/sin [B, T, 1, Dh]; got "
                         f"{q_pos.shape}, {cos.shape}, {sin.shape}")
    if bias is not None and bias.shape != (width,):
        raise ValueError(f"attend_new_tokens: bias must be [{width}]; got {bias.shape}")
    if (k_scale_store is None) != (v_scale_store is None) or (k_scale_store is None) != (k_store.dtype != jnp.int8):
        raise ValueError("attend_new_tokens: an int8 cache needs both scale stores, a float cache neither")
    if k_scale_store is not None and (k_scale_store.shape != k_store.shape[:3] or v_scale_store.shape != k_store.shape[:3]):
        raise ValueError(f"attend_new_tokens: scale stores must be [B, KVH, S] = {k_store.shape[:3]}")
    if rms is not None and (rms.ssq.ndim != 2 or rms.ssq.shape[0] != B * T):
        raise ValueError(f"attend_new_tokens: rms must hold one row of sums of squares per token, [B·T, C] = "
                         f"[{B * T}, C]; got {rms.ssq.shape}")
    _check_v_block("attend_new_tokens", v_block, v_store)
    if qk_norm is not None and (len(qk_norm) != 2 or any(jnp.shape(w) != (dh,) for w in qk_norm)):
        raise ValueError(f"attend_new_tokens: qk_norm must be the (query, key) norm weights, [Dh] = [{dh}] each; got "
                         f"{[jnp.shape(w) for w in qk_norm]}")
    if T * (heads // kv_heads) > MAX_ROWS:
        raise ValueError(f"attend_new_tokens: {T} tokens × {heads // kv_heads} heads per KV head > {MAX_ROWS} query rows; "
                         "use attend_new_tokens_ref (XLA) for prefill-sized chunks")
    default_block, default_stages = fused_block_stages(dh, k_store.dtype.itemsize, k_store.shape[2])
    num_stages = num_stages or (default_stages if block_s is None else 2)  # (a block of the caller's: 2, as before)
    block_s = block_s or default_block
    if block_s < 16 or block_s & (block_s - 1) or dh < 16 or dh & (dh - 1):
        raise ValueError(f"attend_new_tokens: block_s ({block_s}) and the head dim ({dh}) must be powers of two ≥ 16")
    dtype = jnp.dtype(dtype or (qkv.dtype if qkv.ndim == 3 else jnp.bfloat16))
    kw = dict(heads=heads, kv_heads=kv_heads, dtype=dtype, bias=bias, k_scale_store=k_scale_store,
              v_scale_store=v_scale_store, sliding_window=sliding_window, rms=rms, codes=codes, v_block=v_block,
              qk_norm=qk_norm, norm_eps=norm_eps, scale=scale, softcap=softcap)
    if qkv.size == 0 or k_store.shape[2] == 0:
        return attend_new_tokens_ref(qkv, q_pos, cos, sin, k_store, v_store, **kw)
    codes_fit = head_codes_fit(dh)
    splits = _fused_splits(splits, B, kv_heads, k_store.shape[2], block_s, codes and codes_fit)
    return _attend_new_tokens(qkv, q_pos, cos, sin, k_store, v_store, bias, k_scale_store, v_scale_store, rms,
                              None if qk_norm is None else tuple(qk_norm),
                              heads=heads, kv_heads=kv_heads, dtype=dtype, sliding_window=sliding_window, block_s=block_s,
                              splits=splits, num_warps=num_warps, num_stages=num_stages, codes=codes, codes_fit=codes_fit,
                              v_block=v_block, norm_eps=float(norm_eps), scale=None if scale is None else float(scale),
                              softcap=None if softcap is None else float(softcap), interpret=interpret)
