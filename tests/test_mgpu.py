"""The Mosaic GPU prefill path (pallas_kernels/mgpu.py): the int8 weight unpack, the wgmma GEMM against
its reference (Mosaic GPU interpret mode on CPU; the real kernel where a Hopper GPU is present), and
its errors. Fresh random data each run."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
import jax
import jax.numpy as jnp

import pallas_kernels as pk
from pallas_kernels import mgpu
from pallas_kernels import reference as ref
from pallas_kernels.api import has_wgmma

ON_HOPPER = has_wgmma()
INTERPRET = not ON_HOPPER


def isolated(test):
    """Interpret mode can deadlock on small machines: a test that runs a kernel goes in its own subprocess,
    timed out and retried (tests/conftest.py); on a GPU it runs in place."""
    return pytest.mark.isolated(test) if INTERPRET else test


def gpu_only(*case):  # interpret mode takes 7–15 s a case on 2 CPU cores: the CPU suite runs a subset
    return pytest.param(*case, marks=pytest.mark.skipif(INTERPRET, reason="interpret mode: the subset runs"))


def _rng():
    return np.random.default_rng()


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _weight(rng, n, k, share8):
    w = rng.normal(size=(n, k)).astype(np.float32) * 0.05
    is_int8 = np.zeros(n, bool)
    is_int8[rng.permutation(n)[: int(round(share8 * n))]] = True
    return pk.pack_rtn(jnp.asarray(w), jnp.asarray(is_int8))


def _operands(rng, m, k, n):
    g = k // 128
    x_q = jnp.asarray(rng.integers(-127, 128, (m, k)), jnp.int8)
    w = jnp.asarray(rng.integers(-127, 128, (n, k)), jnp.int8)
    sa = jnp.asarray(rng.uniform(1e-3, 1e-2, (g, m)), jnp.float32)
    sw = jnp.asarray(rng.uniform(1e-3, 1e-2, (g, n)), jnp.float32)
    return x_q, sa, w, sw


@pytest.mark.parametrize("n, k, share8, rows", [(300, 576, 0.1, 384), (256, 256, 0.0, None), (130, 384, 1.0, 256)])
def test_int8_weight_is_the_dequantized_weight(n, k, share8, rows):
    qw = _weight(_rng(), n, k, share8)
    w, s = mgpu.int8_weight(qw, rows=rows)
    np_ = rows or n
    assert w.shape == (np_, qw.k_padded) and w.dtype == jnp.int8 and s.shape == (qw.num_groups, np_)
    deq = np.asarray(w[:n], np.float32).reshape(n, -1, 128) * np.asarray(s[:, :n]).T[..., None]
    assert np.array_equal(deq.reshape(n, -1)[:, :k], np.asarray(qw.dequantize()))  # bit-exact, channel order
    assert not np.any(np.asarray(w[n:])) and not np.any(np.asarray(s[:, n:]))  # padding rows are zero
    if share8 < 1:  # 4-bit channels hold u − z ∈ [-15, 15]
        four = ~np.isin(np.arange(n), np.asarray(qw.channel[: qw.n8]))
        assert np.abs(np.asarray(w[:n])[four]).max() <= 15


@pytest.mark.parametrize("cfg", [
    mgpu.MgpuConfig(programs=3),  # two groups a step, the first rescaled while the second multiplies
    # f32 output (64-column slots would not fit), partials to f32 by the integer add and two FMAs
    mgpu.MgpuConfig(wg_along="n", programs=2, epi_n=32, convert="magic_fma"),
    # turns of two groups' MMAs (every arrival waited for), partials to f32 by the integer add of 1.5·2^23
    mgpu.MgpuConfig(programs=3, pingpong=True, convert="magic"),
    gpu_only(mgpu.MgpuConfig(programs=3, convert="magic")),
    gpu_only(mgpu.MgpuConfig(programs=2, gps=1, stages=4)),  # one group a step (session 4's default)
    gpu_only(mgpu.MgpuConfig(tile_m=128, tile_n=64, wg_along="n", epi_n=32, programs=1, overlap=True, gps=1)),
    gpu_only(mgpu.MgpuConfig(programs=2, seed=True, overlap=True, gps=1)),
    # three compute warpgroups along M (CTA 192 × 64, two groups a step; 192 × 128, one group). Not in interpret
    # mode: its four warpgroup threads hang on a 2-core machine (test_three_warpgroups_lower_for_cuda instead)
    gpu_only(mgpu.MgpuConfig(tile_n=64, epi_n=32, wgs=3, programs=2)),
    gpu_only(mgpu.MgpuConfig(tile_n=128, wgs=3, gps=1, stages=3, epi_n=32, programs=3)),
    # one group a step with every option of its path at once: turns, the carried partial, the seeded partial
    mgpu.MgpuConfig(tile_m=128, tile_n=64, wg_along="n", epi_n=32, programs=3, pingpong=True, overlap=True,
                    seed=True, gps=1),
])
@isolated
def test_group_matmul_matches_reference(cfg):
    rng = _rng()
    m, n = 2 * cfg.cta_m, 2 * cfg.cta_n
    x_q, sa, w, sw = _operands(rng, m, 384 * cfg.gps, n)
    y = mgpu.w8a8_group_matmul(x_q, sa, w, sw, out_dtype=jnp.float32, config=cfg, interpret=INTERPRET)
    want = ref.w8a8_ref(x_q, sa.T, w, sw)
    assert y.shape == (m, n) and y.dtype == jnp.float32
    # exact integer partials; the seeded rescales add one f32 rounding of 1.5·2^23·s_w per group
    assert _rel(y, want) < (1e-4 if cfg.seed or cfg.convert == "magic_fma" else 1e-6)
    if cfg.convert == "magic":  # the same f32 partials as the conversion's, so the same bits
        same = dataclasses.replace(cfg, convert="i2f")
        assert np.array_equal(y, mgpu.w8a8_group_matmul(x_q, sa, w, sw, out_dtype=jnp.float32, config=same,
                                                        interpret=INTERPRET))


@pytest.mark.parametrize("cfg, m", [
    (mgpu.MgpuConfig(programs=2), 192),  # two row tiles: [0, 128) and [64, 192)
    (mgpu.MgpuConfig(programs=2, gps=1), 320),  # three: the last, [192, 320), overlaps the second
    gpu_only(mgpu.THREE_WG_CONFIG, 2048),  # the prefill's shape: 11 tiles of 192 rows, the last from row 1856
    gpu_only(dataclasses.replace(mgpu.THREE_WG_CONFIG, programs=3), 448),
])
@isolated
def test_group_matmul_rows_not_a_multiple_of_the_cta(cfg, m):
    """Rows a multiple of 64 but not of the CTA's: the last row tile ends at M and recomputes rows of the one
    before it; every row equals the reference (no padding rows needed)."""
    rng = _rng()
    x_q, sa, w, sw = _operands(rng, m, 256, cfg.cta_n)
    y = mgpu.w8a8_group_matmul(x_q, sa, w, sw, out_dtype=jnp.float32, config=cfg, interpret=INTERPRET)
    assert y.shape == (m, cfg.cta_n) and m % cfg.cta_m
    assert _rel(y, ref.w8a8_ref(x_q, sa.T, w, sw)) < 1e-6


@pytest.mark.parametrize("cfg", [
    mgpu.MgpuConfig(programs=3, act_scale="token"),  # two groups a step
    mgpu.MgpuConfig(tile_n=64, wg_along="n", epi_n=32, programs=2, gps=1, convert="magic", act_scale="token"),
    gpu_only(dataclasses.replace(mgpu.THREE_WG_CONFIG, programs=3, act_scale="token")),
])
@isolated
def test_token_activation_scales_match_reference(cfg):
    """`act_scale="token"` (one activation scale a row, applied once after the K loop) equals the per-group
    reference whose activation scales are the same in every group, to f32 rounding."""
    rng = _rng()
    m, n = 2 * cfg.cta_m, 2 * cfg.cta_n
    x_q, sa, w, sw = _operands(rng, m, 512, n)
    sa = sa[:1]  # [1, M]
    y = mgpu.w8a8_group_matmul(x_q, sa, w, sw, out_dtype=jnp.float32, config=cfg, interpret=INTERPRET)
    assert _rel(y, ref.w8a8_ref(x_q, jnp.repeat(sa, 4, axis=0).T, w, sw)) < 1e-6
    with pytest.raises(ValueError, match=r"\[1, Mp\].*act_scale='token'"):
        mgpu.w8a8_group_matmul(x_q, jnp.repeat(sa, 4, axis=0), w, sw, config=cfg, interpret=INTERPRET)


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="on a GPU host the lowered module carries the Mosaic GPU "
                    "kernel compiled, not as text (H200, session 27); CPU hosts check it")
def test_token_activation_scales_lower_for_cuda():
    """Lowered for CUDA (no GPU needed): the row scales carried through the K loop to the epilogue, one group a
    step and two."""
    shapes = [jax.ShapeDtypeStruct(s, t) for s, t in
              (((128, 512), jnp.int8), ((1, 128), jnp.float32), ((128, 512), jnp.int8), ((4, 128), jnp.float32))]
    for cfg in (mgpu.MgpuConfig(act_scale="token"), mgpu.MgpuConfig(gps=1, stages=4, act_scale="token")):
        text = jax.jit(lambda *a: mgpu.w8a8_group_matmul(*a, config=cfg)).trace(*shapes).lower(
            lowering_platforms=("cuda",)).as_text()
        assert "wgmma" in text and "load_sa" in text, cfg


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="on a GPU host the lowered module carries the Mosaic GPU "
                    "kernel compiled, not as text (H200, session 27); CPU hosts check it")
def test_magic_conversion_lowers_without_int_to_float():
    """Lowered for CUDA (no GPU needed): the magic conversions leave no `arith.sitofp` in the kernel, the default
    has one (the rescale's conversion, the instruction Nsight Compute counted once per element and group)."""
    shapes = [jax.ShapeDtypeStruct(s, t) for s, t in
              (((128, 256), jnp.int8), ((2, 128), jnp.float32), ((128, 256), jnp.int8), ((2, 128), jnp.float32))]
    for convert, count in (("i2f", 1), ("magic", 0), ("magic_fma", 0)):
        cfg = mgpu.MgpuConfig(convert=convert)
        text = jax.jit(lambda *a: mgpu.w8a8_group_matmul(*a, config=cfg)).trace(*shapes).lower(
            lowering_platforms=("cuda",)).as_text()
        assert "wgmma" in text and text.count("arith.sitofp") == count, convert


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="on a GPU host the lowered module carries the Mosaic GPU "
                    "kernel compiled, not as text (H200, session 27); CPU hosts check it")
