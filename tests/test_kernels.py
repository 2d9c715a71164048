"""pallas_kernels: packing format, references, and the Pallas kernels in interpret mode (CPU).

Tolerances: kernel vs reference compare f32 outputs whose integer partials are exact, so only the order
of f32 accumulation differs (rel 1e-5); reference vs float matmul is bounded by the quantization error
budget (int8 activations g128: rel < 2e-2 against the dequantized weight; 4-bit RTN weights: < 0.15
against the float weight).
"""

import dataclasses
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk
from mixjax.linear import QuantizedLinear, linear
from pallas_kernels import format as fmt
from pallas_kernels import reference as ref


def _rng():
    return np.random.default_rng()


def _weight(rng, n, k, share8):
    w = rng.normal(size=(n, k)).astype(np.float32) * 0.05
    is_int8 = np.zeros(n, bool)
    is_int8[rng.permutation(n)[: int(round(share8 * n))]] = True
    return w, is_int8


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


# ----------------------------------------------------------------------------------------------- format


def test_nibble_roundtrip():
    u = _rng().integers(0, 16, size=(8, 384))
    packed = fmt.pack_nibbles(u)
    assert packed.dtype == np.int8 and packed.shape == (8, 192)
    np.testing.assert_array_equal(np.asarray(fmt.unpack_nibbles(jnp.asarray(packed))), u)


def test_nibble_unpack_trick_gives_16x_signed_codes():
    u = _rng().integers(0, 16, size=(4, 128))
    b = jnp.asarray(fmt.pack_nibbles(u))  # [4, 64]
    lo = np.asarray(jnp.left_shift(b, 4)).astype(np.int32)
    hi = np.asarray(b & jnp.int8(-16)).astype(np.int32)
    np.testing.assert_array_equal(lo, 16 * (u[:, :64] - 8))
    np.testing.assert_array_equal(hi, 16 * (u[:, 64:] - 8))


@pytest.mark.parametrize("share8", [0.0, 0.1, 1.0])
@pytest.mark.parametrize("k", [128, 576])
def test_pack_dequantize_matches_codes(share8, k):
    rng = _rng()
    w, is_int8 = _weight(rng, 96, k, share8)
    q, scale, zero = pk.quantize_rtn(w, is_int8)
    qw = pk.pack_mixed(q, scale, zero, is_int8, k=k)
    assert qw.shape == (96, k) and isinstance(qw, QuantizedLinear)
    assert qw.q8.shape[0] % fmt.ROW_ALIGN == 0 and qw.q4.shape[0] % fmt.ROW_ALIGN == 0
    g = q.shape[1] // 128
    expect = ((q.reshape(96, g, 128) - np.where(is_int8[:, None], 0, zero)[..., None]) * scale[..., None])
    np.testing.assert_allclose(np.asarray(qw.dequantize()), expect.reshape(96, -1)[:, :k], rtol=1e-6, atol=1e-7)
    err = np.abs(np.asarray(qw.dequantize()) - w)
    step = np.abs(w).max(1) / np.where(is_int8, 127, 7.5)  # ≥ half a quantization step
    assert np.all(err.max(1) <= step * 1.01)


def test_pack_is_a_pytree_and_jits():
    rng = _rng()
    w, is_int8 = _weight(rng, 40, 256, 0.1)
    qw = pk.pack_rtn(w, is_int8)
    leaves, tree = jax.tree_util.tree_flatten(qw)
    assert len(leaves) == 7
    x = jnp.asarray(rng.normal(size=(3, 256)), jnp.float32)
    y = jax.jit(lambda x, qw: qw.matmul(x, implementation="xla"))(x, qw)
    assert y.shape == (3, 40)


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda a: {**a, "q": a["q"][:, :100]}, "multiple of 128"),
        (lambda a: {**a, "k": 100}, "k=100"),
        (lambda a: {**a, "scale": a["scale"][:, :1]}, "scale and zero"),
        (lambda a: {**a, "is_int8": a["is_int8"].astype(np.int32)}, "is_int8 must be bool"),
        (lambda a: {**a, "q": np.where(a["is_int8"][:, None], 200, a["q"])}, "8-bit codes"),
        (lambda a: {**a, "q": np.where(a["is_int8"][:, None], a["q"], 16)}, "4-bit codes"),
        (lambda a: {**a, "group_size": 64}, "group_size=64"),
    ],
)
def test_pack_rejects_bad_input(change, match):
    rng = _rng()
    w, is_int8 = _weight(rng, 16, 256, 0.25)
    q, scale, zero = pk.quantize_rtn(w, is_int8)
    args = change(dict(q=q, scale=scale, zero=zero, is_int8=is_int8, k=256, group_size=128))
    with pytest.raises(ValueError, match=match):
        pk.pack_mixed(args.pop("q"), args.pop("scale"), args.pop("zero"), args.pop("is_int8"), **args)


# ------------------------------------------------------------------------------------------- references


