"""`pallas_kernels.persistent`: the chain of GEMVs in one launch computes what the chain of one-launch GEMVs
and the XLA reference compute (interpret mode off the GPU: one program walks the virtual ones), for mixed,
all-8-bit and all-4-bit weights, padded first inputs and several tilings; bad chains are refused by name;
the CUDA lowering carries the barrier (one atomic a program, volatile polls)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import format as fmt
from pallas_kernels import gemv, persistent, triton_ir

INTERPRET = jax.default_backend() != "gpu"


def _weight(rng, n: int, k: int, share8: float) -> fmt.MixedWeight:
    w = rng.normal(size=(n, k)).astype(np.float32) / np.sqrt(k)
    return fmt.pack_rtn(w, rng.random(n) < share8)


def _launches(x, ws):  # the same arithmetic as separate one-launch GEMVs, f32 between them
    v = x[None]
    y = None
    for i, w in enumerate(ws):
        if i:
            v = jnp.tanh(y).astype(x.dtype)
        y = gemv.mixed_gemv_pallas(v, w, interpret=INTERPRET, out_dtype=jnp.float32)
    return y[0]


@pytest.mark.parametrize("shapes, share8, gpi, programs, prefetch", [
    ([(300, 512), (512, 640), (640, 256)], 0.1, 1, 60, True),  # padded first K; S = 3, 4, 5 per phase
    ([(1024, 256), (256, 1024)], 0.0, 2, 8, True),  # all 4-bit
    ([(512, 512), (512, 512)], 1.0, 2, 4, True),  # all 8-bit: nothing to prefetch
    ([(512, 768), (768, 512)], 0.3, 2, 6, False),
])
def test_chain_matches_launches_and_reference(shapes, share8, gpi, programs, prefetch):
    rng = np.random.default_rng()
    ws = tuple(_weight(rng, n, k, share8) for k, n in shapes)
    x = jnp.asarray(rng.normal(size=(shapes[0][0],)), jnp.bfloat16)
    cfg = persistent.ChainConfig(programs=programs, groups_per_iter=gpi, prefetch=prefetch)
    y, spins = persistent.chain_gemv(x, ws, config=cfg, interpret=INTERPRET)
    assert y.shape == (shapes[-1][1],) and spins.shape == (programs, len(ws))
    assert int(jnp.max(spins)) < cfg.spin_limit
    scale = float(jnp.max(jnp.abs(persistent.chain_ref(x, ws))))
    np.testing.assert_allclose(np.asarray(y), np.asarray(_launches(x, ws)), atol=2e-5 * scale)
    # the reference rounds nothing differently either: codes are the same, sums in another order
    np.testing.assert_allclose(np.asarray(y), np.asarray(persistent.chain_ref(x, ws)), atol=1e-4 * scale)


def test_bad_chains_are_refused():
    rng = np.random.default_rng(0)
    a, b = _weight(rng, 256, 512, 0.1), _weight(rng, 384, 256, 0.1)
    x = jnp.zeros((512,), jnp.bfloat16)
    with pytest.raises(ValueError, match="chained K must match"):
        persistent.chain_gemv(x, (a, a), config=persistent.ChainConfig(programs=4, groups_per_iter=1),
                              interpret=True)
    with pytest.raises(ValueError, match="multiple of weight 0's 4 K splits"):
        persistent.chain_gemv(x, (a, b), config=persistent.ChainConfig(programs=3, groups_per_iter=1),
                              interpret=True)
    with pytest.raises(ValueError, match="groups_per_iter=4 must divide"):
        persistent.chain_gemv(x, (a, b), config=persistent.ChainConfig(programs=4, groups_per_iter=4),
                              interpret=True)
    with pytest.raises(ValueError, match="x has 300 features"):
        persistent.chain_gemv(jnp.zeros((300,), jnp.bfloat16), (a, b),
                              config=persistent.ChainConfig(programs=4, groups_per_iter=1), interpret=True)
    with pytest.raises(ValueError, match="act='relu'"):
        persistent.chain_gemv(x, (a, b), config=persistent.ChainConfig(programs=4, groups_per_iter=1),
                              act="relu", interpret=True)


def test_cuda_lowering_has_the_barrier():
    rng = np.random.default_rng(0)
    ws = (_weight(rng, 1024, 512, 0.1), _weight(rng, 512, 1024, 0.1), _weight(rng, 512, 512, 0.1))
    x = jnp.zeros((512,), jnp.bfloat16)
    (ttir,) = triton_ir.capture_ttir(
        lambda x, ws: persistent.chain_gemv(x, ws, config=persistent.ChainConfig(programs=264)), x, ws)
    # two barriers (three phases), written once in the 8-bit and once in the 4-bit programs' branch: an
    # arrival (add) and the last arrival's flag (exchange) each
    assert ttir.count("tt.atomic_rmw") == 2 * 2 * 2
    assert ttir.count("bar.sync 0;") == 2 * 2 and ttir.count("fence.acq_rel.gpu;") == 2 * 2
    assert ttir.count("isVolatile = true") >= 2 * 2 * (1 + 2)  # the polls; the two halves of the partials read
