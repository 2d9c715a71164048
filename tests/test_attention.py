"""The decode-attention kernel (pallas_kernels/attention.py) against its reference and inside the model, on
fresh random caches of awkward sizes; Pallas interpret mode on CPU, the real kernel on a GPU."""

from __future__ import annotations

import functools
import math

import pathlib
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixjax import model
from mixjax.config import LlamaConfig
from pallas_kernels import attention

INTERPRET = jax.default_backend() != "gpu"

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
import ptx_stats  # noqa: E402  (the Triton-IR capture of a CUDA lowering; no GPU needed)
from helpers import tenth


def _fresh_jit(cfg):
    """`model.forward_step` jitted anew: the module flags a test sets are read while tracing, and one
    compilation of the model costs less than running it op by op."""
    return jax.jit(functools.partial(model.forward_step, cfg=cfg, implementation="xla"))


def _case(rng, B, T, H, KVH, S, Dh, dtype, int8=False, scale_dtype=jnp.float32):
    q = jnp.asarray(rng.normal(size=(B, T, H, Dh)), dtype)
    if not int8:
        return (q, jnp.asarray(rng.normal(size=(B, KVH, S, Dh)), dtype), jnp.asarray(rng.normal(size=(B, KVH, S, Dh)), dtype),
                None, None)
    codes = [jnp.asarray(rng.integers(-127, 128, (B, KVH, S, Dh)), jnp.int8) for _ in range(2)]
    scales = [jnp.asarray(rng.uniform(0.002, 0.03, (B, KVH, S)), scale_dtype) for _ in range(2)]
    return q, codes[0], codes[1], scales[0], scales[1]


def _positions(rng, B, T, S):
    """Each row's new tokens at consecutive positions: the last row's end the cache (every block, every
    split in use), the first row's (if B > 1) start at 0, the others anywhere."""
    start = rng.integers(0, S - T + 1, B)
    start[0] = 0
    start[-1] = S - T
    return jnp.asarray(start[:, None] + np.arange(T)[None, :], jnp.int32)


# B, T, H, KVH, S, Dh, window, int8, splits: Llama-3 GQA (G = 4), SmolLM2 (G = 3), MQA, several new tokens, a
# sliding window, int8 caches, caches that are not a multiple of the 64-position block, one and several splits
CASES = [
    (1, 1, 32, 8, 256, 128, None, False, None),
    (2, 1, 9, 3, 200, 64, None, False, 1),
    (3, 2, 8, 1, 130, 32, None, False, 2),
    (2, 5, 9, 3, 97, 64, 23, False, None),
    (2, 1, 8, 2, 300, 64, None, True, 1),
    (1, 1, 16, 4, 1000, 64, None, False, None),  # choose_splits gives several
    (3, 4, 12, 4, 333, 16, 50, True, 3),
]


@pytest.mark.parametrize("B, T, H, KVH, S, Dh, window, int8, splits", CASES)
def test_decode_attention_matches_reference(B, T, H, KVH, S, Dh, window, int8, splits):
    """bf16: within the rounding of bf16 probabilities and outputs; f32 (float caches): near-exact, so an
    off-by-one position or a stale running max would show."""
    rng = np.random.default_rng()
    pos = _positions(rng, B, T, S)
    for dtype in (jnp.bfloat16,) if int8 else (jnp.bfloat16, jnp.float32):
        q, k, v, ks, vs = _case(rng, B, T, H, KVH, S, Dh, dtype, int8, jnp.bfloat16 if window else jnp.float32)
        got = attention.decode_attention_pallas(q, k, v, pos, sliding_window=window, k_scale=ks, v_scale=vs,
                                                splits=splits, interpret=INTERPRET)
        ref = attention.decode_attention_ref(q, k, v, pos, sliding_window=window, k_scale=ks, v_scale=vs)
        assert got.shape == ref.shape == q.shape and got.dtype == q.dtype
        got, ref = np.asarray(got, np.float32), np.asarray(ref, np.float32)
        size = np.abs(ref).max(axis=-1, keepdims=True)  # each head's largest output
        # bf16: probabilities and outputs each round once (2^-8 relative); f32 on a GPU: TF32 dots
        rel = 2 ** -6 if dtype == jnp.bfloat16 else 1e-5 if INTERPRET else 2e-3
        assert np.all(np.abs(got - ref) <= rel * size + 1e-6), np.abs(got - ref).max()


