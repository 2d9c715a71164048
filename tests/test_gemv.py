"""The dp4a decode GEMV (pallas_kernels/gemv.py) in interpret mode (CPU) or on a GPU, against the reference.

Fresh random inputs each run; the integer partials are exact, so only the f32 summation order differs from
the reference (the MMA kernel's tolerance).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk
from pallas_kernels import gemv
from pallas_kernels import reference as ref

INTERPRET = jax.default_backend() != "gpu"
RTOL = 1e-5 if INTERPRET else 1e-4  # Triton's f32 division may flip a rare activation code


def _case(m, k, n, share8, dtype=jnp.float32):
    rng = np.random.default_rng()
    w = rng.normal(size=(n, k)).astype(np.float32) * 0.05
    is_int8 = np.zeros(n, bool)
    is_int8[rng.permutation(n)[: int(round(share8 * n))]] = True
    x = rng.normal(size=(m, k)) * rng.uniform(0.1, 3.0, size=(1, k))  # uneven group ranges
    return jnp.asarray(x, dtype), pk.pack_rtn(w, is_int8)


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def test_dp4a_emulation_is_the_byte_dot_product():
    rng = np.random.default_rng()
    a, b = (rng.integers(-128, 128, size=(64, 4)).astype(np.int8) for _ in range(2))
    c = rng.integers(-1000, 1000, size=64).astype(np.int32)
    words = [jnp.asarray(v.view(np.int32).reshape(64)) for v in (a, b)]
    got = gemv._dp4a(*words, jnp.asarray(c), interpret=True)
    np.testing.assert_array_equal(np.asarray(got), (a.astype(np.int32) * b.astype(np.int32)).sum(1) + c)


@pytest.mark.parametrize("m, k, n, share8", [(1, 4096, 96, 0.1), (1, 576, 200, 0.0), (1, 640, 130, 1.0),
                                             (3, 1000, 96, 0.3), (1, 128, 40, 0.5)])
def test_gemv_matches_reference(m, k, n, share8):
    x, qw = _case(m, k, n, share8)
    y = gemv.mixed_gemv_pallas(x, qw, interpret=INTERPRET)
    assert y.shape == (m, n) and y.dtype == jnp.float32
    assert _rel(y, ref.mixed_matmul_ref(x, qw)) < RTOL


@pytest.mark.parametrize("cfg", [gemv.GemvConfig(32, 5), gemv.GemvConfig(128, 1, 8), gemv.GemvConfig(64, 1, 4, 1),
                                 gemv.GemvConfig(64, 5, quantize_first=True)])
def test_gemv_other_configs(cfg):
    x, qw = _case(2, 576, 150, 0.1)  # 5 groups (K padded), 150 channels
    assert _rel(gemv.mixed_gemv_pallas(x, qw, config=cfg, interpret=INTERPRET), ref.mixed_matmul_ref(x, qw)) < RTOL


def test_gemv_bf16_and_zero_rows():
    x, qw = _case(1, 384, 96, 0.1, jnp.bfloat16)
    x = x.at[0, :128].set(0)  # an all-zero group: scale 0, codes 0
    y = gemv.mixed_gemv_pallas(x, qw, interpret=INTERPRET)
    assert y.dtype == jnp.bfloat16
    assert _rel(y, ref.mixed_matmul_ref(x, qw)) < 1e-2 / 2  # both rounded to bf16 once


@pytest.mark.parametrize("m, to_gemv", [(1, True), (2, True), (3, False)])
def test_api_sends_up_to_two_rows_to_the_gemv(monkeypatch, m, to_gemv):
    x, qw = _case(m, 256, 96, 0.1)
    calls = []
    monkeypatch.setattr(gemv, "mixed_gemv_pallas", lambda *a, **kw: calls.append(1) or jnp.zeros((m, 96)))
    pk.mixed_matmul(x, qw, implementation="pallas", interpret=True)
    assert calls == ([1] if to_gemv else [])


@pytest.mark.parametrize("m", [1, 2])
def test_default_gemv_matches_reference_one_and_two_rows(m):
    """The defaults the API runs: one launch (in-kernel quantization) at M = 1, two launches at M = 2;
    12 groups, 4 an iteration, 200 channels (ragged 32-row tiles)."""
    x, qw = _case(m, 1500, 200, 0.1, jnp.bfloat16)
    assert gemv.choose_gemv_config(qw.num_groups, 256, m=m).quantize_first == (m > 1)
    y = pk.mixed_matmul(x, qw, implementation="pallas", interpret=True)
    assert y.shape == (m, 200) and y.dtype == jnp.bfloat16
    assert _rel(y, ref.mixed_matmul_ref(x, qw)) < 1e-2 / 2


@pytest.mark.parametrize("cfg, m, match", [(gemv.GemvConfig(96, 1), 1, "block_n=96"),
                                           (gemv.GemvConfig(64, 3), 1, "split_k=3"),
                                           (gemv.GemvConfig(64, 1), 17, "1–16 activation rows")])
def test_gemv_rejects_what_it_cannot_take(cfg, m, match):
    x, qw = _case(m, 256, 96, 0.1)
    with pytest.raises(ValueError, match=match):
        gemv.mixed_gemv_pallas(x, qw, config=cfg, interpret=INTERPRET)


@pytest.mark.parametrize("m, k, n, share8, cfg", [
    (1, 1024, 256, 0.1, gemv.GemvConfig(32, 2, quantize_first=True, groups_per_iter=4)),
    (3, 2048, 200, 0.3, gemv.GemvConfig(64, 2, quantize_first=True, groups_per_iter=8)),
    (2, 600, 96, 0.0, gemv.GemvConfig(32, 1, quantize_first=True, groups_per_iter=1)),  # K padded, G = 5
    (1, 512, 130, 1.0, gemv.GemvConfig(32, 1, quantize_first=True, groups_per_iter=2)),
    (1, 600, 96, 0.1, gemv.GemvConfig(32, 1, quantize_first=True, groups_per_iter=1, xla_quant=True)),  # XLA codes
    (2, 1024, 256, 0.1, gemv.GemvConfig(32, 2, quantize_first=True, groups_per_iter=4, xla_quant=True)),
    # the same programs quantizing their own groups of x (one launch)
    (1, 1024, 256, 0.1, gemv.GemvConfig(32, 2, groups_per_iter=4)),
    (3, 2048, 200, 0.3, gemv.GemvConfig(64, 2, groups_per_iter=8)),
    (2, 600, 96, 0.0, gemv.GemvConfig(32, 5, groups_per_iter=1)),  # K padded, G = 5
    (1, 768, 130, 1.0, gemv.GemvConfig(32, 3, groups_per_iter=2)),
    # per-word rescale, prefetched iterations (even, odd and single counts), 8 warps, 16-row tiles
    (1, 1024, 256, 0.1, gemv.GemvConfig(32, 2, quantize_first=True, groups_per_iter=4, word_rescale=True)),
    (2, 2048, 200, 0.3, gemv.GemvConfig(32, 1, quantize_first=True, groups_per_iter=4, prefetch=True)),  # 4 its
    (1, 1536, 130, 1.0, gemv.GemvConfig(32, 1, quantize_first=True, groups_per_iter=4, prefetch=True)),  # 3 its
    (1, 2560, 96, 0.0, gemv.GemvConfig(32, 1, 8, quantize_first=True, groups_per_iter=4, prefetch=True,
                                       word_rescale=True)),  # 5 iterations, all 4-bit
    (1, 1024, 256, 0.1, gemv.GemvConfig(16, 2, quantize_first=True, groups_per_iter=4, prefetch=True)),  # 1 it
    (2, 1024, 256, 0.1, gemv.GemvConfig(32, 1, 8, groups_per_iter=2, prefetch=True)),  # quantizing in programs
])
def test_gemv_groups_per_iteration(m, k, n, share8, cfg):
    """Several groups a loop iteration (one [rows, gpi, 16] load of weight words, rescale on [rows, gpi])."""
    x, qw = _case(m, k, n, share8)
    assert _rel(gemv.mixed_gemv_pallas(x, qw, config=cfg, interpret=INTERPRET), ref.mixed_matmul_ref(x, qw)) < RTOL


def test_gemv_groups_quantized_in_kernel_bf16_and_zero_groups():
    """In-kernel quantization of gpi groups at once: an all-zero group (scale 0) and bf16 x give the
    reference's codes; the codes equal the quantization kernel's (same result either way)."""
    x, qw = _case(2, 1024, 96, 0.1, jnp.bfloat16)
    x = x.at[1, 256:384].set(0)
    fused = gemv.mixed_gemv_pallas(x, qw, config=gemv.GemvConfig(32, 2, groups_per_iter=4), interpret=INTERPRET,
                                   out_dtype=jnp.float32)
    first = gemv.mixed_gemv_pallas(x, qw, config=gemv.GemvConfig(32, 2, quantize_first=True, groups_per_iter=4),
                                   interpret=INTERPRET, out_dtype=jnp.float32)
    assert _rel(fused, ref.mixed_matmul_ref(x, qw).astype(jnp.float32)) < 1e-2 / 2
    assert _rel(fused, first) < RTOL


def test_default_gemv_config_groups():
    """The default: 32-row tiles, 4 groups an iteration where they divide, most programs one iteration."""
    cfg = gemv.choose_gemv_config(32, 14592, m=2)
    assert (cfg.block_n, cfg.groups_per_iter, cfg.quantize_first) == (32, 4, True)  # M = 2: two launches
    assert not gemv.choose_gemv_config(32, 14592).quantize_first  # M = 1: one launch, quantizing in-kernel
    assert gemv.choose_gemv_config(32, 14592, quantize_first=True).quantize_first
    assert gemv.choose_gemv_config(32, 14592, xla_quant=True).quantize_first  # XLA codes: quantized first
    with pytest.raises(ValueError, match="quantize_first=True as well"):
        gemv.GemvConfig(32, 1, xla_quant=True).check(1, 32)
    assert 32 // cfg.split_k == 4 and 14592 // 32 * cfg.split_k <= 4096
    assert gemv.choose_gemv_config(5, 256).groups_per_iter == 1  # 5 groups: one at a time
    cfg.check(1, 32)
    with pytest.raises(ValueError, match="groups_per_iter=4"):
        gemv.GemvConfig(32, 4, quantize_first=True, groups_per_iter=4).check(1, 8)
    with pytest.raises(ValueError, match="groups_per_iter=3"):
        gemv.GemvConfig(32, 1, groups_per_iter=3).check(1, 6)


@pytest.mark.parametrize("m, k, n, share8, quad, cfg", [
    (1, 1024, 256, 0.1, 4, None),  # the decode default: 4 groups an iteration, prefetched, quantized in the programs
    (2, 1536, 200, 0.3, 4, None),  # codes first, 4 groups an iteration (3 iterations: a pair and an odd one)
    (1, 640, 130, 0.0, 4, gemv.GemvConfig(32, 1, groups_per_iter=1)),  # G = 5: one group a block row and iteration
    (2, 512, 96, 0.5, 4, gemv.GemvConfig(64, 2, groups_per_iter=2)),  # 64-row blocks, split-K, half a block row
    (1, 1024, 160, 0.2, 1, None),  # one group a block row, 4 an iteration: offsets computed in the kernel
    (2, 1536, 330, 0.1, 1, None),  # the same on codes (3 iterations), rows in both halves of a 64-row tile
    (1, 1024, 200, 0.3, 1, gemv.GemvConfig(64, 1, groups_per_iter=2, prefetch=True)),  # 64-row blocks, 4 iterations
    (2, 1024, 96, 0.5, 1, gemv.GemvConfig(32, 2, groups_per_iter=4)),  # 1 iteration a split, codes
])
def test_gemv_reads_tiled_codes(m, k, n, share8, quad, cfg):
    """Codes in blocks of 64 rows × Q groups (`format.tile_codes`): the GEMV reads a row's groups where they sit
    (group-major when Q = 1) and gives the row-major GEMV's output (bit for bit in interpret mode); a block that
    does not divide a tile, or groups an iteration that do not fit a block row, are refused by name."""
    from pallas_kernels.format import tile_codes

    x, qw = _case(m, k, n, share8)
    want = gemv.mixed_gemv_pallas(x, qw, config=cfg, interpret=INTERPRET)
    tw = tile_codes(qw, groups=quad)
    assert tw.tiled == (quad if k != 640 else 1)
    got = gemv.mixed_gemv_pallas(x, tw, config=cfg, interpret=INTERPRET)
    if INTERPRET:
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert _rel(got, want) < RTOL
    with pytest.raises(ValueError, match="block_n=128: tiled codes"):
        gemv.mixed_gemv_pallas(x, tw, config=gemv.GemvConfig(128, 1), interpret=INTERPRET)
    if k == 1024 and quad == 4:
        with pytest.raises(ValueError, match="groups_per_iter=8 with codes tiled 4"):
            gemv.mixed_gemv_pallas(x, tw, config=gemv.GemvConfig(32, 1, groups_per_iter=8), interpret=INTERPRET)


@pytest.mark.parametrize("m, k, n, share8, parts, chunk, cfg", [
    (1, 1024, 256, 0.1, 8, 2, None),  # the decode default, o_proj's partials pending
    (2, 1024, 200, 0.3, 0, 4, None),
    (1, 1536, 130, 1.0, 3, 1, gemv.GemvConfig(32, 1, groups_per_iter=4, prefetch=True)),  # 3 prefetched its
    (1, 640, 96, 0.0, 0, 2, gemv.GemvConfig(32, 1, groups_per_iter=1)),  # one group an iteration: codes first
])
def test_gemv_normalizes_its_own_groups(m, k, n, share8, parts, chunk, cfg):
    """`NormedActivations` (the two-launch norm without its second launch): every GEMV program normalizes
    and quantizes its groups with the norm kernel's arithmetic, so the product equals the GEMV on the norm
    kernel's codes (bit for bit in interpret mode) and the reference norm + product, on row-major and tiled
    codes alike; `api.mixed_matmul` gives the same on the GPU path (GEMV) and on XLA (codes through the
    reference)."""
    from pallas_kernels import norm
    from pallas_kernels.api import mixed_matmul
    from pallas_kernels.format import tile_codes

    rng = np.random.default_rng()
    x = jnp.asarray(rng.normal(size=(m, k)) * 3, jnp.bfloat16)
    delta = jnp.asarray(rng.normal(size=(parts, m, k)), jnp.float32) if parts else None
    w = jnp.asarray(rng.uniform(0.5, 1.5, size=k), jnp.bfloat16)
    qw = pk.pack_rtn(rng.normal(size=(n, k)).astype(np.float32) * 0.05, rng.random(n) < share8)
    s, normed = norm.rms_norm_defer_pallas(x, delta, w, 1e-5, chunk_groups=chunk, interpret=INTERPRET)
    s2, codes = norm.rms_norm_quant_pallas(x, delta, w, 1e-5, chunk_groups=chunk, interpret=INTERPRET)
    np.testing.assert_array_equal(np.asarray(s, np.float32), np.asarray(s2, np.float32))
    got = gemv.mixed_gemv_pallas(normed, qw, config=cfg, interpret=INTERPRET, out_dtype=jnp.float32)
    on_codes = gemv.mixed_gemv_pallas(codes, qw, config=cfg and dataclasses.replace(cfg, quantize_first=True),
                                      interpret=INTERPRET, out_dtype=jnp.float32)
    tiled = gemv.mixed_gemv_pallas(normed, tile_codes(qw), config=cfg, interpret=INTERPRET, out_dtype=jnp.float32)
    if INTERPRET:
        np.testing.assert_array_equal(np.asarray(got), np.asarray(on_codes))
        np.testing.assert_array_equal(np.asarray(tiled), np.asarray(got))  # codes in (tile, group) blocks
    assert _rel(got, on_codes) < RTOL and _rel(tiled, got) < RTOL
    _, ref_codes = norm.rms_norm_quant_ref(x, delta, w, 1e-5)
    want = ref.mixed_matmul_ref(ref_codes.dequantize(), qw).astype(jnp.float32)
    assert _rel(got, want) < 1e-2  # a code may move by one where the norm's f32 sum differs from XLA's
    api_gpu = mixed_matmul(normed, qw, interpret=True) if INTERPRET else mixed_matmul(normed, qw, implementation="pallas")
    assert api_gpu.dtype == jnp.bfloat16 and _rel(api_gpu, got) < 1e-2
    assert _rel(mixed_matmul(normed, qw, implementation="xla"), want) < 1e-2
    assert _rel(norm.normed_codes(normed, interpret=INTERPRET).dequantize(), codes.dequantize()) == 0


def test_normed_activations_reject_what_they_cannot_take():
    from pallas_kernels import norm

    x = jnp.ones((1, 200), jnp.float32)
    with pytest.raises(ValueError, match="multiple of 128"):
        norm.rms_norm_defer_pallas(x, None, jnp.ones(200), 1e-5, interpret=True)
    with pytest.raises(ValueError, match="power of two"):
        norm.rms_norm_defer_pallas(jnp.ones((1, 256)), None, jnp.ones(256), 1e-5, chunk_groups=3, interpret=True)
    _, normed = norm.rms_norm_defer_pallas(jnp.ones((1, 256)), None, jnp.ones(256), 1e-5, interpret=True)
    with pytest.raises(ValueError, match="in_features 384"):
        pk.mixed_matmul(normed, pk.pack_rtn(np.ones((64, 384), np.float32), np.zeros(64, bool)), interpret=True)