def test_three_warpgroups_lower_for_cuda():
    """`MgpuConfig(wgs=3)` (no GPU needed): the CTA covers 192 rows, the kernel lowers with its three compute
    warpgroups; configurations it cannot take are refused by name."""
    cfg = mgpu.MgpuConfig(tile_n=64, epi_n=32, wgs=3)
    assert (cfg.cta_m, cfg.cta_n) == (192, 64)
    shapes = [jax.ShapeDtypeStruct(s, t) for s, t in
              (((384, 256), jnp.int8), ((2, 384), jnp.float32), ((128, 256), jnp.int8), ((2, 128), jnp.float32))]
    text = jax.jit(lambda *a: mgpu.w8a8_group_matmul(*a, config=cfg)).trace(*shapes).lower(
        lowering_platforms=("cuda",)).as_text()
    assert "wgmma" in text
    with pytest.raises(ValueError, match="pingpong needs 2"):
        mgpu.MgpuConfig(wgs=3, pingpong=True)
    with pytest.raises(ValueError, match="wgs=4"):
        mgpu.MgpuConfig(wgs=4)


@pytest.mark.parametrize("m, k, n, share8", [(130, 576, 300, 0.1),  # 5 groups: one group a step
                                             (128, 256, 96, 0.0), gpu_only(1, 128, 128, 1.0)])