@pytest.mark.parametrize("S, v_block, block_s, splits", [(256, 64, None, 2), (192, 64, 128, 1), (64, 16, 32, 1)])
def test_decode_attention_reads_blocked_values(S, v_block, block_s, splits):
    """An int8 cache's values in `block_values`' order give what the position-major store gives (interpret
    mode: the same numbers in the same order, so equal; a GPU: the reference's bound), including blocks that
    run past the store (128 positions over 192: masked loads)."""
    rng = np.random.default_rng()
    B, T, H, KVH, Dh = 2, 1, 8, 2, 64
    pos = _positions(rng, B, T, S)
    q, k, v, ks, vs = _case(rng, B, T, H, KVH, S, Dh, jnp.bfloat16, True)
    blocked = attention.block_values(v, v_block)
    assert not np.array_equal(np.asarray(blocked), np.asarray(v))
    np.testing.assert_array_equal(attention.unblock_values(blocked, v_block), v)
    # block j of the store holds positions j·v_block … as [Dh, v_block]
    np.testing.assert_array_equal(np.asarray(blocked)[1, 0].reshape(S // v_block, Dh, v_block)[1, 5, 3],
                                  np.asarray(v)[1, 0, v_block + 3, 5])
    kw = dict(k_scale=ks, v_scale=vs, splits=splits, block_s=block_s, interpret=INTERPRET)
    got = np.asarray(attention.decode_attention_pallas(q, k, blocked, pos, v_block=v_block, **kw), np.float32)
    rows = np.asarray(attention.decode_attention_pallas(q, k, v, pos, **kw), np.float32)
    ref = np.asarray(attention.decode_attention_ref(q, k, v, pos, k_scale=ks, v_scale=vs), np.float32)
    if INTERPRET:
        np.testing.assert_array_equal(got, rows)
    size = np.abs(ref).max(axis=-1, keepdims=True)
    assert np.all(np.abs(got - ref) <= 2 ** -6 * size + 1e-6), np.abs(got - ref).max()


def test_masked_positions_are_never_seen():
    """A key that matches the query strongly right after the token's position (a future token), and one just
    outside the sliding window, carry values of 1000: if either leaked into the softmax, the output would
    be ≈ 1000 instead of ≈ the visible values' average."""
    rng = np.random.default_rng()
    B, H, KVH, S, Dh, window = 2, 4, 2, 150, 64, 40
    q = jnp.asarray(rng.normal(size=(B, 1, H, Dh)), jnp.bfloat16)
    k = np.asarray(rng.normal(size=(B, KVH, S, Dh)) * 0.1, np.float32)
    v = np.asarray(rng.uniform(-1, 1, size=(B, KVH, S, Dh)), np.float32)
    pos = np.array([[70], [149]], np.int32)
    for b, p in enumerate(pos[:, 0]):
        for hidden in (p + 1, p - window):  # a future position (past the cache for row 1) and one past the window
            if 0 <= hidden < S:
                k[b, :, hidden] = 50 * np.asarray(q[b, 0, ::H // KVH], np.float32)  # one query head per KV head
                v[b, :, hidden] = 1000.0
    out = attention.decode_attention_pallas(q, jnp.asarray(k, jnp.bfloat16), jnp.asarray(v, jnp.bfloat16),
                                            jnp.asarray(pos), sliding_window=window, interpret=INTERPRET)
    assert np.abs(np.asarray(out, np.float32)).max() < 1.5
    # without the window the planted key at p − window is visible and dominates its head
    out = attention.decode_attention_pallas(q, jnp.asarray(k, jnp.bfloat16), jnp.asarray(v, jnp.bfloat16),
                                            jnp.asarray(pos), interpret=INTERPRET)
    assert np.asarray(out, np.float32)[:, 0, 0].min() > 900


def test_cuda_lowering_loops_over_a_dynamic_block_range():
    """Lowered for CUDA (Triton IR, no GPU): one kernel, the block loop an `scf.for` whose bounds come from the
    positions (not the cache size: a while loop or a fixed trip count would mean the dynamic range was
    lost), two tensor-core dots in it."""
    q, k = jnp.zeros((2, 1, 32, 128), jnp.bfloat16), jnp.zeros((2, 8, 512, 128), jnp.bfloat16)
    modules = ptx_stats.capture_ttir(
        lambda q, k, pos: attention.decode_attention_pallas(q, k, k, pos, splits=1), q, k, jnp.zeros((2, 1), jnp.int32))
    assert len(modules) == 1 and "decode_attention" in modules[0]
    ir = modules[0]
    assert ir.count("scf.for") == 1 and "scf.while" not in ir and ir.count("tt.dot") == 2
    upper = re.search(r"scf\.for %\w+ = %\w+ to (%\w+) step", ir).group(1)
    assert not re.search(rf"{upper} = arith\.constant", ir)  # 512 positions / 64 would be a constant 8


# B, T, H, KVH, S, Dh, window, int8 (scale dtype), partials, bias, splits, dtype, rms (the norm's deferred rsqrt)
FUSED_CASES = [
    (1, 1, 32, 8, 256, 128, None, None, 4, False, None, jnp.bfloat16, True),
    (2, 1, 9, 3, 200, 64, None, None, 3, True, 1, jnp.bfloat16, True),
    (2, 3, 9, 3, 200, 64, 37, None, 0, False, None, jnp.bfloat16, False),
    (2, 1, 8, 2, 300, 64, None, jnp.float32, 2, False, 1, jnp.bfloat16, False),
    (2, 3, 8, 2, 300, 64, None, jnp.float32, 2, True, 2, jnp.bfloat16, True),
    (3, 2, 8, 8, 512, 32, 100, jnp.bfloat16, 0, True, 3, jnp.bfloat16, False),
    (2, 2, 4, 2, 100, 32, None, None, 0, True, 2, jnp.float32, True),
]


def _queries_as_rounded(qkv, bias, cos, sin, heads, dh, dtype, rms=None):
    """The new tokens' queries [B, T, H, Dh] with every rounding the fused kernel states: split-K partials
    summed in order in f32 (× the row's r of `rms`) and rounded to `dtype`, + bias rounded, RoPE with each
    product and the sum rounded."""
    def rnd(a):
        return np.asarray(jnp.asarray(a, dtype), np.float32)

    x = np.asarray(qkv, np.float32)
    if x.ndim == 4:
        x = functools.reduce(np.add, x)
    if rms is not None:
        x = x * np.asarray(rms.inv(), np.float32).reshape(*x.shape[:-1], 1)
    y = rnd(x) if bias is None else rnd(rnd(x) + np.asarray(bias, np.float32))
    q = y[..., :heads * dh].reshape(*y.shape[:2], heads, dh)
    rot = np.concatenate([-q[..., dh // 2:], q[..., :dh // 2]], axis=-1)
    return jnp.asarray(rnd(rnd(q * rnd(cos)) + rnd(rot * rnd(sin))), dtype)


# XLA's CPU compiler may keep bf16 intermediates in f32 ("excess precision"), so in interpret mode the kernel's
# queries could be an ulp off the rounding it states (and Triton keeps); random q and k give peaked softmaxes
# that turn such an ulp into output errors of several (a CI failure, 2026-12-04)
@functools.partial(jax.jit, static_argnames=("splits", "heads", "kv_heads", "dtype", "sliding_window", "codes",
                                             "num_warps", "v_block", "block_s"),
                   compiler_options={"xla_allow_excess_precision": False})
def _attend_new_tokens_as_stated(qkv, pos, cos, sin, k, v, bias, ks, vs, rms=None, **kw):
    return attention.attend_new_tokens_pallas(qkv, pos, cos, sin, k, v, bias=bias, k_scale_store=ks,
                                              v_scale_store=vs, rms=rms, interpret=INTERPRET, **kw)


# int8 caches with their values in blocks (`attention.block_values`): (v_block, block_s) of the kernel — whole
# blocks (unmasked value loads), several splits, and 128-position blocks over a 320-position cache (the last one
# past the store: masked loads)
BLOCKED_CASES = [
    (2, 1, 8, 2, 320, 64, None, jnp.float32, 2, False, 1, jnp.bfloat16, False, (64, None)),
    (3, 2, 8, 8, 512, 32, 100, jnp.bfloat16, 0, True, 3, jnp.bfloat16, True, (64, None)),
    (2, 1, 8, 2, 320, 64, 50, jnp.float32, 0, False, 2, jnp.bfloat16, False, (64, 128)),
    (1, 3, 4, 2, 96, 16, None, jnp.float32, 3, False, None, jnp.bfloat16, False, (32, 16)),
]


def _largest_abs_logit(q, got) -> float:
    """max over rows and positions of Σ |q|·|k| / √Dh: the size of the logits' rounding in a TF32 dot."""
    keys = np.asarray(got[1], np.float32)  # [B, KVH, S, Dh], the cache the kernel wrote
    if got[3] is not None:
        keys = keys * np.asarray(got[3], np.float32)[..., None]
    B, T, H, Dh = q.shape
    qa = np.abs(np.asarray(q, np.float32)).reshape(B, T, keys.shape[1], H // keys.shape[1], Dh)
    return float(np.einsum("btkgd,bksd->btkgs", qa, np.abs(keys)).max()) / math.sqrt(Dh)


@pytest.mark.parametrize("B, T, H, KVH, S, Dh, window, int8, parts, bias, splits, dtype, rms, blocked",
                         [(*c, None) for c in FUSED_CASES] + BLOCKED_CASES)
def test_attend_new_tokens_matches_reference(B, T, H, KVH, S, Dh, window, int8, parts, bias, splits, dtype, rms,
                                            blocked, num_warps=None):
    """Projection output (or split-K partials) + bias → RoPE → cache write → attention in one launch: the new
    positions written as the decoder layer writes them (`attend_new_tokens_ref`; a float cache to within an
    ulp: RoPE's products may round differently; an int8 cache's codes to within one step), every other
    position of the cache untouched, and the attention output that of `attend_ref` over the cache the kernel
    wrote, with the queries rounded as the kernel states (so a code one step off is not counted twice).
    `rms`: the projection ran on the codes of `norm.rms_norm_codes_pallas`, and its output is first multiplied
    by each token's r (sums of squares over 3 chunks). `blocked` (v_block, block_s): the value store in
    `block_values`' order, read and written so by both; compared position-major."""
    from mixjax import model
    from pallas_kernels.format import RowRms

    rng = np.random.default_rng()
    W = (H + 2 * KVH) * Dh
    qkv = jnp.asarray(rng.normal(size=(parts, B, T, W) if parts else (B, T, W)), jnp.float32 if parts else dtype)
    b = jnp.asarray(rng.normal(size=W), dtype) if bias else None
    _, k, v, ks, vs = _case(rng, B, 1, H, KVH, S, Dh, dtype, int8 is not None, int8 or jnp.float32)
    pos = _positions(rng, B, T, S)
    cos, sin = model.rope_tables(pos, (1.0 / 10000 ** (np.arange(0, Dh, 2) / Dh)).astype(np.float32))
    kw = dict(heads=H, kv_heads=KVH, dtype=dtype, sliding_window=window)
    rms = RowRms(jnp.asarray(rng.uniform(50, 400, size=(B * T, 3)), jnp.float32), 384, 1e-5) if rms else None
    v_block, block_s = blocked or (0, None)
    v_in = attention.block_values(v, v_block)
    got = list(_attend_new_tokens_as_stated(qkv, pos, cos, sin, k, v_in, b, ks, vs, rms, splits=splits,
                                            num_warps=num_warps, v_block=v_block, block_s=block_s, **kw))
    want = list(attention.attend_new_tokens_ref(qkv, pos, cos, sin, k, v_in, bias=b, k_scale_store=ks,
                                                v_scale_store=vs, rms=rms, v_block=v_block, **kw))
    got[2], want[2] = attention.unblock_values(got[2], v_block), attention.unblock_values(want[2], v_block)
    assert got[0].shape == (B, T, H, Dh) and got[0].dtype == dtype
    q = _queries_as_rounded(qkv, b, cos, sin, H, Dh, dtype, rms)
    mask = attention.cache_mask(pos, S, window)
    ref = np.asarray(attention.attend_ref(q, got[1], got[2], mask, got[3], got[4]), np.float32)
    # the scale of each output's rounding: Σ p·|v| (f32), which bounds |out| and what a p's rounding moves
    size = np.asarray(attention.attend_ref(q.astype(jnp.float32), got[1], jnp.abs(got[2].astype(jnp.float32)), mask,
                                           got[3], got[4]))
    out = np.asarray(got[0], np.float32)
    # bf16: probabilities and outputs each round once on each side (2^-8 relative; measured up to 2^-7 over 300
    # seeds a case); f32 on a GPU: TF32 dots on both sides, each product within 2^-10, so a logit moves by up to
    # 2^-9·Σ|q||k|/√Dh and an output by that much of Σ p·|v|, plus the P·V dot's own 2^-9 (a flat 2e-3 failed once
    # on an H200, in the rms case, whose queries are r ≈ 2 times larger)
    rel = 2 ** -6 if dtype == jnp.bfloat16 else 1e-5 if INTERPRET else 2 ** -9 * (1 + 2 * _largest_abs_logit(q, got))
    assert np.all(np.abs(out - ref) <= rel * size + 1e-6), np.max(np.abs(out - ref) / (size + 1e-6))
    new = np.zeros((B, S), bool)
    new[np.arange(B)[:, None], np.asarray(pos)] = True
    stores = [[np.asarray(t, np.float32) if t is not None else None for t in group]
              for group in (got[1:], want[1:], (k, v, ks, vs))]
    for i in range(4):  # positions no step wrote are untouched
        a, before = stores[0][i], stores[2][i]
        if before is None:
            assert a is None and stores[1][i] is None
            continue
        for bi in range(B):
            np.testing.assert_array_equal(a[bi][:, ~new[bi]], before[bi][:, ~new[bi]])
    for i, bi in np.ndindex(2, B):  # the written keys/values, dequantized for an int8 cache
        a, w0 = stores[0][i][bi][:, new[bi]], stores[1][i][bi][:, new[bi]]  # [KVH, T, Dh]
        if int8 is None:
            np.testing.assert_allclose(a, w0, rtol=float(jnp.finfo(dtype).eps), atol=1e-6)
            continue
        sa, sw = stores[0][i + 2][bi][:, new[bi]], stores[1][i + 2][bi][:, new[bi]]  # [KVH, T]
        # a scale follows its head's amax: an ulp of the activations' dtype, plus the scale dtype's rounding
        np.testing.assert_allclose(sa, sw, rtol=2 * float(jnp.finfo(dtype).eps))
        # each side within half a step of its value; the values themselves an ulp apart (XLA may keep the RoPE
        # of the reference in f32 on its way to the quantizer)
        da, dw = a * sa[..., None], w0 * sw[..., None]
        slack = np.maximum(sa, sw)[..., None] + float(jnp.finfo(dtype).eps) * np.abs(dw)
        assert np.all(np.abs(da - dw) <= slack), np.max(np.abs(da - dw) / slack)


def test_bad_inputs_are_named():
    q, k = jnp.zeros((1, 1, 8, 64)), jnp.zeros((1, 2, 32, 64))
    pos = jnp.zeros((1, 1), jnp.int32)
    with pytest.raises(ValueError, match="same"):
        attention.decode_attention_pallas(q, k, jnp.zeros((1, 2, 16, 64)), pos)
    with pytest.raises(ValueError, match="dividing"):
        attention.decode_attention_pallas(jnp.zeros((1, 1, 7, 64)), k, k, pos)
    with pytest.raises(ValueError, match="q_pos"):
        attention.decode_attention_pallas(q, k, k, jnp.zeros((1, 2), jnp.int32))
    with pytest.raises(ValueError, match="int8 cache"):
        attention.decode_attention_pallas(q, k, k, pos, k_scale=jnp.ones((1, 2, 32)), v_scale=jnp.ones((1, 2, 32)))
    with pytest.raises(ValueError, match="query rows"):
        attention.decode_attention_pallas(jnp.zeros((1, 20, 8, 64)), k, k, jnp.zeros((1, 20), jnp.int32))
    with pytest.raises(ValueError, match="powers of two"):
        attention.decode_attention_pallas(jnp.zeros((1, 1, 8, 48)), jnp.zeros((1, 2, 32, 48)),
                                          jnp.zeros((1, 2, 32, 48)), pos)
    with pytest.raises(ValueError, match="v_block=64 needs an int8 value store"):  # float, then 32 positions
        attention.decode_attention_pallas(q, k, k, pos, v_block=64)
    k8, s8 = k.astype(jnp.int8), jnp.ones((1, 2, 32))
    with pytest.raises(ValueError, match="positions \\(32\\) are a multiple"):
        attention.decode_attention_pallas(q, k8, k8, pos, k_scale=s8, v_scale=s8, v_block=64)
    cos = jnp.zeros((1, 1, 1, 64))
    with pytest.raises(ValueError, match="fused in that order"):
        attention.attend_new_tokens_pallas(jnp.zeros((1, 1, 700)), pos, cos, cos, k, k, heads=8, kv_heads=2)
    with pytest.raises(ValueError, match="partials"):
        attention.attend_new_tokens_pallas(jnp.zeros((2, 1, 1, 768), jnp.bfloat16), pos, cos, cos, k, k, heads=8,
                                           kv_heads=2)
    with pytest.raises(ValueError, match="bias"):
        attention.attend_new_tokens_pallas(jnp.zeros((1, 1, 768)), pos, cos, cos, k, k, heads=8, kv_heads=2,
                                           bias=jnp.zeros(700))
    with pytest.raises(ValueError, match="scale stores"):
        attention.attend_new_tokens_pallas(jnp.zeros((1, 1, 768)), pos, cos, cos, k.astype(jnp.int8),
                                           k.astype(jnp.int8), heads=8, kv_heads=2)
    with pytest.raises(ValueError, match="v_block=24 needs"):
        attention.attend_new_tokens_pallas(jnp.zeros((1, 1, 768)), pos, cos, cos, k8, k8, heads=8, kv_heads=2,
                                           k_scale_store=s8, v_scale_store=s8, v_block=24)
    from pallas_kernels.format import RowRms

    with pytest.raises(ValueError, match="one row of sums of squares per token"):
        attention.attend_new_tokens_pallas(jnp.zeros((1, 1, 768)), pos, cos, cos, k, k, heads=8, kv_heads=2,
                                           rms=RowRms(jnp.ones((2, 4)), 512, 1e-5))


@pytest.mark.parametrize("cache_dtype, max_len", [(jnp.float32, 80), (jnp.int8, 80), (jnp.int8, 128)])
def test_model_decodes_through_the_kernel(monkeypatch, cache_dtype, max_len):
    """`model.ATTENTION = "always"`: the cached steps that fit the kernel (here 2 and 1 new tokens; the 25-token
    prefill, 75 query rows per KV head, stays on XLA) give the logits of the XLA attention, float and int8
    caches alike (128 positions: the int8 values in blocks of 64, `KVCache.v_block`)."""
    cfg = LlamaConfig(vocab_size=97, hidden_size=192, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=6, num_key_value_heads=2, head_dim=32, rope_theta=10000.0)
    params = jax.tree.map(lambda a: a * 5.0 if a.ndim >= 2 else a, model.init_params(cfg, jax.random.key(1), jnp.float32))
    tokens = jnp.asarray(np.random.default_rng().integers(0, cfg.vocab_size, (2, 28)), jnp.int32)
    calls = []
    real = attention.decode_attention_pallas
    monkeypatch.setattr(model, "decode_attention_pallas", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))

    def run(mode):
        monkeypatch.setattr(model, "ATTENTION", mode)
        cache = model.init_cache(cfg, 2, max_len, cache_dtype)
        assert cache.v_block == (64 if max_len == 128 else 0)
        out = []
        forward = _fresh_jit(cfg)
        with jax.default_matmul_precision("float32"):  # f32 dots on a GPU: IEEE in both paths, not TF32
            for chunk in (tokens[:, :25], tokens[:, 25:27], tokens[:, 27:]):
                logits, cache = forward(params, chunk, cache=cache)
                out.append(np.asarray(logits))
        return out, cache

    want, want_cache = run("xla")
    assert not calls
    got, got_cache = run("always")
    assert [s[1] for s in calls] == [2, 1]  # the stacked layers' scan body: the 2-token and the 1-token step
    # an int8 cache code the kernel writes may sit one step from XLA's at a rounding boundary (the key or
    # value an ulp apart); that moves the later logits by up to ≈ 1 % of the largest, so only then the bound
    # is a code's step (seen in ≈ 1 of 15 runs; otherwise the two agree to ≈ 4e-6)
    flipped = any(np.any(np.asarray(a) != np.asarray(b)) for a, b in
                  zip(jax.tree.leaves(got_cache), jax.tree.leaves(want_cache)) if np.asarray(a).dtype == np.int8)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=0, atol=(3e-2 if flipped else 1e-4) * float(np.abs(w).max()))


@pytest.mark.parametrize("weights, cache_dtype, max_len, variant", [
    ("float", jnp.int8, 40, "llama"), ("float", jnp.int8, 64, "llama"), ("mixed", jnp.float32, 40, "llama"),
    ("float", jnp.float32, 40, "qwen3"), ("mixed", jnp.float32, 40, "gemma3"), ("float", jnp.int8, 40, "gemma2")])
def test_model_fused_step_matches_xla(monkeypatch, weights, cache_dtype, max_len, variant):
    """Per-layer params with q/k/v fused (as `generate` runs a quantized model on a GPU) and q/k/v biases: the
    decode steps take `attend_new_tokens_pallas`, on the projection's split-K partials for mixed weights,
    and give the XLA path's logits and cache. "qwen3": Qwen3's query and key head norms, in the kernel, and
    a layer without RoPE (SmolLM3's NoPE: the kernel's RoPE on identity tables). "gemma3": a layer with a window of 8
    and RoPE of its own beside a global one (each kernel launch gets its layer's window and tables), the head norms
    (the query's carrying another attention scale), sandwich norms and GeGLU around it. "gemma2": soft-capped scores
    and another scale without head norms, inside the kernel."""
    import pallas_kernels as pk

    qk_norm = variant in ("qwen3", "gemma3")
    gemma = dict(model_type="gemma3_text", mlp_act="gelu_tanh", embed_scale=16.0, sandwich_norms=True,
                 sliding_window=8, global_layers=(1,), rope_local_theta=100.0, query_pre_attn_scalar=20.0) \
        if variant == "gemma3" else dict(
            model_type="gemma2", mlp_act="gelu_tanh", embed_scale=16.0, sandwich_norms=True, sliding_window=8,
            global_layers=(1,), query_pre_attn_scalar=20.0, attn_logit_softcap=1.0) if variant == "gemma2" else {}
    cfg = LlamaConfig(**{**dict(vocab_size=97, hidden_size=256, intermediate_size=256, num_hidden_layers=2,
                                num_attention_heads=8, num_key_value_heads=2, head_dim=32, rope_theta=10000.0,
                                attention_bias=True, sliding_window=20, qk_norm=qk_norm, rms_norm_eps=1e-6,
                                nope_layers=(1,) if variant == "qwen3" else ()), **gemma})
    params = jax.tree.map(lambda a: a * 5.0 if a.ndim >= 2 else a, model.init_params(cfg, jax.random.key(2), jnp.float32))
    params = model.unstack_layers(params)
    rng = np.random.default_rng()
    for layer in params["layers"]:
        if qk_norm:  # weights away from 1 and different for q and k, so a dropped or swapped norm fails
            layer["q_norm"], layer["k_norm"] = (jnp.asarray(rng.uniform(0.5, 2.0, 32), jnp.float32) for _ in "qk")
        for name in ("attn_output_norm", "mlp_output_norm") if cfg.sandwich_norms else ():
            layer[name] = jnp.asarray(rng.uniform(0.5, 2.0, 256), jnp.float32)
        layer["self_attn"] = {name: {**p, "bias": jnp.asarray(rng.normal(size=p["weight"].shape[0]), jnp.float32)}
                              if name != "o_proj" else p for name, p in layer["self_attn"].items()}
        if weights == "mixed":
            for group in ("self_attn", "mlp"):
                for name, p in layer[group].items():
                    p["weight"] = pk.pack_rtn(np.asarray(p["weight"]), tenth(rng, p["weight"].shape[0]))
    params = model.fuse_projections(params)
    assert "qkv_proj" in params["layers"][0]["self_attn"]
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 20)), jnp.int32)
    calls = []
    real = attention.attend_new_tokens_pallas
    monkeypatch.setattr(model, "attend_new_tokens_pallas",
                        lambda *a, **k: calls.append((a[0].ndim, a[0].shape[-2])) or real(*a, **k))

    def run(mode):
        monkeypatch.setattr(model, "ATTENTION", mode)
        cache = model.init_cache(cfg, 2, max_len, cache_dtype)
        assert cache.v_block == (64 if max_len == 64 else 0)
        out = []
        forward = _fresh_jit(cfg)
        with jax.default_matmul_precision("float32"):  # f32 dots on a GPU: IEEE in both paths, not TF32
            for chunk in (tokens[:, :17], tokens[:, 17:19], tokens[:, 19:]):  # 17 × 4 rows > 64: XLA
                logits, cache = forward(params, chunk, cache=cache)
                out.append(np.asarray(logits))
        return out, cache

    want, want_cache = run("xla")
    got, got_cache = run("always")
    parts = 4 if weights == "mixed" else 3  # split-K partials [S, B, T, W] or the projection's [B, T, W]
    assert [c[1] for c in calls] == [2, 2, 1, 1] and all(c[0] == parts for c in calls)
    # an int8 cache code one step from XLA's (a key or value an ulp apart at a rounding boundary) moves the later
    # logits by up to ≈ 1 % of the largest (as in `test_model_decodes_through_the_kernel`; seen at 2.2e-4 here)
    flipped = any(np.any(np.asarray(a) != np.asarray(b)) for a, b in
                  zip(jax.tree.leaves(got_cache), jax.tree.leaves(want_cache)) if np.asarray(a).dtype == np.int8)
    for g, w in zip(got, want):
        err = np.abs(g - w) / float(np.abs(w).max())
        if weights == "float":
            assert err.max() <= (3e-2 if flipped else 2e-4)
        else:  # an attention output an ulp off can flip an int8 activation code of o_proj at a rounding
            # boundary (one step ≈ 1/127 of its group's max), which moves that token's logits by ≈ 1 % (seen:
            # max 1.5e-2, mean 2.7e-3 over a 2-token chunk; a 1-token chunk doubles the mean); without a flip
            # the paths agree to ≈ 3e-7, and a wiring fault moves every token by tens of %
            assert err.max() <= 3e-2 and err.mean() <= 1e-2
    for a, b in zip(jax.tree.leaves(got_cache), jax.tree.leaves(want_cache)):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        if cache_dtype == jnp.int8 and a.ndim == 4:  # a code may move by one
            assert np.abs(a - b).max() <= 1.0
        elif weights == "mixed":  # the keys and values after an activation code's flip (above) move like the logits
            # (seen: 0.17 against a largest |value| of 29, 1 run in 25); a wrong position or head moves them by ≈ 100 %
            err = np.abs(a - b) / float(np.abs(b).max())
            assert err.max() <= 3e-2 and err.mean() <= 1e-2
        else:
            assert np.abs(a - b).max() <= 1e-5 * float(np.abs(b).max())


@pytest.mark.parametrize("flag, value, tokens, match", [
    ("ATTENTION", "pallas", 1, "'xla', 'auto' or 'always'"),  # a decode step
    ("PREFILL_ATTENTION", "flash", 100, "PREFILL_ATTENTION = 'flash'; expected 'auto' or 'xla'"),  # a prompt
])
def test_unknown_attention_setting_is_named(monkeypatch, flag, value, tokens, match):
    cfg = LlamaConfig(vocab_size=11, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=32)
    params = model.init_params(cfg, jax.random.key(0), jnp.float32)
    monkeypatch.setattr(model, flag, value)
    with pytest.raises(ValueError, match=match):
        model.forward_step(params, jnp.zeros((1, tokens), jnp.int32), cfg, model.init_cache(cfg, 1, 128, jnp.float32))


class _Device:
    def __init__(self, platform, cc=None):
        self.platform = platform
        if cc is not None:
            self.compute_capability = cc


def test_cudnn_attention_needs_an_nvidia_gpu_of_ampere_or_later():
    assert attention.cudnn_attention_available(_Device("gpu", "9.0"))
    assert attention.cudnn_attention_available(_Device("gpu", "8.6"))
    assert not attention.cudnn_attention_available(_Device("gpu", "7.5"))  # Turing: no fused attention
    assert not attention.cudnn_attention_available(_Device("gpu"))  # ROCm: no compute capability
    assert not attention.cudnn_attention_available(_Device("cpu"))
    # heads up to 256 on Hopper and later (Gemma's), 128 before (jax's own rule)
    assert attention.cudnn_head_dim_limit(_Device("gpu", "9.0")) == 256
    assert attention.cudnn_head_dim_limit(_Device("gpu", "10.0")) == 256
    assert attention.cudnn_head_dim_limit(_Device("gpu", "8.9")) == 128
    assert attention.cudnn_head_dim_limit(_Device("gpu", "7.5")) == 0
    assert attention.cudnn_head_dim_limit(_Device("cpu")) == 0


@pytest.mark.skipif(INTERPRET, reason="cuDNN's flash attention needs an NVIDIA GPU")
@pytest.mark.parametrize("B, T, H, KVH, S, Dh, window, start, scale", [
    (2, 37, 8, 2, 64, 64, None, (0, 5), None),  # GQA, ragged starts: the whole mask
    (1, 200, 4, 4, 256, 128, 48, (0,), None),  # a fresh prompt (cuDNN's causal mask), sliding window, partial block
    (2, 130, 8, 2, 160, 128, None, (0, 0), None),  # fresh prompts, no window
    (3, 16, 6, 3, 40, 32, None, (0, 10, 24), None),
    (1, 300, 8, 4, 320, 256, 100, (0,), None),  # Gemma's heads of 256 (Hopper), a window
    (2, 90, 4, 2, 96, 256, None, (0, 3), 0.1),  # and Gemma 2's scale, the whole mask
    (1, 70, 4, 1, 80, 64, None, (0,), 24 ** -0.5),
])
def test_prefill_attention_matches_reference(B, T, H, KVH, S, Dh, window, start, scale):
    """cuDNN's fused attention on the whole mask gives `attend_ref`'s result to bf16 rounding."""
    if Dh > attention.cudnn_head_dim_limit():
        pytest.skip(f"cuDNN takes heads of {Dh} from Hopper on")
    rng = np.random.default_rng()
    q = jnp.asarray(rng.normal(size=(B, T, H, Dh)), jnp.bfloat16)
    k, v = (jnp.asarray(rng.normal(size=(B, KVH, S, Dh)), jnp.bfloat16) for _ in range(2))
    q_pos = jnp.asarray(np.array(start)[:, None] + np.arange(T)[None], jnp.int32)
    mask = attention.cache_mask(q_pos, S, window)
    want = np.asarray(attention.attend_ref(q.astype(jnp.float32), k, v, mask, scale=scale), np.float32)
    masked = jax.jit(functools.partial(attention.prefill_attention, scale=scale))(q, k, v, mask)
    # given the positions: cuDNN's causal mask where every row starts at 0, the whole mask elsewhere
    chosen = jax.jit(attention.prefill_attention, static_argnums=(5, 6))(q, k, v, mask, q_pos, window, scale)
    for got in (masked, chosen):
        got = np.asarray(got, np.float32)
        assert got.shape == (B, T, H, Dh)
        assert np.abs(got - want).max() <= 2e-2 * np.abs(want).max()


@pytest.mark.skipif(INTERPRET, reason="cuDNN's flash attention needs an NVIDIA GPU")
@pytest.mark.parametrize("variant", ["llama", "gemma3", "gemma2_scale"])
def test_model_prefills_through_cudnn_attention(monkeypatch, variant):
    """A bf16 prefill with PREFILL_ATTENTION 'auto' (cuDNN) gives the logits of 'xla' (`attend_ref`). "gemma3": heads
    of 256 (Hopper), a window on every layer but one, the query norm carrying another scale; "gemma2_scale": Gemma 2's
    scale without head norms (its soft cap left out: capped scores attend through XLA)."""
    extra = {}
    if variant != "llama":
        if (cudnn_limit := attention.cudnn_head_dim_limit()) < 256:
            pytest.skip(f"cuDNN takes heads of 256 from Hopper on (this GPU: ≤ {cudnn_limit})")
        extra = dict(model_type="gemma3_text" if variant == "gemma3" else "gemma2", head_dim=256, mlp_act="gelu_tanh",
                     embed_scale=16.0, sandwich_norms=True, sliding_window=40, global_layers=(1,),
                     query_pre_attn_scalar=96.0, qk_norm=variant == "gemma3",
                     rope_local_theta=100.0 if variant == "gemma3" else None)
    cfg = LlamaConfig(**{**dict(vocab_size=97, hidden_size=256, intermediate_size=384, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, head_dim=64), **extra})
    # unstacked: each layer's window is a number (under a scan it is traced, and such layers attend through XLA)
    params = model.unstack_layers(model.init_params(cfg, jax.random.key(1), jnp.bfloat16))
    tokens = jnp.asarray(np.random.default_rng().integers(0, 97, (2, 150)), jnp.int32)
    calls = []
    monkeypatch.setattr(model, "prefill_attention", lambda *a: calls.append(a[5:]) or attention.prefill_attention(*a))
    out = {}
    for mode in ("xla", "auto"):
        monkeypatch.setattr(model, "PREFILL_ATTENTION", mode)
        logits, _ = model.forward_step(params, tokens, cfg, model.init_cache(cfg, 2, 160, jnp.bfloat16))
        out[mode] = np.asarray(logits, np.float32)
    # every layer through cuDNN in 'auto', with its own window and the config's scale
    scale = 96.0 ** -0.5 if variant == "gemma2_scale" else None
    assert calls == ([(None, None)] * 2 if variant == "llama" else [(40, scale), (None, scale)])
    assert np.abs(out["auto"] - out["xla"]).max() <= 5e-2 * np.abs(out["xla"]).max()


def test_cudnn_attention_takes_prompts_not_decode_steps(monkeypatch):
    """On a GPU that has it, cuDNN takes chunks with more query rows a KV head than the decode kernel holds;
    a decode step on XLA's path stays on `attend_ref` (cuDNN there slowed bf16 decode by 10–16 %)."""
    monkeypatch.setattr(model, "cudnn_head_dim_limit", lambda *a: 128)
    monkeypatch.setattr(model, "resolve_implementation", lambda impl: "pallas")
    limit = attention.MAX_ROWS
    on = lambda t, h, kvh, dtype=jnp.bfloat16, dh=128: model._cudnn_attention_on(  # noqa: E731
        jax.ShapeDtypeStruct((2, t, h, dh), dtype), kvh, None, "auto")
    assert not on(1, 32, 8) and not on(limit // 4, 32, 8) and on(limit // 4 + 1, 32, 8)  # 4 query heads a KV head
    assert not on(limit, 8, 8) and on(limit + 1, 8, 8) and on(2048, 32, 8)
    assert not on(2048, 32, 8, jnp.float32)  # cuDNN's fused attention: half precision only
    assert not on(2048, 8, 4, dh=256) and not on(2048, 8, 4, dh=100)  # heads wider than the GPU's limit, odd heads
    monkeypatch.setattr(model, "cudnn_head_dim_limit", lambda *a: 256)  # Hopper: Gemma's heads of 256 too
    assert on(2048, 8, 4, dh=256) and not on(2048, 8, 4, dh=260)
    monkeypatch.setattr(model, "PREFILL_ATTENTION", "xla")
    assert not on(2048, 32, 8)


def test_block_keeps_a_key_block_within_32_kb():
    """The default block: 128 positions where 128 keys fit 32 KB (bf16 and int8 caches at head dim 128, the
    measured winner), smaller for wide entries, so keys and values in two stages stay within shared memory."""
    assert attention.choose_block(128, 2) == 128 and attention.choose_block(128, 1) == 128
    assert attention.choose_block(128, 4) == 64 and attention.choose_block(256, 2) == 64
    assert attention.choose_block(256, 4) == 32 and attention.choose_block(64, 4) == 128
    for dh in (16, 32, 64, 128, 256):
        for itemsize in (1, 2, 4):
            block = attention.choose_block(dh, itemsize)
            assert block & (block - 1) == 0 and 16 <= block <= 128 and block * dh * itemsize <= 32768


def test_splits_fill_about_128_programs_with_a_block_each():
    """Few (row, KV head) programs split the positions, one block a split at most as many splits as blocks
    (b1, 8 KV heads: 3 splits on a 3-block cache, 16 on a 32-block one); 128 programs or more never split."""
    assert attention.choose_splits(1, 8, 384, 128) == 3 and attention.choose_splits(1, 8, 4096, 128) == 16
    assert attention.choose_splits(8, 8, 384, 128) == 2 and attention.choose_splits(32, 8, 4096, 128) == 1
    assert attention.choose_splits(1, 8, 100, 128) == 1 and attention.choose_splits(16, 8, 4096, 64) == 1
    for b, kvh, s, blk in [(1, 1, 5000, 64), (2, 4, 700, 128), (3, 2, 129, 16)]:
        splits = attention.choose_splits(b, kvh, s, blk)
        assert 1 <= splits <= -(-s // blk) and b * kvh * splits <= 127 + b * kvh


# B, T, H, KVH, S, parts, int8, splits: padding rows (5 and 3·2 tokens of 16 code rows), none (16), split-K
# partials, an int8 cache, MQA, 3 × 2 live rows (not a power of two: the epilogue on all 16 MMA rows, repeats and
# all); splits 2 (and head dim 64, with the first case): the codes from XLA after the merge
CODES_CASES = [
    (5, 1, 8, 2, 64, 3, False, 1),
    (3, 2, 4, 2, 40, 0, True, 1),
    (16, 1, 4, 1, 32, 2, False, 1),
    (3, 3, 4, 2, 40, 2, False, 1),
    (4, 1, 8, 2, 200, 2, False, 2),
]


@pytest.mark.parametrize("B, T, H, KVH, S, parts, int8, splits, dh, wide",
                         [(*c, 128, False) for c in CODES_CASES] + [(*CODES_CASES[0], 64, False)]
                         # heads of 256, two groups each: in the programs with WIDE_HEAD_CODES, from XLA without
                         + [(*CODES_CASES[i], 256, True) for i in (0, 1, 4)] + [(*CODES_CASES[0], 256, False)])
def test_attend_new_tokens_codes_are_o_projs_quantization(B, T, H, KVH, S, parts, int8, splits, dh, wide,
                                                          num_warps=None):
    """`codes=True`: the attention comes back as o_proj's input codes — exactly what quantizing the kernel's own
    bf16 output per group of 128 gives (`head_codes_ref`: codes, scales and sums; the padding rows past B·T
    zero), with the same cache writes; in the programs where `codes_in_kernel` says so (one split, Dh = 128, or
    a multiple with `WIDE_HEAD_CODES`: a scale per group of 128 along the head), from XLA after the merge
    otherwise."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(attention, "WIDE_HEAD_CODES", wide)
        _attend_new_tokens_as_stated.clear_cache()  # (its traces read the flag: none from the other setting)
        try:
            _check_attention_codes(B, T, H, KVH, S, parts, int8, splits, dh, wide, num_warps)
        finally:
            _attend_new_tokens_as_stated.clear_cache()


def _check_attention_codes(B, T, H, KVH, S, parts, int8, splits, dh, wide, num_warps):
    rng = np.random.default_rng()
    W = (H + 2 * KVH) * dh
    qkv = jnp.asarray(rng.normal(size=(parts, B, T, W) if parts else (B, T, W)), jnp.float32 if parts else jnp.bfloat16)
    _, k, v, ks, vs = _case(rng, B, 1, H, KVH, S, dh, jnp.bfloat16, int8)
    pos = _positions(rng, B, T, S)
    cos, sin = model.rope_tables(pos, (1.0 / 10000 ** (np.arange(0, dh, 2) / dh)).astype(np.float32))
    kw = dict(heads=H, kv_heads=KVH, dtype=jnp.bfloat16, splits=splits, num_warps=num_warps)
    plain = _attend_new_tokens_as_stated(qkv, pos, cos, sin, k, v, None, ks, vs, **kw)
    got = _attend_new_tokens_as_stated(qkv, pos, cos, sin, k, v, None, ks, vs, codes=True, **kw)
    want = attention.head_codes_ref(plain[0])
    assert attention.codes_in_kernel(B, KVH, S, dh, k.dtype.itemsize, splits=splits) == (
        (dh == 128 or (wide and dh % 128 == 0)) and splits == 1)
    m = B * T  # the code rows: B·T padded to the decode GEMM's row tile (`norm.quant_rows`: 16, 32, then 64s)
    rows = 16 if m <= 16 else 32 if m <= 32 else -(-m // 64) * 64
    assert got[0].lead == (B, T) and got[0].k == H * dh and got[0].x_q.shape == (rows, H * dh)
    for name in ("x_q", "a_scale", "x_sum"):
        np.testing.assert_array_equal(np.asarray(getattr(got[0], name)), np.asarray(getattr(want, name)), err_msg=name)
    assert not np.any(np.asarray(got[0].x_q)[B * T:]) and np.all(np.asarray(got[0].a_scale)[:, : B * T] > 0)
    for a, b in zip(got[1:], plain[1:]):
        assert (a is None) == (b is None)
        if a is not None:
            np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    ref = attention.attend_new_tokens_ref(qkv, pos, cos, sin, k, v, k_scale_store=ks, v_scale_store=vs, codes=True,
                                          **{n: kw[n] for n in ("heads", "kv_heads", "dtype")})
    assert isinstance(ref[0], type(want)) and ref[0].x_q.shape == want.x_q.shape


@pytest.mark.skipif(INTERPRET, reason="warps are a compile setting of the GPU kernel: the interpreter runs a "
                                       "program whole")
@pytest.mark.parametrize("num_warps", [2, 8, 16])
def test_attend_new_tokens_any_warps(num_warps):
    """The fused step compiled for 2, 8 or 16 warps a program (`num_warps`, default 4): the same checks as at 4 on a
    bf16 cache (split-K partials, the norm's deferred rsqrt), an int8 cache, and o_proj's codes from the programs'
    epilogue on each cache."""
    test_attend_new_tokens_matches_reference(*FUSED_CASES[0], None, num_warps=num_warps)
    test_attend_new_tokens_matches_reference(*FUSED_CASES[3], None, num_warps=num_warps)
    for int8 in (False, True):
        test_attend_new_tokens_codes_are_o_projs_quantization(16, 1, 32, 8, 384, 3, int8, 1, 128, False,
                                                              num_warps=num_warps)
        test_attend_new_tokens_codes_are_o_projs_quantization(32, 1, 8, 4, 384, 3, int8, 1, 256, True,
                                                              num_warps=num_warps)  # Gemma-3-4B's b32 step


def test_codes_in_kernel_where_one_split_holds_whole_heads():
    """Llama-3-8B's 8 KV heads: one split (codes in the programs) from 16 rows on, and at b8 on caches of up to 512
    positions (`CODES_ONE_SPLIT`, measured at 384; 8 of an int8 cache's 64-position blocks); b8 on longer caches, b4
    and b1 split the positions (XLA quantizes the merged output); head dim 64 never (a group of 128 spans two
    heads). Without codes b8 keeps 2 splits."""
    assert attention.codes_in_kernel(16, 8, 4096, 128, 2) and attention.codes_in_kernel(32, 8, 384, 128, 1)
    assert attention.codes_in_kernel(8, 8, 384, 128, 2) and attention.codes_in_kernel(8, 8, 512, 128, 2)
    assert not attention.codes_in_kernel(8, 8, 640, 128, 2) and not attention.codes_in_kernel(4, 8, 384, 128, 2)
    assert not attention.codes_in_kernel(1, 8, 384, 128, 2) and not attention.codes_in_kernel(32, 8, 384, 64, 2)
    assert attention.codes_in_kernel(1, 8, 384, 128, 2, splits=1)
    assert attention.choose_splits(8, 8, 384, 128) == 2 and attention.choose_splits(8, 8, 384, 128, codes=True) == 1
    assert attention.codes_in_kernel(8, 8, 384, 128, 1) and attention.choose_splits(8, 8, 384, 64, codes=True) == 1
    assert not attention.codes_in_kernel(8, 8, 576, 128, 1)
    # the fused step's defaults: 64 positions × 3 stages on an int8 cache and on a bf16 one of 2048 positions or
    # more (where 64 of them take 16 KB), `choose_block` × 2 on other float ones
    assert attention.fused_block_stages(128, 1) == (64, 3) and attention.fused_block_stages(128, 2) == (128, 2)
    assert attention.fused_block_stages(64, 4) == (128, 2) and attention.fused_block_stages(128, 2, 2047) == (128, 2)
    assert attention.fused_block_stages(128, 2, 2048) == (64, 3)
    assert attention.fused_block_stages(256, 2, 4096) == (64, 2)
    assert attention.fused_block_stages(128, 4, 4096) == (64, 2)


@pytest.mark.parametrize("head_dim", [128, 256])
def test_model_hands_o_proj_the_attention_codes(monkeypatch, head_dim):
    """Mixed weights, 128-wide heads, 4 rows a decode step (past the GEMV's 2): with `ATTENTION_CODES` the fused
    attention kernel returns o_proj's codes and o_proj runs on them; the logits equal those of o_proj quantizing
    the kernel's bf16 output itself (the same codes, so the same sums), step after step. Heads of 256 (Gemma's)
    the same with `attention.WIDE_HEAD_CODES` (two groups a head)."""
    import pallas_kernels as pk

    monkeypatch.setattr(attention, "WIDE_HEAD_CODES", head_dim > 128)
    cfg = LlamaConfig(vocab_size=61, hidden_size=256, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=head_dim, rope_theta=10000.0)
    params = model.unstack_layers(model.init_params(cfg, jax.random.key(3), jnp.bfloat16))
    rng = np.random.default_rng()
    for layer in params["layers"]:
        for group in ("self_attn", "mlp"):
            for p in layer[group].values():
                p["weight"] = pk.pack_rtn(np.asarray(p["weight"], np.float32), tenth(rng, p["weight"].shape[0]))
    params = model.fuse_projections(params)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (4, 7)), jnp.int32)
    monkeypatch.setattr(model, "ATTENTION", "always")
    calls = []
    real = attention.attend_new_tokens_pallas
    monkeypatch.setattr(model, "attend_new_tokens_pallas", lambda *a, **k: calls.append(k["codes"]) or real(*a, **k))

    def run(on):
        monkeypatch.setattr(model, "ATTENTION_CODES", on)
        cache = model.init_cache(cfg, 4, 16, jnp.bfloat16)
        forward = jax.jit(functools.partial(model.forward_step, cfg=cfg, implementation="xla"),
                          compiler_options={"xla_allow_excess_precision": False})
        out = []
        for chunk in (tokens[:, :5], tokens[:, 5:6], tokens[:, 6:]):  # 5 × 2 rows a KV head: the kernel throughout
            logits, cache = forward(params, chunk, cache=cache)
            out.append(np.asarray(logits, np.float32))
        return out

    got = run(True)
    assert calls == [True] * 4, calls  # 2 layers × 2 traces (20 and 4 rows: one split, 1 KV head of 16 positions)
    want = run(False)
    assert calls == [True] * 4 + [False] * 4, calls
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize("splits, int8", [(1, False), (2, True)])
def test_decode_kernels_take_a_scale_and_a_softcap(splits, int8):
    """Gemma 2's scores (`scale`, then cap·tanh(s / cap) before the mask) in both decode kernels: each equals its
    reference given the same keywords, and a cap that bites moves the output far from the uncapped one."""
    from mixjax import model

    rng = np.random.default_rng()
    B, T, H, KVH, S, Dh, dtype = 2, 1, 8, 2, 96, 32, jnp.float32
    pos = _positions(rng, B, T, S)
    scores = dict(scale=0.4, softcap=0.8)
    q, k, v, ks, vs = _case(rng, B, T, H, KVH, S, Dh, dtype, int8, jnp.float32)
    q = q * 4.0  # scores of several units: the cap of 0.8 bites
    kw = dict(sliding_window=40, k_scale=ks, v_scale=vs)
    got = np.asarray(attention.decode_attention_pallas(q, k, v, pos, splits=splits, interpret=INTERPRET, **kw, **scores))
    ref = np.asarray(attention.decode_attention_ref(q, k, v, pos, **kw, **scores))
    plain = np.asarray(attention.decode_attention_ref(q, k, v, pos, **kw))
    size = np.abs(ref).max()
    tol = 1e-5 if INTERPRET else 2e-3
    assert np.abs(got - ref).max() <= tol * size and np.abs(plain - ref).max() > 0.05 * size
    qkv = jnp.asarray(rng.normal(size=(B, T, (H + 2 * KVH) * Dh)) * 4.0, dtype)
    cos, sin = model.rope_tables(pos, (1.0 / 10000 ** (np.arange(0, Dh, 2) / Dh)).astype(np.float32))
    kw = dict(heads=H, kv_heads=KVH, dtype=dtype, k_scale_store=ks, v_scale_store=vs, sliding_window=40)
    got = attention.attend_new_tokens_pallas(qkv, pos, cos, sin, k, v, splits=splits, interpret=INTERPRET, **kw,
                                             **scores)[0]
    ref = attention.attend_new_tokens_ref(qkv, pos, cos, sin, k, v, **kw, **scores)[0]
    plain = attention.attend_new_tokens_ref(qkv, pos, cos, sin, k, v, **kw)[0]
    got, ref, plain = (np.asarray(a) for a in (got, ref, plain))
    size = np.abs(ref).max()
    # an int8 cache: a new key's code may sit one step from the reference's (its RoPE rounds in another order)
    assert np.abs(got - ref).max() <= (2e-2 if int8 else tol) * size and np.abs(plain - ref).max() > 0.05 * size
