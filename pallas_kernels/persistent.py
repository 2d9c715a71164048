"""A chain of decode GEMVs in one persistent launch, phases separated by a grid barrier (probe, sm_90).

Why (benchmarks/NOTES-kernels.md items 53, 57, 58): at M = 1 every decode GEMV pays ≈ 4 µs beyond its
bytes: the launch, its thousands of programs starting, the first DRAM round trip, the last wave draining.
Weights in L2 removed ≤ 1.5 µs of it and programmatic dependent launch 0.4 µs a kernel. A persistent
kernel keeps its programs alive across dependent GEMVs: between two phases each program only waits at a
grid barrier, and it can issue the next phase's first weight loads (which depend on nothing) before it
waits. This module measures that on the simplest dependent chain, y_l = W_l · act(y_{l-1}) at one
activation row, with the one-launch GEMV's arithmetic (`gemv._grouped_kernel`): every program quantizes
its groups of the previous phase's output itself (int8 per group of 128, `reference.quantize_groups`),
dp4a on the packed words, the per-group rescale in f32.

Work of phase l: (tile of `block_n` packed rows, K split of `groups_per_iter` groups) items, handed out
round robin: program p takes items p, p + P, … With P a multiple of every phase's split count, a
program's split (and so its activation groups) is fixed within a phase, so it quantizes them once. Tiles
are walked 4-bit first, so every program's first item is a 4-bit tile when P / S ≤ the 4-bit tiles; with
`prefetch` its words, scales and zeros are loaded before the barrier. Each phase writes f32 split
partials [S, N]; the next phase sums them while it reads its groups.

The barrier: `bar.sync` (the CTA's stores of the phase are done), one `atom.add.acq_rel.gpu` a program on a
counter that only grows, then every thread polls the counter with volatile loads until it reaches
phase · P, then `fence.acq_rel.gpu`. Every address that reads another program's output derives from a
value passed through that fence (Pallas's inline asm is pure: `pdl._through`), and those loads bypass
L1 (volatile loads; jax 0.10.2 cannot lower `.cg`). Every program of the grid must be resident at once, or the barrier never opens: `programs`
must not exceed what the GPU holds, and the poll gives up after `spin_limit` reads (the `spins` output
says whether any barrier gave up, in which case the result is wrong, not hung).

In interpret mode (CPU) the programs run one after another, so a barrier could never open: the kernel
then runs as one program that loops over the P virtual program ids phase by phase (same items, same
arithmetic), and the barrier is left out.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import pdl
from pallas_kernels.format import GROUP_SIZE, ROW_ALIGN, MixedWeight
from pallas_kernels.gemv import _WORDS, _dp4a, _pack_codes, _words

ACTIVATIONS = {"tanh": jnp.tanh, "none": lambda v: v}


@dataclasses.dataclass(frozen=True)
class ChainConfig:
    programs: int = 528  # P: every one must be resident at once (132 SMs × 4 on an H100 / H200)
    block_n: int = 32  # packed rows per item
    groups_per_iter: int = 4  # K groups per item (a phase splits K into G / groups_per_iter)
    num_warps: int = 4
    prefetch: bool = True  # the first item's weights before the barrier
    barrier: bool = True  # False: no barrier (wrong results; the bound without synchronization)
    spin_limit: int = 1 << 22  # polls before a barrier gives up

    def check(self, weights) -> None:
        if ROW_ALIGN % self.block_n:
            raise ValueError(f"ChainConfig: block_n={self.block_n} must divide the row padding {ROW_ALIGN}")
        for i, w in enumerate(weights):
            g = w.num_groups
            if g % self.groups_per_iter:
                raise ValueError(f"chain_gemv: weight {i} has {g} K groups; groups_per_iter="
                                 f"{self.groups_per_iter} must divide them")
            if self.programs % (g // self.groups_per_iter):
                raise ValueError(f"chain_gemv: programs={self.programs} must be a multiple of weight {i}'s "
                                 f"{g // self.groups_per_iter} K splits (G / groups_per_iter)")
            if i and (weights[i - 1].n != w.k or w.k != w.k_padded):
                raise ValueError(f"chain_gemv: weight {i} takes K={w.k} (padded {w.k_padded}) but weight "
                                 f"{i - 1} gives N={weights[i - 1].n}: chained K must match and be a multiple "
                                 f"of {GROUP_SIZE}")


def _barrier(cnt_ref, target, token, *, spin_limit: int):
    """Wait until `target` programs have arrived at the counter (this one included); returns (token after
    the fence, polls done)."""
    t = pdl._through("bar.sync 0;", token)  # the CTA's stores before this point are done
    zero = t - token  # 0, only after the bar.sync
    old = plgpu.atomic_add(cnt_ref, zero, jnp.int32(1))  # one atomic a CTA (Triton: scalar → one thread)

    def cond(c):
        return (c[0] < target) & (c[1] < spin_limit)

    def body(c):
        return plgpu.load(cnt_ref.at[zero], volatile=True), c[1] + 1

    count, polls = lax.while_loop(cond, body, (old + 1, jnp.int32(0)))
    f = pdl._through("fence.acq_rel.gpu;", count)
    return token + (f - count), polls


def _chain_kernel(*refs, cfg: ChainConfig, phases: tuple, act: str, x_dtype, interpret: bool):
    """refs: x [G0, 2, 16, 4]; per phase q8 [N8p, G, 2, 16], s8, q4 [N4p, G, 16], s4, z4, channel; cnt [1]
    (aliased); outputs: per phase partials f32 [S·N], cnt, spins int32 [P·L]."""
    n_ph = len(phases)
    x_ref = refs[0]
    w_refs = [refs[1 + 6 * i: 7 + 6 * i] for i in range(n_ph)]
    part_refs = refs[2 + 6 * n_ph: 2 + 7 * n_ph]
    cnt_ref, spins_ref = refs[2 + 7 * n_ph], refs[3 + 7 * n_ph]
    bn, gpi, big_p = cfg.block_n, cfg.groups_per_iter, cfg.programs
    fn = ACTIVATIONS[act]
    first = dict(eviction_policy="evict_first")
    dp4a = functools.partial(_dp4a, interpret=interpret)
    mask = jnp.int32(-252645136)  # 0xF0F0F0F0

    def load4(l, t, split):  # 4-bit tile t's words [bn, gpi, 16] and meta [gpi, bn]
        _, _, q4, s4, z4, _ = w_refs[l]
        gs, rows = pl.ds(split * gpi, gpi), pl.ds(t * bn, bn)
        return plgpu.load(q4.at[rows, gs, :], **first), plgpu.load(s4.at[gs, rows]), plgpu.load(z4.at[gs, rows])

    def codes(l, split):  # this split's activation groups: lo / hi words [gpi, 16], s_a, Σx_q [gpi]
        if l == 0:
            gs = pl.ds(split * gpi, gpi)
            return _pack_codes(x_ref[gs, 0, :, :], x_ref[gs, 1, :, :])
        s_prev, k = phases[l - 1][0], phases[l][1]
        shape = (s_prev, gpi, _WORDS, 4)  # (split of the previous phase, group, word, byte) of one half
        iota = functools.partial(lax.broadcasted_iota, jnp.int32, shape)

        def half(h):  # split derives from the barrier's token: these loads come after it
            idx = (split * gpi * GROUP_SIZE + h * (GROUP_SIZE // 2) + iota(0) * k + iota(1) * GROUP_SIZE
                   + iota(2) * 4 + iota(3))
            y = jnp.sum(plgpu.load(part_refs[l - 1].at[idx], volatile=True), axis=0)  # [gpi, 16, 4]
            return fn(y).astype(x_dtype)

        return _pack_codes(half(0), half(1))

    def rescale(d, w_scale, zero_off, a):  # d [bn, gpi, 16] dp4a sums → [bn]
        _, _, a_scale, x_sum = a
        y = jnp.sum(d, axis=2).astype(jnp.float32) * (w_scale * a_scale[None, :])
        if zero_off is not None:
            y = y + zero_off * (a_scale * x_sum)[None, :]
        return jnp.sum(y, axis=1)

    def dots(w_lo, w_hi, a):
        lo, hi = a[0], a[1]
        return dp4a(w_hi, jnp.broadcast_to(hi[None], w_hi.shape),
                    dp4a(w_lo, jnp.broadcast_to(lo[None], w_lo.shape), jnp.zeros(w_lo.shape, jnp.int32)))

    def do4(l, t, split, a, data):
        n, n8p = phases[l][2], phases[l][5]
        w, s4, z4 = data
        w_scale = s4.T
        zero_off = (8.0 - z4.astype(jnp.float32)).T * w_scale
        acc = rescale(dots((w << 4) & mask, w & mask, a), w_scale * (1.0 / 16.0), zero_off, a)
        cols = w_refs[l][5][pl.ds(n8p + t * bn, bn)]
        plgpu.store(part_refs[l].at[split * n + cols], acc, mask=cols < n)

    def do8(l, t, split, a):
        q8, s8 = w_refs[l][0], w_refs[l][1]
        n = phases[l][2]
        gs, rows = pl.ds(split * gpi, gpi), pl.ds(t * bn, bn)
        half = lambda h: plgpu.load(q8.at[rows, gs, pl.ds(h, 1), :], **first).reshape(bn, gpi, _WORDS)  # noqa: E731
        acc = rescale(dots(half(0), half(1), a), plgpu.load(s8.at[gs, rows]).T, None, a)
        cols = w_refs[l][5][pl.ds(t * bn, bn)]
        plgpu.store(part_refs[l].at[split * n + cols], acc, mask=cols < n)

    def phase(l, pid, pre):
        s, _, _, n8t, n4t, _ = phases[l]
        items = (n8t + n4t) * s
        split = pid % s
        a = codes(l, split)
        t0 = pid // s

        def item(t):
            if n4t:
                @pl.when(t < n4t)
                def _():
                    do4(l, t, split, a, load4(l, t, split))
            if n8t:
                @pl.when(t >= n4t)
                def _():
                    do8(l, t - n4t, split, a)

        count = (items - pid + big_p - 1) // big_p  # this program's items
        if pre is not None:  # item 0 is a 4-bit tile whose words are already loaded
            do4(l, t0, split, a, pre)
            lax.fori_loop(1, count, lambda j, c: (item(t0 + j * (big_p // s)), c)[1], 0)
        else:
            lax.fori_loop(0, count, lambda j, c: (item(t0 + j * (big_p // s)), c)[1], 0)

    def can_prefetch(l):
        s, _, _, _, n4t, _ = phases[l]
        return cfg.prefetch and big_p // s <= n4t

    if interpret:  # one program, the P virtual ones in turn, phase by phase
        for l in range(n_ph):
            def virtual(pid, c, l=l):
                pre = load4(l, pid // phases[l][0], pid % phases[l][0]) if can_prefetch(l) else None
                phase(l, pid, pre)
                plgpu.store(spins_ref.at[pid * n_ph + l], jnp.int32(0))
                return c

            lax.fori_loop(0, big_p, virtual, 0)
        return

    pid = pl.program_id(0)
    tok = pid
    for l in range(n_ph):
        pre = load4(l, pid // phases[l][0], pid % phases[l][0]) if can_prefetch(l) else None
        polls = jnp.int32(0)
        if l and cfg.barrier:
            tok, polls = _barrier(cnt_ref, l * big_p, tok, spin_limit=cfg.spin_limit)
        phase(l, tok, pre)  # every index of the phase derives from the token
        plgpu.store(spins_ref.at[pid * n_ph + l], polls)


@functools.partial(jax.jit, static_argnames=("config", "act", "interpret"))
def chain_gemv(x: jax.Array, weights: tuple, *, config: ChainConfig = ChainConfig(), act: str = "tanh",
               interpret: bool = False):
    """x [K] or [1, K] (16-bit float) and weights W_1 … W_L (`MixedWeight`, W_l's K = W_{l-1}'s N) →
    (y_L f32 [N_L], spins int32 [P, L]) where y_1 = W_1 x and y_l = W_l · act(y_{l-1}) cast to x's dtype,
    each product with the one-launch GEMV's arithmetic. spins[p, l]: polls program p made at barrier l
    (≥ config.spin_limit: the barrier gave up and the result is wrong)."""
    weights = tuple(weights)
    config.check(weights)
    if act not in ACTIVATIONS:
        raise ValueError(f"chain_gemv: act={act!r}, expected one of {sorted(ACTIVATIONS)}")
    x = x.reshape(-1)
    if x.shape[0] != weights[0].k:
        raise ValueError(f"chain_gemv: x has {x.shape[0]} features, weight 0 takes K={weights[0].k}")
    g0 = weights[0].num_groups
    x_in = jnp.pad(x, (0, g0 * GROUP_SIZE - x.shape[0])).reshape(g0, 2, _WORDS, 4)
    args, phases = [x_in], []
    for w in weights:
        g = w.num_groups
        q8 = _words(w.q8).reshape(-1, g, 2, _WORDS) if w.q8.size else jnp.zeros((1, 1, 2, _WORDS), jnp.int32)
        q4 = _words(w.q4).reshape(-1, g, _WORDS) if w.q4.size else jnp.zeros((1, 1, _WORDS), jnp.int32)
        s8 = w.scale8 if w.scale8.size else jnp.zeros((1, 1), jnp.float32)
        s4, z4 = (w.scale4, w.zero4) if w.scale4.size else (jnp.zeros((1, 1), jnp.float32), jnp.zeros((1, 1), jnp.int8))
        args += [q8, s8, q4, s4, z4, w.channel]
        n8p = w.q8.shape[0]
        phases.append((g // config.groups_per_iter, w.k_padded, w.n, n8p // config.block_n,
                       w.q4.shape[0] // config.block_n, n8p))
    n_ph = len(phases)
    cnt_index = len(args)
    args.append(jnp.zeros((1,), jnp.int32))
    out_shape = [jax.ShapeDtypeStruct((s * n,), jnp.float32) for s, _, n, _, _, _ in phases]
    out_shape += [jax.ShapeDtypeStruct((1,), jnp.int32), jax.ShapeDtypeStruct((config.programs * n_ph,), jnp.int32)]
    kernel = functools.partial(_chain_kernel, cfg=config, phases=tuple(phases), act=act, x_dtype=x.dtype,
                               interpret=interpret)
    outs = pl.pallas_call(
        kernel, out_shape=out_shape, grid=(1 if interpret else config.programs,),
        input_output_aliases={cnt_index: n_ph}, interpret=interpret, name="chain_gemv",
        compiler_params=plgpu.CompilerParams(num_warps=config.num_warps, num_stages=1),
    )(*args)
    s_last, _, n_last, _, _, _ = phases[-1]
    return outs[n_ph - 1].reshape(s_last, n_last).sum(0), outs[-1].reshape(config.programs, n_ph)


def chain_ref(x: jax.Array, weights, *, act: str = "tanh") -> jax.Array:
    """The chain in XLA with the reference's arithmetic (`reference.mixed_matmul_ref`): f32 [N_L]."""
    from pallas_kernels.reference import mixed_matmul_ref

    x = x.reshape(1, -1)
    y = None
    for i, w in enumerate(weights):
        if i:
            x = ACTIVATIONS[act](y).astype(x.dtype)
        if x.shape[1] != w.k:
            raise ValueError(f"chain_ref: weight {i} takes K={w.k}, its input has {x.shape[1]} features")
        y = mixed_matmul_ref(x.astype(jnp.float32), w)  # the same codes; y kept in f32 as the kernel does
    return y.reshape(-1)