def _int_reference(x, w, is_int8):
    """Independent int64 numpy computation of the spec (per-group integer partial, then float scales)."""
    x_q, a_scale = (np.asarray(a) for a in pk.quantize_activations_ref(x))
    q, scale, zero = pk.quantize_rtn(w, is_int8)
    n, g = w.shape[0], a_scale.shape[1]
    wq = (q - np.where(is_int8[:, None], 0, np.repeat(zero, 128, axis=1))).astype(np.int64)  # [N, Kp]
    part = np.einsum("mgk,ngk->mgn", x_q.astype(np.int64).reshape(-1, g, 128), wq.reshape(n, g, 128))
    return np.einsum("mgn,mg,ng->mn", part.astype(np.float64), a_scale, scale)  # [M, N]


@pytest.mark.parametrize("share8", [0.0, 0.1, 1.0])
@pytest.mark.parametrize("m, k, n", [(3, 576, 96), (17, 128, 96)])
def test_reference_is_the_integer_spec(m, k, n, share8):
    rng = _rng()
    w, is_int8 = _weight(rng, n, k, share8)
    qw = pk.pack_rtn(w, is_int8)
    x = jnp.asarray(rng.normal(size=(m, k)), jnp.float32)
    y = pk.mixed_matmul(x, qw, implementation="xla")
    assert _rel(y, _int_reference(x, w, is_int8)) < 1e-6


def test_activation_quantization_error_and_zero_rows():
    rng = _rng()
    x = rng.normal(size=(5, 300)).astype(np.float32)
    x[2] = 0.0
    x_q, a_scale = (np.asarray(a) for a in pk.quantize_activations_ref(jnp.asarray(x)))
    assert x_q.shape == (5, 384) and a_scale.shape == (5, 3)
    assert np.all(x_q[2] == 0) and np.all(x_q[:, 300:] == 0)
    deq = (x_q.reshape(5, 3, 128) * a_scale[..., None]).reshape(5, 384)[:, :300]
    assert np.all(np.abs(deq - x) <= np.repeat(a_scale, 128, 1)[:, :300] * 0.5 + 1e-7)


@pytest.mark.parametrize("share8", [0.0, 0.1, 1.0])
@pytest.mark.parametrize("m, k, n", [(1, 4096, 4096), (16, 4096, 96), (300, 576, 4096)])
def test_reference_within_quantization_budget(m, k, n, share8):
    rng = _rng()
    w, is_int8 = _weight(rng, n, k, share8)
    qw = pk.pack_rtn(w, is_int8)
    x = jnp.asarray(rng.normal(size=(m, k)), jnp.bfloat16)
    y = pk.mixed_matmul(x, qw, implementation="xla")
    assert y.dtype == jnp.bfloat16 and y.shape == (m, n)
    xf = np.asarray(x, np.float32)
    assert _rel(y, xf @ np.asarray(qw.dequantize()).T) < 2e-2  # activation quantization only
    assert _rel(y, xf @ w.T) < (0.15 if share8 < 1 else 2e-2)  # plus weight quantization


def test_linear_dispatch_flattens_batch_dims():
    rng = _rng()
    w, is_int8 = _weight(rng, 64, 256, 0.1)
    qw = pk.pack_rtn(w, is_int8)
    x = jnp.asarray(rng.normal(size=(2, 3, 256)), jnp.float32)
    y = linear(x, qw, implementation="xla")
    assert y.shape == (2, 3, 64)
    np.testing.assert_allclose(np.asarray(y[1]), np.asarray(pk.mixed_matmul(x[1], qw, implementation="xla")), rtol=1e-6)


def test_mixed_matmul_rejects_wrong_k():
    rng = _rng()
    qw = pk.pack_rtn(rng.normal(size=(8, 256)).astype(np.float32), np.zeros(8, bool))
    with pytest.raises(ValueError, match=r"x must be \[M, 256\]"):
        pk.mixed_matmul(jnp.zeros((2, 128)), qw, implementation="xla")


# ------------------------------------------------------------------------- Pallas kernels, interpret mode

from pallas_kernels import kernels  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
import ptx_stats  # noqa: E402  (the Triton-IR capture; compiling to PTX needs `triton`, not used here)

INTERPRET = jax.default_backend() != "gpu"  # CPU: interpret mode; on a GPU the same tests run the kernels
KERNEL_RTOL = 1e-5 if INTERPRET else 1e-4  # Triton's f32 division may flip a rare activation code

# (M, K, N, 8-bit share): every M of the grid, both small K (576 is padded to 640), N = 96,
# 0% / 10% / 100% 8-bit; decode (M ≤ 16, fused quantization, split-K atomics) and the quantize-first path.
KERNEL_CASES = [
    (1, 576, 96, 0.1),
    (3, 128, 96, 0.0),
    (16, 576, 96, 1.0),
    (17, 128, 96, 0.1),
    (128, 576, 96, 0.0),
    (300, 128, 96, 1.0),
    (300, 576, 96, 0.1),
]


