"""`pallas_kernels.l2`: the L2 prefetch reads exactly the rows it is asked for (each program's word sum
equals the reference), for arrays of any dtype and awkward sizes; interpret mode off the GPU."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import l2

INTERPRET = jax.default_backend() != "gpu"


@pytest.mark.parametrize("shapes,programs,share", [
    ([((300, 70), jnp.int8)], 7, 1.0),  # 21 000 bytes: padded to whole rows, most programs idle
    ([((64, 1024), jnp.int8), ((5,), jnp.float32)], 3, 0.3),
    ([((96, 257), jnp.int32)], 5, 0.25),  # programs' parts end inside a tile
    ([((33, 1024), jnp.bfloat16)], 132, 1.0),
])
def test_prefetch_reads_the_rows_asked_for(shapes, programs, share):
    rng = np.random.default_rng()
    arrays = [jnp.asarray(np.frombuffer(rng.bytes(int(np.prod(s)) * jnp.dtype(d).itemsize), d).reshape(s))
              for s, d in shapes]  # random bytes (NaN patterns too: only the words are summed)
    got = l2.l2_prefetch_pallas(arrays, programs=programs, share=share, interpret=INTERPRET)
    want = l2.l2_prefetch_ref(arrays, programs=programs, share=share)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert np.count_nonzero(np.asarray(want)) > 0


def test_as_rows_keeps_the_bytes_in_order():
    a = jnp.arange(3 * 5, dtype=jnp.int16).reshape(3, 5)
    rows = np.asarray(l2.as_rows(a))
    assert rows.shape == (1, l2.ROW_WORDS)
    np.testing.assert_array_equal(rows.reshape(-1).view(np.int16)[:15], np.arange(15))
    assert not rows.reshape(-1).view(np.int16)[15:].any()
