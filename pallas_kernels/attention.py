"""Grouped-query attention over a KV cache, and its decode kernel in one launch (Pallas-Triton).

Why: outside the GEMVs a W4.4A8 decode step on the H200 spends ≈ 0.87 ms of 2.4 ms in small XLA kernels,
and per layer the attention alone is two dots (2.7 + 2.4 µs), the mask, and the softmax's reductions, each a
launch of its own (session 11 profile, benchmarks/NOTES-kernels.md item 32). At decode every query row of a
key/value head reads the same cache rows, so one program per (batch row, KV head) can do all of it: the
scores of its G = H/KVH heads (× the T new tokens) against a block of cached keys on the tensor cores, an
online softmax (running max and sum, the flash-decoding recurrence), and the value dot, looping only over
the blocks that some row may see (up to the largest query position, and from the sliding window's start),
not over the whole cache. Long caches with few programs split the positions over `splits` programs per head;
XLA then merges their partial results.

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

MAX_ROWS = 64  # query rows (T new tokens × G heads per KV head) one program holds: decode, not prefill
_NEG = float(jnp.finfo(jnp.float32).min)


def attend_ref(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
               k_scale: jax.Array | None = None, v_scale: jax.Array | None = None) -> jax.Array:
    """Grouped-query attention. q [B, T, H, Dh], k/v [B, KVH, S, Dh], mask [B, T, S] → [B, T, H, Dh].

    With an int8 cache, k/v hold codes and k_scale/v_scale [B, KVH, S] their per-position scales: the
    key scale multiplies the f32 scores and the value scale the probabilities, so the dequantized
    cache is never materialised.
    """
    B, T, H, Dh = q.shape
    KVH = k.shape[1]
    q = q.reshape(B, T, KVH, H // KVH, Dh)  # [B, T, KVH, G, Dh]
    scores = jnp.einsum("btkgd,bksd->bkgts", q, k.astype(q.dtype), preferred_element_type=jnp.float32)
    if k_scale is not None:
        scores = scores * k_scale.astype(jnp.float32)[:, :, None, None, :]
    scores = scores / math.sqrt(Dh)  # [B, KVH, G, T, S]
    scores = jnp.where(mask[:, None, None], scores, _NEG)
    probs = jax.nn.softmax(scores, axis=-1)
    if v_scale is not None:
        probs = probs * v_scale.astype(jnp.float32)[:, :, None, None, :]
    out = jnp.einsum("bkgts,bksd->btkgd", probs.astype(q.dtype), v.astype(q.dtype))  # in q's dtype, as HF does
    return out.reshape(B, T, H, Dh)


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
                         v_scale: jax.Array | None = None) -> jax.Array:
    """`attend_ref` with the causal (and sliding-window) mask of the tokens at q_pos [B, T] over a cache of S
    positions: what `decode_attention_pallas` computes."""
    return attend_ref(q, k, v, cache_mask(q_pos, k.shape[2], sliding_window), k_scale, v_scale)


def _dot_nt(a, b):  # a [m, d] · b [n, d]ᵀ in f32 (`pl.dot` is gone in jax 0.11)
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _dot_nn(a, b):  # a [m, s] · b [s, d] in f32
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _kernel(*refs, t: int, g: int, heads: int, rows: int, dh: int, s_len: int, block_s: int, per_split: int,
            window: int | None, scaled: bool, splits: int, dtype):
    if scaled:
        q_ref, k_ref, v_ref, pos_ref, ks_ref, vs_ref, *outs = refs
    else:
        q_ref, k_ref, v_ref, pos_ref, *outs = refs
    b, h, p = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    r = jnp.arange(rows)
    # rows past T·G (the MMA takes ≥ 16) repeat the live rows: they compute the same values and store them
    # to the same places, so no store needs a mask (a masked store with repeated addresses would write the
    # old value back in interpret mode)
    src = r % (t * g)
    ti = src // g
    head = h * g + src % g
    d = jnp.arange(dh)
    q_off = (ti * heads + head)[:, None] * dh + d[None, :]  # into the flat [T·H·Dh] row of batch b
    q = plgpu.load(q_ref.at[b, q_off])  # [rows, Dh]
    qpos = plgpu.load(pos_ref.at[b, ti])  # [rows]
    # the blocks some row may see: up to the largest position, from the window's start
    hi = jnp.minimum(jnp.max(qpos) + 1, s_len)
    stop = jnp.minimum((p + 1) * per_split, (hi + block_s - 1) // block_s)
    start = p * per_split
    if window is not None:
        start = jnp.maximum(start, jnp.maximum(jnp.min(qpos) - window + 1, 0) // block_s)
    scale = 1.0 / math.sqrt(dh)
    kd = jnp.arange(block_s)

    def body(j, carry):
        m, l, acc = carry
        kp = j * block_s + kd  # [block_s] cache positions
        inb = kp < s_len
        off = kp[:, None] * dh + d[None, :]
        keys = plgpu.load(k_ref.at[b, h, off], mask=inb[:, None], other=0)
        s = _dot_nt(q, keys.astype(dtype))  # [rows, block_s] f32
        if scaled:
            s = s * plgpu.load(ks_ref.at[b, h, kp], mask=inb, other=0.0).astype(jnp.float32)[None, :]
        s = s * scale
        seen = (kp[None, :] <= qpos[:, None]) & inb[None, :]
        if window is not None:
            seen &= qpos[:, None] - kp[None, :] < window
        s = jnp.where(seen, s, _NEG)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp(m - m_new)
        e = jnp.where(seen, jnp.exp(s - m_new[:, None]), 0.0)
        l = l * alpha + jnp.sum(e, axis=1)
        if scaled:
            e = e * plgpu.load(vs_ref.at[b, h, kp], mask=inb, other=0.0).astype(jnp.float32)[None, :]
        vals = plgpu.load(v_ref.at[b, h, off], mask=inb[:, None], other=0)
        acc = acc * alpha[:, None] + _dot_nn(e.astype(dtype), vals.astype(dtype))
        return m_new, l, acc

    init = (jnp.full((rows,), _NEG, jnp.float32), jnp.zeros((rows,), jnp.float32), jnp.zeros((rows, dh), jnp.float32))
    m, l, acc = lax.fori_loop(start, jnp.maximum(stop, start), body, init)
    if splits == 1:  # normalized, in q's dtype; a row that sees no position (only past the cache) gives 0
        (o_ref,) = outs
        out = acc / jnp.where(l > 0, l, 1.0)[:, None]
        plgpu.store(o_ref.at[b, q_off], out.astype(dtype))
    else:  # this split's unnormalized sum with its max and sum, merged by `_merge`
        o_ref, m_ref, l_ref = outs
        plgpu.store(o_ref.at[p, b, h, r[:, None] * dh + d[None, :]], acc)
        plgpu.store(m_ref.at[p, b, h, r], m)
        plgpu.store(l_ref.at[p, b, h, r], l)


def _merge(o, m, l):
    """Splits' partials o [P, B, KVH, R, Dh], m/l [P, B, KVH, R] → the normalized [B, KVH, R, Dh] (f32)."""
    top = jnp.max(m, axis=0)
    w = jnp.where(l > 0, jnp.exp(m - top), 0.0)  # [P, B, KVH, R]
    total = jnp.sum(w * l, axis=0)
    return jnp.sum(w[..., None] * o, axis=0) / jnp.where(total > 0, total, 1.0)[..., None]