def _case(m, k, n, share8, dtype=jnp.bfloat16):
    rng = _rng()
    w, is_int8 = _weight(rng, n, k, share8)
    return jnp.asarray(rng.normal(size=(m, k)), dtype), pk.pack_rtn(w, is_int8)


@pytest.mark.parametrize("m, k, n, share8", KERNEL_CASES)
def test_mixed_kernel_matches_reference(m, k, n, share8):
    x, qw = _case(m, k, n, share8, jnp.float32)
    y = pk.mixed_matmul(x, qw, implementation="pallas", interpret=INTERPRET)
    assert y.shape == (m, n) and y.dtype == jnp.float32
    assert _rel(y, ref.mixed_matmul_ref(x, qw)) < KERNEL_RTOL


@pytest.mark.parametrize(
    "cfg",
    [
        kernels.GemmConfig(16, 32, 5, 4, 2, fuse_quant=False),  # quantize-first with split-K atomics
        kernels.GemmConfig(32, 128, 1, 4, 2, fuse_quant=True),  # fused quantization, direct store
        kernels.GemmConfig(16, 64, 1, 4, 2, fuse_quant=True, groups_per_iter=5),  # 5 groups' MMAs in flight
        kernels.GemmConfig(32, 64, 5, 4, 3, fuse_quant=False, split_partials=True, word_unpack=False),  # 8-bit shift
        kernels.GemmConfig(16, 32, 1, 4, 3, fuse_quant=False, prefetch_meta=3),  # 2 ahead: two pairs + the odd 5th
        kernels.GemmConfig(32, 64, 5, 4, 2, fuse_quant=True, prefetch_meta=3, split_partials=True),  # no pair, one step
        kernels.GemmConfig(16, 32, 1, 4, 2, fuse_quant=True, groups_per_iter=5, prefetch_meta=3),  # one odd step
        kernels.GemmConfig(32, 64, 5, 4, 3, fuse_quant=False, split_partials=True, xla_quant=True),  # XLA codes
    ],
)
def test_mixed_kernel_other_configs(cfg):
    x, qw = _case(20, 576, 96, 0.1, jnp.float32)
    y = kernels.mixed_matmul_pallas(x, qw, config=cfg, interpret=INTERPRET)
    assert _rel(y, ref.mixed_matmul_ref(x, qw)) < KERNEL_RTOL


@pytest.mark.parametrize("split, stages", [(1, 3), (2, 2), (4, 4)])
def test_small_operands_two_iterations_ahead(split, stages):
    """`prefetch_meta=3` on 8 groups: 4, 2 or 1 loop bodies of two iterations, the small operands carried two
    iterations ahead; the default loop's numbers up to f32 rounding (only the loads move, but the compiler may
    contract the rescale's multiply-add differently in the longer body)."""
    x, qw = _case(19, 1024, 160, 0.2, jnp.float32)
    base = kernels.GemmConfig(32, 32, split, 4, stages, fuse_quant=False, split_partials=split > 1)
    want = kernels.mixed_matmul_pallas(x, qw, config=base, interpret=INTERPRET)
    got = kernels.mixed_matmul_pallas(x, qw, config=dataclasses.replace(base, prefetch_meta=3), interpret=INTERPRET)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6 * float(jnp.abs(want).max()))
    assert _rel(got, ref.mixed_matmul_ref(x, qw)) < KERNEL_RTOL