@isolated
def test_mixed_matmul_mgpu_within_bf16_bound(m, k, n, share8):
    rng = _rng()
    qw = _weight(rng, n, k, share8)
    x = jnp.asarray(rng.normal(size=(m, k)), jnp.bfloat16)
    y = mgpu.mixed_matmul_mgpu(x, qw, interpret=INTERPRET)
    assert y.shape == (m, n) and y.dtype == jnp.bfloat16
    assert _rel(y, ref.mixed_matmul_ref(x, qw)) < 5e-3  # the bound of every bf16-output path


def _unpacks(x, qw) -> int:
    """Unpack passes in the CUDA lowering of the prefill GEMM call: the kernel (`unpack.int8_weight_pallas`,
    `mgpu.UNPACK`) or the gathers of its XLA reference."""
    text = jax.jit(mgpu.mixed_matmul_mgpu).trace(x, qw).lower(lowering_platforms=("cuda",)).as_text()
    return text.count('name = "unpack_int8"') + text.count("stablehlo.gather")


@pytest.mark.parametrize("unpack", ["pallas", "xla"])
def test_mixed_weight_unpacks_once_by_the_chosen_pass(monkeypatch, unpack):
    monkeypatch.setattr(mgpu, "UNPACK", unpack)
    mgpu.mixed_matmul_mgpu.clear_cache()  # UNPACK is read when the call is traced
    text = mgpu.mixed_matmul_mgpu.trace(jax.ShapeDtypeStruct((256, 256), jnp.bfloat16),
                                        _weight(_rng(), 200, 256, 0.1)).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count('name = "unpack_int8"') == (unpack == "pallas")
    assert ("stablehlo.gather" in text) == (unpack == "xla")


