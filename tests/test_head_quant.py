"""Quantized token embedding table and LM head (`QuantConfig.head_bits`): `take_rows`, the model's embed /
final_logits on a `MixedWeight`, quantize(), checkpoints and the CLI flag."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixjax import model
from mixjax.config import LlamaConfig
from mixjax.quant import ActFormat, FakeQuantWeight, QuantConfig, WeightFormat, quantize
from pallas_kernels import MixedWeight, dequantize, pack_rtn, take_rows

# V = 200: not a multiple of the 128-row alignment (padding rows); D = 48: K padded to 128.
UNTIED = LlamaConfig(vocab_size=200, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=12, rope_theta=10000.0,
                     tie_word_embeddings=False)
TIED = dataclasses.replace(UNTIED, tie_word_embeddings=True)
FAST = dict(gptq=False, clip=False)  # RTN decoder linears: the head is what these tests look at


# --------------------------------------------------------------------------------------------------
# take_rows


@pytest.mark.parametrize("share8", [0.0, 0.1, 1.0])
def test_take_rows_equals_dequantize_rows(share8):
    n, k = 300, 576  # K padded to 640; 8-bit and 4-bit row counts not multiples of 128
    rng = np.random.default_rng(0)
    w = rng.normal(size=(n, k)).astype(np.float32)
    is_int8 = np.zeros(n, bool)
    is_int8[rng.permutation(n)[: int(round(share8 * n))]] = True
    qw = pack_rtn(w, is_int8)
    ids = jnp.asarray(rng.integers(0, n, size=(3, 7)), jnp.int32)  # [B, T]
    got = take_rows(qw, ids)
    assert got.shape == (3, 7, k) and got.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(got), np.asarray(dequantize(qw))[np.asarray(ids)])
    np.testing.assert_array_equal(np.asarray(qw.take_rows(ids[0])), np.asarray(got[0]))  # method, 1-D ids
    # Every row kind is exercised: the 8-bit rows, the 4-bit rows, and first/last channels.
    edge = jnp.asarray([0, n - 1, *np.flatnonzero(is_int8)[:2], *np.flatnonzero(~is_int8)[:2]], jnp.int32)
    np.testing.assert_array_equal(np.asarray(take_rows(qw, edge)), np.asarray(dequantize(qw))[np.asarray(edge)])


def test_take_rows_reads_only_the_requested_rows():
    n, k = 1024, 256
    qw = pack_rtn(np.random.default_rng(1).normal(size=(n, k)), np.arange(n) % 10 == 0)
    jaxpr = jax.make_jaxpr(take_rows)(qw, jnp.zeros((2, 3), jnp.int32))
    sizes = [int(np.prod(v.aval.shape)) for eqn in jaxpr.eqns for v in eqn.outvars]
    # No intermediate is anywhere near the dequantized table (n·Kp elements); dequantize() would make one.
    assert max(sizes) <= 6 * k * 2
    assert max(int(np.prod(v.aval.shape)) for e in jax.make_jaxpr(dequantize)(qw).eqns for v in e.outvars) >= n * k
