"""The int4 → int8 unpack before the prefill GEMM (pallas_kernels/unpack.py): the kernel against its XLA
reference, bit for bit, on fresh random weights of awkward shapes and 8-bit shares; Pallas interpret mode on
CPU, the kernel on a GPU. The reference against the dequantized weight is tests/test_mgpu.py's."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk
from pallas_kernels import unpack
from pallas_kernels.triton_ir import capture_ttir

INTERPRET = jax.default_backend() != "gpu"


def _weight(rng, n, k, share8):
    w = rng.normal(size=(n, k)).astype(np.float32) * rng.uniform(0.01, 0.1)
    is_int8 = np.zeros(n, bool)
    is_int8[rng.permutation(n)[: int(round(share8 * n))]] = True
    return pk.pack_rtn(jnp.asarray(w), jnp.asarray(is_int8))


@pytest.mark.parametrize("n, k, share8, rows, block_rows, block_groups", [
    (300, 576, 0.1, 384, 32, 4),  # K padded to 640: five groups, so one group a program
    (256, 256, 0.0, None, 32, 4),  # no 8-bit rows
    (130, 384, 1.0, 256, 64, 2),  # every row 8-bit (a dummy 4-bit operand), padding rows
    (1000, 1024, 0.1, 1024, 16, 8),
    (96, 128, 0.5, 96, 32, 1),  # one group, rows = N
])
def test_kernel_matches_reference_bit_for_bit(n, k, share8, rows, block_rows, block_groups):
    qw = _weight(np.random.default_rng(), n, k, share8)
    w_ref, s_ref = unpack.int8_weight_ref(qw, rows=rows)
    w, s = unpack.int8_weight_pallas(qw, rows=rows, block_rows=block_rows, block_groups=block_groups,
                                     interpret=INTERPRET)
    assert w.dtype == jnp.int8 and w.shape == w_ref.shape and s.dtype == jnp.float32 and s.shape == s_ref.shape
    assert np.array_equal(w, w_ref) and np.array_equal(s, s_ref)
    if share8 < 1:  # the 4-bit rows did go through the nibble arithmetic: values u − z ∈ [-15, 15], not all zero
        four = np.asarray(qw.row_of_channel) >= qw.q8.shape[0]
        assert np.abs(np.asarray(w[:n])[four]).max() <= 15 and np.any(np.asarray(w[:n])[four])


@pytest.mark.parametrize("n, k, share8, rows, block_rows", [(300, 576, 0.1, 384, 32), (200, 1024, 0.0, 256, 16),
                                                           (130, 1024, 0.3, 256, 32)])
def test_kernel_reads_tiled_codes(n, k, share8, rows, block_rows):
    """Codes in (64-row tile, group) order (`format.tile_codes`, the runtime order on the GPU) unpack to the same
    matrix as the stored row-major ones, bit for bit, through the kernel and the reference."""
    from pallas_kernels.format import tile_codes

    qw = _weight(np.random.default_rng(), n, k, share8)
    want = unpack.int8_weight_ref(qw, rows=rows)
    tw = tile_codes(qw)
    assert tw.tiled
    got = unpack.int8_weight_pallas(tw, rows=rows, block_rows=block_rows, interpret=INTERPRET)
    assert all(np.array_equal(a, b) for a, b in zip(got, want))
    assert all(np.array_equal(a, b) for a, b in zip(unpack.int8_weight_ref(tw, rows=rows), want))


def test_dispatch_picks_a_block_that_divides_the_rows():
    qw = _weight(np.random.default_rng(), 40, 256, 0.1)
    for rows in (40, 48):  # 8 and 16 rows a program
        got = unpack.int8_weight(qw, rows=rows, implementation="pallas", interpret=INTERPRET)
        assert all(np.array_equal(a, b) for a, b in zip(got, unpack.int8_weight(qw, rows=rows)))


def test_kernel_lowers_for_cuda():
    """One Triton kernel; its weight loads are gathers of whole rows (no per-element row arithmetic beyond
    the row's base), streamed past the caches."""
    qw = _weight(np.random.default_rng(), 300, 512, 0.1)
    (ttir,) = capture_ttir(lambda q: unpack.int8_weight_pallas(q, rows=384), qw)
    assert ttir.count("tt.store") == 3 and ttir.count("evict_first") == 3  # q4, two halves of q8


def test_bad_input_named():
    qw = _weight(np.random.default_rng(), 100, 256, 0.1)
    with pytest.raises(ValueError, match="rows=64 < N=100"):
        unpack.int8_weight_pallas(qw, rows=64)
    with pytest.raises(ValueError, match="multiple of block_rows=16"):
        unpack.int8_weight_pallas(qw, rows=100)
    with pytest.raises(ValueError, match="power of two"):
        unpack.int8_weight_pallas(qw, rows=128, block_rows=24)
    with pytest.raises(TypeError, match="MixedWeight"):
        unpack.int8_weight(jnp.zeros((4, 4)))
    with pytest.raises(ValueError, match="implementation"):
        unpack.int8_weight(qw, implementation="cuda")