def test_all_8bit_weight_skips_the_unpack():
    """W8A8 (every channel 8-bit, fused parts included): the GEMM reads the stored codes, so the lowered call
    has no unpack pass, which a mixed weight still needs; the result stays within the bound."""
    from pallas_kernels.fuse import concat_mixed

    rng = _rng()
    k = 256
    fused = concat_mixed([_weight(rng, 120, k, 1.0), _weight(rng, 100, k, 1.0)])  # 220 rows, padded to 256
    mixed = _weight(rng, 220, k, 0.5)

    x = jax.ShapeDtypeStruct((256, k), jnp.bfloat16)
    assert _unpacks(x, fused) == 0 and _unpacks(x, mixed) > 0
    assert mgpu._rows_in_channel_order(fused, 128) and not mgpu._rows_in_channel_order(mixed, 128)
    assert not mgpu._rows_in_channel_order(_weight(rng, 100, k, 1.0), 256)  # 128 padded rows: not whole CTAs


@isolated
def test_all_8bit_weight_within_bf16_bound():
    from pallas_kernels.fuse import concat_mixed

    rng = _rng()
    m, k = 70, 384
    qw = concat_mixed([_weight(rng, 120, k, 1.0), _weight(rng, 40, k, 1.0)])
    x = jnp.asarray(rng.normal(size=(m, k)), jnp.bfloat16)
    y = mgpu.mixed_matmul_mgpu(x, qw, interpret=INTERPRET)
    assert y.shape == (m, 160) and y.dtype == jnp.bfloat16
    assert _rel(y, ref.mixed_matmul_ref(x, qw)) < 5e-3


def test_int8_prefill_matrix_is_read_instead_of_the_unpack():
    """`with_int8_prefill`: the weight holds `int8_weight`'s matrix (rows rounded up to 128), the lowered GEMM
    call has no unpack pass left, an all-8-bit weight is returned as it is, and fusing refuses held parts."""
    from pallas_kernels.fuse import concat_mixed

    rng = _rng()
    qw = _weight(rng, 200, 384, 0.1)
    held = mgpu.with_int8_prefill(qw)
    w, s = mgpu.int8_weight(qw, rows=256)
    assert np.array_equal(held.prefill_w, w) and np.array_equal(held.prefill_s, s)
    x = jax.ShapeDtypeStruct((256, 384), jnp.bfloat16)

    assert _unpacks(x, held) == 0 < _unpacks(x, qw) and _unpacks(x, held.without_int8_prefill()) == _unpacks(x, qw)
    eight = _weight(rng, 130, 384, 1.0)
    assert mgpu.with_int8_prefill(eight) is eight
    with pytest.raises(ValueError, match="fuse first"):
        concat_mixed([held, qw])
    with pytest.raises(TypeError, match="MixedWeight"):
        mgpu.with_int8_prefill(jnp.zeros((4, 4)))


@isolated
def test_int8_prefill_matrix_gives_the_same_bits():
    rng = _rng()
    qw = _weight(rng, 200, 256, 0.1)
    x = jnp.asarray(rng.normal(size=(70, 256)), jnp.bfloat16)
    y = mgpu.mixed_matmul_mgpu(x, mgpu.with_int8_prefill(qw), interpret=INTERPRET)
    assert np.array_equal(np.asarray(y, np.float32), np.asarray(mgpu.mixed_matmul_mgpu(x, qw, interpret=INTERPRET),
                                                                 np.float32))