@pytest.mark.parametrize("share8, quad", [(0.0, 4), (0.15, 4), (0.15, 1), (0.3, 2), (1.0, 4)])
def test_tiled_codes_change_only_the_addresses(share8, quad):
    """`format.tile_codes` ((64-row tile, group) blocks, `MixedWeight.tiled`): `untiled` inverts it; dequantize and
    take_rows read it; the decode tiles give the row-major kernel's output bit for bit (split-K partials, the small
    operands two iterations ahead with an odd last group, 128-row tiles over two blocks, 32- and 16-row tiles inside
    one, float mode, an empty channel set); the XLA reference too. An all-8-bit weight stays row-major."""
    x, qw = _case(23, 1280, 200, share8, jnp.float32)  # 10 groups: a block row holds 2 at most
    tw = fmt.tile_codes(qw, groups=quad)
    if share8 == 1.0:  # the Hopper prefill GEMM reads an all-8-bit q8 as stored
        assert tw is qw and not tw.tiled
        return
    assert tw.tiled == min(quad, 2) and tw.q4.shape == qw.q4.shape and tw.q8.shape == qw.q8.shape
    assert not bool(jnp.array_equal(tw.q4, qw.q4))
    back = tw.untiled()
    assert not back.tiled and all(bool(jnp.array_equal(a, b)) for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(qw)))
    np.testing.assert_array_equal(np.asarray(tw.dequantize()), np.asarray(qw.dequantize()))
    ids = jnp.asarray(_rng().integers(0, 200, (4, 3)))
    np.testing.assert_array_equal(np.asarray(fmt.take_rows(tw, ids)), np.asarray(fmt.take_rows(qw, ids)))
    np.testing.assert_array_equal(np.asarray(ref.mixed_matmul_ref(x, tw)), np.asarray(ref.mixed_matmul_ref(x, qw)))
    for base in (kernels.GemmConfig(32, 64, 5, 4, 3, fuse_quant=False, split_partials=True),  # 2 groups a split
                 kernels.GemmConfig(32, 64, 1, 4, 3, fuse_quant=False, prefetch_meta=3),
                 kernels.GemmConfig(16, 64, 1, 4, 2, fuse_quant=True),
                 kernels.GemmConfig(32, 128, 2, 8, 3, fuse_quant=False, split_partials=True),  # two blocks a tile
                 kernels.GemmConfig(16, 128, 1, 4, 3, fuse_quant=False, prefetch_meta=3),
                 kernels.GemmConfig(32, 32, 2, 4, 3, fuse_quant=False, split_partials=True),  # half a block a tile
                 kernels.GemmConfig(16, 16, 1, 2, 2, fuse_quant=False)):
        want = kernels.mixed_matmul_pallas(x, qw, config=base, interpret=INTERPRET)
        got = kernels.mixed_matmul_pallas(x, tw, config=base, interpret=INTERPRET)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    want = kernels.dequant_matmul_pallas(x, qw, interpret=INTERPRET)
    np.testing.assert_array_equal(np.asarray(kernels.dequant_matmul_pallas(x, tw, interpret=INTERPRET)), np.asarray(want))


def test_tiled_codes_of_stacked_layers_and_checkpoint_order():
    """Stacked weights (a leading layer axis) tile per layer; the stored form is row-major whatever the runtime
    order (`mixjax.quant.checkpoint._to_stored`)."""
    from mixjax.quant.checkpoint import _to_stored

    _, a = _case(1, 256, 130, 0.2)
    _, b = _case(1, 256, 130, 0.2)
    b = dataclasses.replace(b, channel=a.channel, row_of_channel=a.row_of_channel, n8=a.n8)  # same shapes
    b = dataclasses.replace(b, q8=b.q8[: a.q8.shape[0]], scale8=b.scale8[:, : a.q8.shape[0]], q4=b.q4[: a.q4.shape[0]],
                            scale4=b.scale4[:, : a.q4.shape[0]], zero4=b.zero4[:, : a.q4.shape[0]])
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), a, b)
    tiled = fmt.tile_codes(stacked)
    for i, w in enumerate((a, b)):
        np.testing.assert_array_equal(np.asarray(tiled.q4[i]), np.asarray(fmt.tile_codes(w).q4))
    stored = _to_stored({"w": tiled})["w"]
    np.testing.assert_array_equal(np.asarray(stored.q4), np.asarray(stacked.q4))


@pytest.mark.parametrize("word_unpack", [True, False])
def test_4bit_unpack_on_words_in_the_cuda_lowering(word_unpack):
    """The kernel lowered for CUDA (no GPU needed; Triton IR captured by `benchmarks/ptx_stats.py`) unpacks
    the 4-bit tile with one inline-PTX op per 32-bit word (`_shift_nibbles`, packed 4 int8 a register)
    unless `word_unpack=False`. Interpret mode cannot run inline PTX, so the GPU run of this file checks its
    numbers; this checks it is in the kernel at all."""
    x, qw = _case(8, 256, 128, 0.0)
    cfg = dataclasses.replace(kernels.choose_config(8, qw.num_groups, qw.q4.shape[0]), word_unpack=word_unpack)
    modules = ptx_stats.capture_ttir(lambda x, w: kernels.mixed_matmul_pallas(x, w, config=cfg), x, qw)
    gemm = [m for m in modules if "mixed_gemm_int" in m]
    assert len(gemm) == 1
    assert ("shl.b32 t, $1, 4" in gemm[0] and "packed_element = 4" in gemm[0]) == word_unpack


def test_sass_loops_are_read_from_backward_branches():
    """`ptx_stats.sass_loops` on cuobjdump's layout: a loop is a backward branch's target up to the branch,
    predicated instructions count by their opcode, a forward branch is not a loop."""
    sass = "\n".join([
        "        /*0100*/                   MOV R1, c[0x0][0x28] ;         /* 0x00000a0000017a02 */",
        "        /*0110*/              @!P0 BRA 0x0150 ;                    /* 0x0000000000088947 */",
        "        /*0120*/                   IMMA.16832.S8.S8 R4, R8, R12, R4 ; /* 0x000000000c04723c */",
        "        /*0130*/               @P1 FFMA R2, R3, R4, R2 ;           /* 0x0000000403021223 */",
        "        /*0140*/               @P0 BRA 0x120 ;                     /* 0xfffffff000c40947 */",
        "        /*0150*/                   EXIT ;                          /* 0x000000000000794d */",
    ])
    (start, end, ops), = ptx_stats.sass_loops(sass)
    assert (start, end) == (0x120, 0x140) and ops == {"IMMA": 1, "FFMA": 1, "BRA": 1}