def choose_splits(batch: int, kv_heads: int, positions: int, block_s: int) -> int:
    """Programs per (row, KV head): enough for ≈ 128 programs on a long cache, each at least 4 blocks."""
    blocks = -(-positions // block_s)
    return max(1, min(-(-128 // (batch * kv_heads)), blocks // 4))


@functools.partial(jax.jit, static_argnames=("sliding_window", "block_s", "splits", "num_warps", "interpret"))
def _decode_attention(q, k, v, q_pos, k_scale, v_scale, *, sliding_window, block_s, splits, num_warps, interpret):
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
        functools.partial(_kernel, t=T, g=g, heads=H, rows=rows, dh=Dh, s_len=S, block_s=block_s,
                          per_split=per_split, window=sliding_window, scaled=scaled, splits=splits, dtype=q.dtype),
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
                            v_scale: jax.Array | None = None, block_s: int = 64, splits: int | None = None,
                            num_warps: int = 4, interpret: bool = False) -> jax.Array:
    """`decode_attention_ref` in one launch (two with splits > 1): q [B, T, H, Dh] the new tokens' queries at
    positions q_pos [B, T]; k/v [B, KVH, S, Dh] the cache (float, or int8 codes with k_scale/v_scale
    [B, KVH, S]) already holding the new tokens → [B, T, H, Dh] in q's dtype.

    T·H/KVH ≤ MAX_ROWS (decode and short chunks; prefill takes `attend_ref`). splits: programs per (row, KV
    head) over the positions (None: `choose_splits`). A row whose every position is masked (only positions
    past the cache) gives zeros where the reference averages the whole cache."""
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
    g = H // k.shape[1]
    if T * g > MAX_ROWS:
        raise ValueError(f"decode_attention: {T} tokens × {g} heads per KV head = {T * g} query rows > {MAX_ROWS}; "
                         "use attend_ref (XLA) for prefill-sized chunks")
    if block_s < 16 or block_s & (block_s - 1) or Dh < 16 or Dh & (Dh - 1):
        raise ValueError(f"decode_attention: block_s ({block_s}) and the head dim ({Dh}) must be powers of two ≥ 16")
    if q.size == 0 or k.shape[2] == 0:
        return decode_attention_ref(q, k, v, q_pos, sliding_window=sliding_window, k_scale=k_scale, v_scale=v_scale)
    if splits is None:
        splits = choose_splits(B, k.shape[1], k.shape[2], block_s)
    splits = max(1, min(int(splits), -(-k.shape[2] // block_s)))
    return _decode_attention(q, k, v, q_pos, k_scale, v_scale, sliding_window=sliding_window, block_s=block_s,
                             splits=splits, num_warps=num_warps, interpret=interpret)