def test_pick_config_narrows_the_cta_while_one_wave_fits():
    """128 × 64 CTAs where they fit one wave (short prompts onto 4096 outputs on 132 SMs), else the default;
    on this CPU (4 virtual SMs) the (128, 256, 96) case above takes the narrow tile in interpret mode."""
    assert mgpu.pick_config(256, 4096, sms=132) == mgpu.NARROW_CONFIG  # 2 × 64 = 128 CTAs
    assert mgpu.pick_config(200, 4096, sms=132).cta_n == 64
    for m, n in [(256, 6144), (512, 4096), (256, 28672), (1024, 28672)]:  # a second wave, or plenty of CTAs
        assert mgpu.pick_config(m, n, sms=132) == mgpu.DEFAULT_CONFIG, (m, n)
    assert mgpu.pick_config(128, 96, sms=4).cta_n == 64 and mgpu.pick_config(130, 300, sms=4).cta_n == 128


@pytest.mark.parametrize("m, n, three", [
    (3072, 4096, True),  # 512 CTAs of 192 rows: 4 tiles a CTA × 192 × 0.96 against 768 of 128: 6 × 128
    (1536, 6144, True),  # 3 tiles × 192 against 5 × 128 (measured 13 % faster)
    (2048, 28672, True),  # 19 × 192 × 0.96 = 3502 against 28 × 128 = 3584
    (2048, 4096, False),  # 3 × 192 × 0.96 = 553 against 4 × 128 = 512: the 192-row tiles leave a third wave
    (512, 28672, False),
])
def test_pick_config_weighs_three_warpgroups_by_tiles_a_cta(m, n, three):
    """192-row CTAs of three compute warpgroups where a CTA's tiles times their rows, weighted by the measured
    speed a row, undercut the default's."""
    assert mgpu.pick_config(m, n, sms=132, three_wgs=True) == (mgpu.THREE_WG_CONFIG if three else mgpu.DEFAULT_CONFIG)
    assert mgpu.pick_config(m, n, sms=132, three_wgs=False) == mgpu.DEFAULT_CONFIG  # what interpret mode takes


@isolated
def test_mixed_matmul_mgpu_takes_codes():
    """`QuantizedActivations` from a producer (a norm or SwiGLU kernel at prefill, `model.PREFILL_CODES`) go
    to the GEMM as they are: with the codes the float path would make, the same bits; rows that do not
    fill the tile are padded."""
    from pallas_kernels.format import QuantizedActivations
    from pallas_kernels.kernels import quantize_activations_xla

    rng = _rng()
    m, k, n = 130, 256, 96
    qw = _weight(rng, n, k, 0.1)
    x = jnp.asarray(rng.normal(size=(m, k)), jnp.bfloat16)
    codes = QuantizedActivations(*quantize_activations_xla(x, block_m=64), (m,), k, "bfloat16")
    y = mgpu.mixed_matmul_mgpu(codes, qw, interpret=INTERPRET)
    assert y.shape == (m, n) and y.dtype == jnp.bfloat16
    assert np.array_equal(np.asarray(y, np.float32), np.asarray(mgpu.mixed_matmul_mgpu(x, qw, interpret=INTERPRET),
                                                                 np.float32))
    with pytest.raises(ValueError, match="codes of 256 columns for a weight of K = 384"):
        mgpu.mixed_matmul_mgpu(codes, _weight(rng, n, 384, 0.1), interpret=True)


def _f32_matmul(a, b):
    """a @ b in f32 on every backend (a GPU's default rounds f32 operands to TF32: ≈ 3e-4 relative, which failed
    the 1e-5 bounds below on the H200 in session 30)."""
    return jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)


def _uneven_groups_case():
    """(m, k, qw, x): 130 rows of K = 384 whose first group of 128 is 30× the others, a weight of 96 rows."""
    rng = _rng()
    m, k, n = 130, 384, 96
    x = rng.normal(size=(m, k)).astype(np.float32)
    x[:, :128] *= 30.0
    return m, k, _weight(rng, n, k, 0.1), jnp.asarray(x)