def test_ncu_summary_reads_the_source_page(tmp_path, capsys):
    """`ncu_summary.sass` on ncu's source-page CSV: the header comes after a "Kernel Name" line; samples are totalled
    by reason (the "(Not Issued)" copies left out) and the instructions ranked by their samples."""
    import ncu_summary

    cols = ["Address", "Source", "Warp Stall Sampling (All Samples)", "Instructions Executed", "stall_long_sb",
            "stall_wait", "stall_long_sb (Not Issued)"]
    rows = [["0x10", "LDG.E R2, [R4]", "3", "1,024", "1", "2", "9"],
            ["0x20", "BAR.SYNC 0x0", "6", "4,096", "6", "0", "9"],
            ["0x30", "FADD R1, R2, R3", "1", "4,096", "0", "1", "9"]]
    path = tmp_path / "sass.csv"
    path.write_text('"Kernel Name","k",\n' + "\n".join(",".join(f'"{v}"' for v in r) for r in [cols, *rows]) + "\n")
    ncu_summary.sass(str(path), top=2)
    out = capsys.readouterr().out
    assert "10 stall samples over 3 instructions" in out
    assert "70.0 %  stall_long_sb" in out and "30.0 %  stall_wait" in out and "Not Issued" not in out
    ranked = [line for line in out.splitlines() if line.strip().endswith(")") and "0x" in line]
    assert len(ranked) == 2 and "BAR.SYNC" in ranked[0] and "×4,096" in ranked[0] and "long_sb 6" in ranked[0]
    assert "LDG.E" in ranked[1] and "wait 2, long_sb 1" in ranked[1]


@pytest.mark.parametrize("decode", kernels.DECODE_STRATEGIES)
@pytest.mark.parametrize("m", [1, 17])
def test_decode_strategies_match_reference(decode, m):
    x, qw = _case(m, 1000, 200, 0.1, jnp.float32)  # K padded to 8 groups: split-K 2
    cfg = kernels.choose_config(m, qw.num_groups, qw.q8.shape[0] + qw.q4.shape[0], decode=decode)
    assert cfg.fuse_quant == decode.startswith("fused") and (cfg.split_k == 1) == (decode == "fused_single")
    assert cfg.split_partials == decode.endswith("partials")
    y = kernels.mixed_matmul_pallas(x, qw, decode=decode, interpret=INTERPRET)
    assert y.shape == (m, 200) and y.dtype == jnp.float32
    assert _rel(y, ref.mixed_matmul_ref(x, qw)) < KERNEL_RTOL


@pytest.mark.parametrize("decode", ["quantize_partials", "quantize_first"])
def test_decode_tiles_beyond_32_rows(decode):
    """`decode_max_m` > 32: several 32-row decode tiles (the last one ragged) over the same split-K weight
    tiles, partials or atomics, equal the reference."""
    x, qw = _case(70, 1000, 200, 0.1, jnp.float32)
    cfg = kernels.choose_config(70, qw.num_groups, qw.q8.shape[0] + qw.q4.shape[0], decode=decode, decode_max_m=128)
    assert (cfg.block_m, cfg.block_n) == (32, 64) and cfg.split_k > 1
    y = kernels.mixed_matmul_pallas(x, qw, decode=decode, decode_max_m=128, interpret=INTERPRET)
    assert y.shape == (70, 200)
    assert _rel(y, ref.mixed_matmul_ref(x, qw)) < KERNEL_RTOL


def test_split_partials_epilogue_with_bf16_output():
    x, qw = _case(3, 640, 96, 0.3)  # 5 groups, split 5: every split stores its own partial
    cfg = kernels.GemmConfig(16, 32, 5, 4, 2, fuse_quant=True, split_partials=True)
    y = kernels.mixed_matmul_pallas(x, qw, config=cfg, interpret=INTERPRET)
    assert y.dtype == jnp.bfloat16
    assert _rel(y, ref.mixed_matmul_ref(x, qw)) < 1e-2 / 2


def test_mixed_kernel_bf16_output():
    x, qw = _case(5, 576, 96, 0.1)
    y = pk.mixed_matmul(x, qw, implementation="pallas", interpret=INTERPRET)
    assert y.dtype == jnp.bfloat16
    assert _rel(y, ref.mixed_matmul_ref(x, qw)) < 1e-2 / 2  # both rounded to bf16 once


@pytest.mark.parametrize("m, share8", [(2, 0.1), (130, 0.0)])
def test_float_dequant_kernel_matches_reference(m, share8):
    x, qw = _case(m, 576, 96, share8)
    y = kernels.dequant_matmul_pallas(x, qw, interpret=INTERPRET)
    assert y.dtype == jnp.bfloat16
    assert _rel(y, ref.dequant_matmul_ref(x, qw)) < 5e-3