@isolated
def test_prefill_token_scales_quantize_each_row_once(monkeypatch):
    """`mgpu.PREFILL_ACT_SCALE = "token"`: a float input is quantized with one scale a row (`quantize_rows`) and
    the GEMM takes `act_scale="token"`: f32 output equal to that per-row reference to f32 rounding, and far from
    the per-group one on rows whose groups differ in size (the first group 30× the rest)."""
    m, k, qw, x = _uneven_groups_case()
    monkeypatch.setattr(mgpu, "PREFILL_ACT_SCALE", "token")
    monkeypatch.setattr(mgpu, "ROW_QUANT", "xla")
    mgpu.mixed_matmul_mgpu.clear_cache()  # read when the call is traced
    y = mgpu.mixed_matmul_mgpu(x, qw, interpret=INTERPRET)
    mgpu.mixed_matmul_mgpu.clear_cache()
    x_q, sa = mgpu.quantize_rows(x)  # [M, Kp], [1, M]
    token_ref = _f32_matmul((x_q.astype(jnp.float32) * sa.T)[:, :k], qw.dequantize().T)
    assert y.shape == (m, qw.n) and y.dtype == jnp.float32
    assert _rel(y, token_ref) < 1e-5
    assert _rel(y, ref.mixed_matmul_ref(x, qw)) > 1e-3  # per-group scales round the small groups finer
    # the one-pass Pallas row quantization (the default on a GPU; the interpreter keeps XLA's): a rare code
    # may move by one (Triton's division)
    monkeypatch.setattr(mgpu, "ROW_QUANT", "pallas")
    assert _rel(mgpu.mixed_matmul_mgpu(x, qw, interpret=INTERPRET), token_ref) < 1e-3
    mgpu.mixed_matmul_mgpu.clear_cache()
    for name, value in (("PREFILL_ACT_SCALE", "tokens"), ("ROW_QUANT", "triton")):
        monkeypatch.setattr(mgpu, name, value)
        with pytest.raises(ValueError, match=f"{name} = '{value}'"):
            mgpu.mixed_matmul_mgpu(x, qw, interpret=INTERPRET)
        mgpu.mixed_matmul_mgpu.clear_cache()
        monkeypatch.setattr(mgpu, name, {"PREFILL_ACT_SCALE": "token", "ROW_QUANT": "pallas"}[name])


@isolated
def test_codes_with_one_scale_a_row_take_the_token_rescale(monkeypatch):
    """Codes whose producer gave one scale a row (`QuantizedActivations.row_scale`, the norms' and SwiGLU's codes
    with `PREFILL_ACT_SCALE = "token"`) go through the per-token rescale whatever `PREFILL_ACT_SCALE` says: the
    same bits as the float input quantized a row at a time (the per-group rescale of the repeated scales rounds
    differently), and the per-row reference to f32 rounding."""
    from pallas_kernels.format import QuantizedActivations
    from pallas_kernels.kernels import quantize_activations_xla

    m, k, qw, x = _uneven_groups_case()
    codes = QuantizedActivations(*quantize_activations_xla(x, block_m=64, row_scale=True), (m,), k, "float32",
                                 row_scale=True)
    y = mgpu.mixed_matmul_mgpu(codes, qw, interpret=INTERPRET)  # PREFILL_ACT_SCALE "group"
    monkeypatch.setattr(mgpu, "PREFILL_ACT_SCALE", "token")
    mgpu.mixed_matmul_mgpu.clear_cache()  # read when the call is traced
    y_float = mgpu.mixed_matmul_mgpu(x, qw, interpret=INTERPRET)
    mgpu.mixed_matmul_mgpu.clear_cache()
    assert np.array_equal(np.asarray(y), np.asarray(y_float))
    x_q, sa = mgpu.quantize_rows(x)
    assert _rel(y, _f32_matmul((x_q.astype(jnp.float32) * sa.T)[:, :k], qw.dequantize().T)) < 1e-5


@isolated
def test_static_scales_folded_into_the_weight_take_the_token_rescale():
    """Static activation scales at prefill (`pallas_kernels.static`): codes whose scale is 1 a row and the weight's
    scales multiplied by each group's static scale go through the per-token rescale, and give the per-(row, group)
    reference of the same codes to f32 rounding."""
    from pallas_kernels import static

    m, k, qw, x = _uneven_groups_case()
    a = jnp.max(jnp.abs(x), axis=0).reshape(-1, 128).max(axis=1) * 0.8  # some values clip
    codes = static.static_codes(x, a)
    want = ref.mixed_codes_matmul_ref(codes.x_q, codes.a_scale.T, qw)
    y = mgpu.mixed_matmul_mgpu(static.static_codes(x, a, unit_scale=True), static.fold_scales(qw, a),
                               interpret=INTERPRET)
    assert y.shape == (m, qw.n) and y.dtype == jnp.float32
    assert _rel(y, want) < 1e-5


def test_bad_configs_and_shapes_are_named():
    with pytest.raises(ValueError, match="tile_m"):
        mgpu.MgpuConfig(tile_m=96)
    with pytest.raises(ValueError, match="tile_n"):
        mgpu.MgpuConfig(tile_n=512)
    with pytest.raises(ValueError, match="wg_along"):
        mgpu.MgpuConfig(wg_along="k")
    with pytest.raises(ValueError, match="epi_n"):
        mgpu.MgpuConfig(epi_n=48)
    with pytest.raises(ValueError, match="gps"):
        mgpu.MgpuConfig(gps=2, overlap=True)
    with pytest.raises(ValueError, match="convert"):
        mgpu.MgpuConfig(convert="fast")
    with pytest.raises(ValueError, match="without seed"):
        mgpu.MgpuConfig(gps=1, seed=True, convert="magic")
    with pytest.raises(ValueError, match="act_scale"):
        mgpu.MgpuConfig(act_scale="row")
    with pytest.raises(ValueError, match="'token' goes without seed"):
        mgpu.MgpuConfig(gps=1, seed=True, act_scale="token")
    with pytest.raises(ValueError, match="shared memory.*lower stages, gps or epi_n"):  # found on the H200
        mgpu.w8a8_group_matmul(*_operands(_rng(), 128, 512, 256), out_dtype=jnp.float32,
                               config=mgpu.MgpuConfig(wg_along="n"), interpret=True)
    if (os.cpu_count() or 1) < 4:  # a clear error instead of the interpreter's hang (CI has two cores)
        with pytest.raises(ValueError, match="wgs=3 in interpret mode.*interpret a config with wgs=2"):
            mgpu.w8a8_group_matmul(*_operands(_rng(), 192, 256, 128), config=mgpu.THREE_WG_CONFIG, interpret=True)
    with pytest.raises(ValueError, match="multiple of config.gps"):
        mgpu.w8a8_group_matmul(*_operands(_rng(), 128, 384, 128), interpret=True)
    x_q, sa, w, sw = _operands(_rng(), 100, 256, 128)
    with pytest.raises(ValueError, match="Mp=100 must be a multiple of 64"):
        mgpu.w8a8_group_matmul(x_q, sa, w, sw, interpret=True)
    with pytest.raises(ValueError, match="at least the CTA's 192 rows"):
        mgpu.w8a8_group_matmul(*_operands(_rng(), 128, 256, 128), config=mgpu.THREE_WG_CONFIG, interpret=True)
    with pytest.raises(ValueError, match="Np=96 a multiple of its 128 columns"):
        mgpu.w8a8_group_matmul(*_operands(_rng(), 128, 256, 96), interpret=True)
    with pytest.raises(TypeError, match="int8"):
        mgpu.w8a8_group_matmul(x_q.astype(jnp.int32), sa, w, sw, interpret=True)
    with pytest.raises(ValueError, match="scales"):
        mgpu.w8a8_group_matmul(x_q, sa.T, w, sw, interpret=True)
    with pytest.raises(ValueError, match="rows"):
        mgpu.int8_weight(_weight(_rng(), 256, 128, 0.1), rows=128)


@pytest.mark.skipif(not ON_HOPPER, reason="the dispatch to the wgmma kernel needs a Hopper GPU")
def test_api_sends_prefill_to_mgpu_on_hopper():
    rng = _rng()
    qw = _weight(rng, 256, 512, 0.1)
    x = jnp.asarray(rng.normal(size=(pk.api.MGPU_MIN_M, 512)), jnp.bfloat16)
    y = pk.mixed_matmul(x, qw, implementation="pallas")
    assert _rel(y, ref.mixed_matmul_ref(x, qw)) < 5e-3