def test_activation_quant_kernel_matches_reference():
    x = jnp.asarray(_rng().normal(size=(70, 576)), jnp.bfloat16)
    x = x.at[3].set(0)
    x_q, a_scale = pk.quantize_activations(x, implementation="pallas", interpret=INTERPRET)
    x_q_ref, a_scale_ref = pk.quantize_activations_ref(x)
    code_diff = np.abs(np.asarray(x_q, np.int32) - np.asarray(x_q_ref, np.int32))
    # interpret mode is bit-exact; Triton's approximate f32 division may move a rare code by one
    assert code_diff.max() <= (0 if INTERPRET else 1) and code_diff.mean() <= (0 if INTERPRET else 1e-3)
    np.testing.assert_allclose(np.asarray(a_scale), np.asarray(a_scale_ref), rtol=0 if INTERPRET else 1e-6)
    x_q_k, _, x_sum = kernels.quantize_activations_pallas(x, interpret=INTERPRET)
    expect = np.asarray(x_q_k, np.int32)[:70].reshape(70, 5, 128).sum(-1).T  # [G, M] of the kernel's codes
    np.testing.assert_array_equal(np.asarray(x_sum)[:, :70], expect)


@pytest.mark.parametrize("m, k, block_m", [(70, 576, 64), (1, 128, 16), (33, 300, 32)])
def test_xla_activation_quant_equals_the_kernel(m, k, block_m):
    """`quantize_activations_xla` (XLA ops, fusable into the producer of x) returns the quantization
    kernel's outputs: codes, scales and Σx_q, padded rows and columns zero; an all-zero row has scale 0."""
    x = jnp.asarray(_rng().normal(size=(m, k)) * 3, jnp.bfloat16)
    x = x.at[m // 2].set(0)
    got = kernels.quantize_activations_xla(x, block_m=block_m)
    _check_same_codes(got, kernels.quantize_activations_pallas(x, block_m=block_m, interpret=INTERPRET), m)


def _check_same_codes(got, want, m: int) -> None:
    """Two (x_q, a_scale, x_sum) of the same rows: equal to a rare one-step code move and its scale's ulp on a GPU,
    sums the codes' own, padding rows zero, and row m // 2 (set to zero) with scale 0."""
    for a, b in zip(got, want):
        assert a.shape == b.shape and a.dtype == b.dtype
    diff = np.abs(np.asarray(got[0], np.int32) - np.asarray(want[0], np.int32))
    assert diff.max() <= (0 if INTERPRET else 1)  # Triton's approximate division may move a rare code by one
    np.testing.assert_allclose(np.asarray(got[1]), np.asarray(want[1]), rtol=0 if INTERPRET else 1e-6)
    np.testing.assert_array_equal(np.asarray(got[2]), np.asarray(got[0], np.int32).reshape(
        got[0].shape[0], -1, 128).sum(-1).T)
    assert not np.asarray(got[0])[m:].any() and not np.asarray(got[1])[:, m:].any()
    assert not np.asarray(got[1])[:, m // 2].any()


@pytest.mark.parametrize("m, k, block_m, dtype", [(70, 576, 64, jnp.bfloat16), (1, 128, 16, jnp.float32),
                                                  (130, 1000, 128, jnp.bfloat16)])
def test_row_quant_kernel_equals_xla(m, k, block_m, dtype):
    """`quantize_rows_pallas` (one scale a row, the per-token prefill GEMM's o_proj input) returns
    `quantize_activations_xla(row_scale=True)`: each row's one scale in all its G places, codes from the row's
    maximum, padded rows and columns zero; an all-zero row has scale 0."""
    rng = _rng()
    x = jnp.asarray(rng.normal(size=(m, k)) * rng.uniform(0.1, 30, size=(m, 1)), dtype)
    x = x.at[m // 2].set(0)
    got = kernels.quantize_rows_pallas(x, block_m=block_m, interpret=INTERPRET)
    _check_same_codes(got, kernels.quantize_activations_xla(x, block_m=block_m, row_scale=True), m)
    assert np.all(np.ptp(np.asarray(got[1]), axis=0) == 0) and not np.asarray(got[0])[:, k:].any()  # one scale a row


@pytest.mark.parametrize("block_rows", [8, 32])
def test_activation_quant_rows_a_program_change_nothing(block_rows):
    """Fewer rows a program (the prefill GEMM's `mgpu.QUANT_ROWS`): the same outputs in the same layout, the
    block_m padding rows zero; rows that do not divide block_m are refused."""
    x = jnp.asarray(_rng().normal(size=(70, 300)) * 2, jnp.bfloat16)
    want = kernels.quantize_activations_pallas(x, block_m=64, interpret=INTERPRET)
    got = kernels.quantize_activations_pallas(x, block_m=64, block_rows=block_rows, interpret=INTERPRET)
    for a, b in zip(got, want):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="block_rows=24"):
        kernels.quantize_activations_pallas(x, block_m=64, block_rows=24, interpret=INTERPRET)


# ------------------------------------------------------------------------ prefill path: dequantize + dot

from pallas_kernels import dequant_dot  # noqa: E402


def test_dequantize_bf16_is_the_reference_dequantization_rounded():
    _, qw = _case(1, 576, 200, 0.3)
    w = np.asarray(dequant_dot.dequantize_bf16(qw), np.float32)[:, :576]
    np.testing.assert_allclose(w, np.asarray(qw.dequantize()), rtol=2**-8, atol=0)


@pytest.mark.parametrize("m, share8", [(40, 0.1), (9, 0.0), (9, 1.0)])
def test_dequant_dot_path_within_bf16_bound_of_reference(m, share8):
    x, qw = _case(m, 576, 96, share8)
    y = dequant_dot.dequant_dot_matmul(x, qw)
    assert y.shape == (m, 96) and y.dtype == jnp.bfloat16
    assert _rel(y, ref.mixed_matmul_ref(x, qw)) < 1e-2 / 2  # same bound as the bf16-output kernel


def test_gpu_path_selection():
    from pallas_kernels.api import GEMV_MAX_ROWS, MGPU_MIN_M, select_gpu_path

    m0 = dequant_dot.DEQUANT_DOT_MIN_M
    assert select_gpu_path(1, jnp.bfloat16) == "kernel"
    assert select_gpu_path(1, jnp.bfloat16, rows=4352) == "gemv"  # one row, a layer up to GEMV_MAX_ROWS
    assert select_gpu_path(1, jnp.float32, rows=16384) == "gemv"
    assert select_gpu_path(1, jnp.bfloat16, rows=28928) == "gemv"  # gate+up of an 8B layer too
    assert select_gpu_path(1, jnp.bfloat16, rows=128384) == "gemv"  # an 8B model's int4 LM head too
    assert select_gpu_path(1, jnp.bfloat16, rows=GEMV_MAX_ROWS + 128) == "kernel"  # wider: the MMA kernel
    assert select_gpu_path(2, jnp.bfloat16, rows=4352) == "gemv"  # M ≤ GEMV_MAX_M = 2
    assert select_gpu_path(3, jnp.bfloat16, rows=4352) == "kernel"
    assert select_gpu_path(m0 - 1, jnp.bfloat16) == "kernel"
    assert select_gpu_path(m0, jnp.bfloat16) == "dequant_dot"
    mg = MGPU_MIN_M
    assert select_gpu_path(mg, jnp.bfloat16, wgmma=True) == "mgpu"  # Hopper: the Mosaic GPU kernel
    assert select_gpu_path(mg - 1, jnp.bfloat16, wgmma=True) == "kernel"
    assert select_gpu_path(4 * m0, jnp.float32, wgmma=True) == "kernel"
    assert select_gpu_path(4 * m0, jnp.bfloat16, wgmma=True, dequant_dot_min_m=None) == "kernel"
    assert select_gpu_path(4 * m0, jnp.float32) == "kernel"  # exact path for f32 callers
    assert select_gpu_path(4 * m0, jnp.bfloat16, dequant_dot_min_m=None) == "kernel"
    short = (65, 512)  # the column-tiled swapped-operand kernel, opt-in (api.MGPU_SHORT_M), on a Hopper only
    assert [select_gpu_path(m, jnp.bfloat16, wgmma=True, short_m=short) for m in (64, 65, 512, 513)] == \
        ["kernel", "mgpu_short", "mgpu_short", "mgpu"]
    assert select_gpu_path(200, jnp.bfloat16, short_m=short) == "kernel"  # other GPUs: unchanged
    assert select_gpu_path(200, jnp.float32, wgmma=True, short_m=short) == "kernel"  # f32: the exact kernel


@pytest.mark.skipif(INTERPRET, reason="the GPU prefill dispatch (mgpu on a Hopper, dequant_dot elsewhere) needs a GPU")
def test_pallas_dispatch_prefill_within_bf16_bound():
    x, qw = _case(dequant_dot.DEQUANT_DOT_MIN_M, 576, 96, 0.1)
    y = pk.mixed_matmul(x, qw, implementation="pallas")
    assert _rel(y, ref.mixed_matmul_ref(x, qw)) < 1e-2 / 2


def test_choose_config_decode_and_prefill():
    decode = kernels.choose_config(1, 32, 14464)
    assert decode.block_m == 16 and decode.split_k > 1
    assert kernels.choose_config(16, 112, 4224).block_m == 16  # decode tiles up to M = 32
    assert kernels.choose_config(32, 112, 4224).block_m == 32  # one M tile: the weight is read once
    wide = kernels.choose_config(128, 112, 4224)  # up to DECODE_MAX_M = 128: four 32-row decode tiles
    assert kernels.DECODE_MAX_M == 128 and (wide.block_m, wide.split_partials) == (32, True)
    assert wide.split_k == kernels._wave_split(112, 4 * 4224 // 64, 32)  # the M tiles count toward the programs
    assert kernels.choose_config(129, 112, 4224).block_m == 64  # beyond: 64×64 tiles, no split
    assert kernels.choose_config(64, 112, 4224, decode_max_m=32).block_m == 64  # the session-6 dispatch
    with pytest.raises(ValueError, match="decode="):
        kernels.choose_config(1, 32, 4224, decode="fastest")
    prefill = kernels.choose_config(4096, 32, 14464)
    assert prefill.block_m % 64 == 0 and prefill.num_warps % 4 == 0 and prefill.split_k == 1


@pytest.mark.parametrize("m", [1, 8, 16, 32, 100])
@pytest.mark.parametrize("k, n", [(4096, 28672), (4096, 6144), (4096, 4096), (14336, 4096), (576, 96)])
def test_wave_split_fills_one_wave_at_most(m, k, n):
    """`split_rule="wave"`: the largest split-K (a divisor of the K groups, ≥ 4 groups a split) whose programs
    fit the resident decode tiles of one wave; one split where even that does not fit."""
    groups, rows = -(-k // 128), n + 256
    cfg = kernels.choose_config(m, groups, rows, split_rule="wave")
    per_sm = kernels._PF3_PROGRAMS_PER_SM if cfg.prefetch_meta == 3 else kernels._PROGRAMS_PER_SM[cfg.block_m]
    slots = kernels._SMS * per_sm
    tiles = -(-m // cfg.block_m) * (rows // cfg.block_n)
    assert groups % cfg.split_k == 0 and (cfg.split_k == 1 or groups // cfg.split_k >= 4)
    assert cfg.split_k == 1 or tiles * cfg.split_k <= slots
    larger = [d for d in range(cfg.split_k + 1, groups // 4 + 1) if groups % d == 0]
    assert all(tiles * d > slots for d in larger)


def test_wave_split_on_llama_layers(monkeypatch):
    """The splits session 33 measured fastest at M = 32 on the H100 (gate/up 1, q/k/v 4; down 8, or 4 with its
    small operands two iterations ahead, the default since session 35 for 17–32 rows and K ≥ 64 groups), the
    default rule since, and the rule's name checked."""
    assert kernels.DECODE_SPLIT_RULE == "wave"
    wave = lambda groups, rows, m=32: kernels.choose_config(m, groups, rows)  # noqa: E731
    assert [wave(g, r).split_k for g, r in ((32, 28672 + 256), (32, 6144 + 256), (112, 4096 + 256))] == [1, 4, 4]
    assert [wave(g, r, m).prefetch_meta for g, r, m in ((112, 4352, 32), (112, 4352, 17), (112, 4352, 16),
                                                        (112, 4352, 64), (32, 28928, 32), (63, 4352, 32))] == \
        [3, 3, 0, 0, 0, 0]
    monkeypatch.setattr(kernels, "PF3_MIN_GROUPS", None)
    assert (wave(112, 4352).split_k, wave(112, 4352).prefetch_meta) == (8, 0)
    assert kernels.choose_config(32, 32, 28672 + 256, split_rule="programs").split_k == 2  # ≈ 1024 programs
    with pytest.raises(ValueError, match="split_rule="):
        kernels.choose_config(32, 32, 4224, split_rule="waves")


@pytest.mark.parametrize(
    "cfg, match",
    [
        (kernels.GemmConfig(16, 96, 1, 4, 2, fuse_quant=True), "block_n=96"),
        (kernels.GemmConfig(16, 64, 3, 4, 2, fuse_quant=True), "split_k=3"),
        (kernels.GemmConfig(8, 64, 1, 4, 2, fuse_quant=True), "block_m=8"),
        (kernels.GemmConfig(16, 64, 1, 4, 2, fuse_quant=True, groups_per_iter=3), "groups_per_iter=3"),
        (kernels.GemmConfig(16, 64, 1, 4, 2, fuse_quant=True, prefetch_meta=2), "prefetch_meta=2.*removed"),
    ],
)
def test_kernel_rejects_configs_it_cannot_take(cfg, match):
    x, qw = _case(4, 256, 96, 0.1)
    with pytest.raises(ValueError, match=match):
        kernels.mixed_matmul_pallas(x, qw, config=cfg, interpret=INTERPRET)


@pytest.mark.skipif(not INTERPRET, reason="checks the CPU error")
def test_pallas_without_gpu_is_a_clear_error():
    x, qw = _case(2, 256, 96, 0.1)
    with pytest.raises(ValueError, match="implementation='xla'"):
        pk.mixed_matmul(x, qw, implementation="pallas")


def test_empty_batch():
    x, qw = _case(1, 256, 96, 0.1)
    assert pk.mixed_matmul(x[:0], qw, implementation="xla").shape == (0, 96)
