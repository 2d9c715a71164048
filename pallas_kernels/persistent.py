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

Work of phase l: (tile of `block_n` packed rows, K split of `groups_per_iter` groups) items. The 8-bit and
the 4-bit tiles go to separate programs (shares by bytes, `_split_programs`); within a set, program q takes
items q, q + P_set, … With each set's size a multiple of the phase's split count S, a program's split (and
so its activation groups) is fixed within a phase, so it quantizes them once. All of a program's items
are loaded at once, before the barrier with `prefetch`. Each phase writes f32 split partials [S, N]; the
next phase sums them while it reads its groups.

The barrier: `bar.sync` (the CTA's stores of the phase are done), one `atom.add.acq_rel.gpu` a program on a
counter that only grows; the program that brings it to phase · P writes the phase number into a flag
128 bytes away (`atom.exch`), and every thread polls the flag with volatile loads, then
`fence.acq_rel.gpu`. Every address that reads another program's output derives from a value passed
through that fence (Pallas's inline asm is pure: `pdl._through`), and those loads bypass L1 (volatile
loads; jax 0.10.2 cannot lower `.cg`). Every program of the grid must be resident at once, or the barrier
never opens: `programs` must not exceed what the GPU holds, and the poll gives up after `spin_limit` reads
(the `spins` output says whether any barrier gave up, in which case the result is wrong, not hung).

Measured (H200, jax 0.11.2, 2026-12-04, results/kernels_decode_extras.md Session 16): 8 dependent
4096→4096 GEMVs in 62.6–101.9 µs of device busy time. One launch a GEMV takes 56.5 µs, so this is 1.2–1.7×
slower. Without barriers it takes 48 µs (6 µs a phase, what a launch costs), and each barrier adds 2–3 µs.
The launch is not where a decode GEMV's fixed cost lies (NOTES item 59). Kept as the probe's kernel, not
dispatched.

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
from pallas_kernels.format import GROUP_SIZE, ROW_ALIGN
from pallas_kernels.gemv import _WORDS, _dp4a, _pack_codes, _words

ACTIVATIONS = {"tanh": jnp.tanh, "none": lambda v: v}


@dataclasses.dataclass(frozen=True)
class ChainConfig:
    programs: int = 528  # P: every one must be resident at once (132 SMs × 4 on an H100 / H200)
    block_n: int = 32  # packed rows per item
    groups_per_iter: int = 4  # K groups per item (a phase splits K into G / groups_per_iter)
    num_warps: int = 4
    prefetch: bool = True  # the program's weights of a phase loaded before its barrier
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


_FLAG = 32  # the barrier's flag sits 128 bytes after its counter: polls and arrivals on different L2 lines


def _barrier(sync_ref, phase_no: int, programs: int, token, *, spin_limit: int):
    """Grid barrier number `phase_no` (1, 2, …): every program adds 1 to the counter sync[0]; the one that
    brings it to phase_no · programs sets the flag sync[_FLAG] to phase_no; all poll the flag. Returns (token
    after the fence, polls done)."""
    t = pdl._through("bar.sync 0;", token)  # the CTA's stores before this point are done
    zero = t - token  # 0, only after the bar.sync
    old = plgpu.atomic_add(sync_ref, zero, jnp.int32(1))  # one atomic a CTA (Triton: scalar → one thread)
    last = old + 1 == phase_no * programs
    plgpu.atomic_xchg(sync_ref, zero + _FLAG, jnp.int32(phase_no), mask=last)

    def cond(c):
        return (c[0] < phase_no) & (c[1] < spin_limit)

    def body(c):
        return plgpu.load(sync_ref.at[zero + _FLAG], volatile=True), c[1] + 1

    init = old + 1 - phase_no * programs + phase_no  # phase_no for the last arrival (it set the flag), less before
    flag, polls = lax.while_loop(cond, body, (init, jnp.int32(0)))
    f = pdl._through("fence.acq_rel.gpu;", flag)
    return token + (f - flag), polls


def _classes(phase) -> list[tuple[bool, int, int, int, int]]:
    """(four, first program, programs, tiles, items a program) of the phase's 8-bit and 4-bit tiles."""
    out, base = [], 0
    for four, programs, tiles in ((False, phase["p8"], phase["n8t"]), (True, phase["p4"], phase["n4t"])):
        if programs:
            out.append((four, base, programs, tiles, -(-tiles * phase["s"] // programs)))
            base += programs
    return out


def _chain_kernel(*refs, cfg: ChainConfig, phases: tuple, act: str, x_dtype, interpret: bool):
    """refs: x [G0, 2, 16, 4]; per phase q8 [N8p, G, 2, 16], s8, q4 [N4p, G, 16], s4, z4, channel; sync [64]
    (aliased); outputs: per phase partials f32 [S·N], sync, spins int32 [P·L]."""
    n_ph = len(phases)
    x_ref = refs[0]
    w_refs = [refs[1 + 6 * i: 7 + 6 * i] for i in range(n_ph)]
    part_refs = refs[2 + 6 * n_ph: 2 + 7 * n_ph]
    sync_ref, spins_ref = refs[2 + 7 * n_ph], refs[3 + 7 * n_ph]
    bn, gpi, big_p = cfg.block_n, cfg.groups_per_iter, cfg.programs
    fn = ACTIVATIONS[act]
    dp4a = functools.partial(_dp4a, interpret=interpret)
    mask = jnp.int32(-252645136)  # 0xF0F0F0F0

    def fetch(l, four, q, p_c, tiles, count):
        """This program's `count` items of a channel set: (first packed row, valid, loaded operands) each;
        items past the last tile load nothing (masked) and store nothing."""
        q8, s8, q4, s4, z4, _ = w_refs[l]
        s = phases[l]["s"]
        gs = pl.ds((q % s) * gpi, gpi)
        out = []
        for j in range(count):
            t = q // s + j * (p_c // s)
            valid = t < tiles
            row0 = jnp.minimum(t, tiles - 1) * bn  # in bounds for the masked items too
            rows = pl.ds(row0, bn)
            ld = functools.partial(plgpu.load, mask=valid, other=0)
            if four:
                data = (ld(q4.at[rows, gs, :], eviction_policy="evict_first"), ld(s4.at[gs, rows]), ld(z4.at[gs, rows]))
            else:
                data = tuple(ld(q8.at[rows, gs, pl.ds(h, 1), :], eviction_policy="evict_first").reshape(bn, gpi, _WORDS)
                             for h in (0, 1)) + (ld(s8.at[gs, rows]),)
            out.append((row0, valid, data))
        return out

    def codes(l, split):  # this split's activation groups: lo / hi words [gpi, 16], s_a, Σx_q [gpi]
        if l == 0:
            gs = pl.ds(split * gpi, gpi)
            return _pack_codes(x_ref[gs, 0, :, :], x_ref[gs, 1, :, :])
        s_prev, k = phases[l - 1]["s"], phases[l]["kp"]
        s_pow = pl.next_power_of_2(s_prev)  # Triton blocks are powers of two: extra splits masked
        shape = (s_pow, gpi, _WORDS, 4)  # (split of the previous phase, group, word, byte) of one half
        iota = functools.partial(lax.broadcasted_iota, jnp.int32, shape)

        def half(h):  # split derives from the barrier's token: these loads come after it
            sp = iota(0)
            idx = (split * gpi * GROUP_SIZE + h * (GROUP_SIZE // 2) + jnp.minimum(sp, s_prev - 1) * k
                   + iota(1) * GROUP_SIZE + iota(2) * 4 + iota(3))
            y = jnp.sum(plgpu.load(part_refs[l - 1].at[idx], mask=sp < s_prev, other=0.0, volatile=True), axis=0)
            return fn(y).astype(x_dtype)  # [gpi, 16, 4]

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

    def compute(l, four, split, a, item):
        row0, valid, data = item
        n = phases[l]["n"]
        if four:
            w, s4, z4 = data
            w_scale = s4.T
            zero_off = (8.0 - z4.astype(jnp.float32)).T * w_scale
            acc = rescale(dots((w << 4) & mask, w & mask, a), w_scale * (1.0 / 16.0), zero_off, a)
            row0 = row0 + phases[l]["n8p"]  # the 4-bit rows' channels follow the 8-bit rows'
        else:
            acc = rescale(dots(data[0], data[1], a), data[2].T, None, a)
        cols = w_refs[l][5][pl.ds(row0, bn)]
        plgpu.store(part_refs[l].at[split * n + cols], acc, mask=(cols < n) & valid)

    def program(l, pid, barrier: bool):
        """Phase l of program pid: its channel set's items, fetched before the barrier when prefetching."""
        s = phases[l]["s"]
        for four, base, p_c, tiles, count in _classes(phases[l]):
            @pl.when((pid >= base) & (pid < base + p_c))
            def _(four=four, base=base, p_c=p_c, tiles=tiles, count=count):
                items = fetch(l, four, pid - base, p_c, tiles, count) if cfg.prefetch else None
                tok, polls = pid, jnp.int32(0)
                if barrier:
                    tok, polls = _barrier(sync_ref, l, big_p, pid, spin_limit=cfg.spin_limit)
                q = tok - base  # every index below derives from the token (after the barrier)
                if items is None:
                    items = fetch(l, four, q, p_c, tiles, count)
                a = codes(l, q % s)
                for item in items:
                    compute(l, four, q % s, a, item)
                plgpu.store(spins_ref.at[pid * n_ph + l], polls)

    if interpret:  # one program, the P virtual ones in turn, phase by phase
        for l in range(n_ph):
            lax.fori_loop(0, big_p, lambda pid, c, l=l: (program(l, pid, False), c)[1], 0)
        return
    pid = pl.program_id(0)
    for l in range(n_ph):
        program(l, pid, bool(l) and cfg.barrier)


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
    for i, w in enumerate(weights):
        g = w.num_groups
        q8 = _words(w.q8).reshape(-1, g, 2, _WORDS) if w.q8.size else jnp.zeros((1, 1, 2, _WORDS), jnp.int32)
        q4 = _words(w.q4).reshape(-1, g, _WORDS) if w.q4.size else jnp.zeros((1, 1, _WORDS), jnp.int32)
        s8 = w.scale8 if w.scale8.size else jnp.zeros((1, 1), jnp.float32)
        s4, z4 = (w.scale4, w.zero4) if w.scale4.size else (jnp.zeros((1, 1), jnp.float32), jnp.zeros((1, 1), jnp.int8))
        args += [q8, s8, q4, s4, z4, w.channel]
        s = g // config.groups_per_iter
        n8t, n4t = w.q8.shape[0] // config.block_n, w.q4.shape[0] // config.block_n
        p8 = _split_programs(config.programs, s, n8t, n4t, i)
        phases.append(dict(s=s, kp=w.k_padded, n=w.n, n8t=n8t, n4t=n4t, n8p=w.q8.shape[0], p8=p8,
                           p4=config.programs - p8 if n4t else 0))
    n_ph = len(phases)
    sync_index = len(args)
    args.append(jnp.zeros((2 * _FLAG,), jnp.int32))
    out_shape = [jax.ShapeDtypeStruct((ph["s"] * ph["n"],), jnp.float32) for ph in phases]
    out_shape += [jax.ShapeDtypeStruct((2 * _FLAG,), jnp.int32),
                  jax.ShapeDtypeStruct((config.programs * n_ph,), jnp.int32)]
    kernel = functools.partial(_chain_kernel, cfg=config, phases=tuple(phases), act=act, x_dtype=x.dtype,
                               interpret=interpret)
    outs = pl.pallas_call(
        kernel, out_shape=out_shape, grid=(1 if interpret else config.programs,),
        input_output_aliases={sync_index: n_ph}, interpret=interpret, name="chain_gemv",
        compiler_params=plgpu.CompilerParams(num_warps=config.num_warps, num_stages=1),
    )(*args)
    s_last, n_last = phases[-1]["s"], phases[-1]["n"]
    return outs[n_ph - 1].reshape(s_last, n_last).sum(0), outs[-1].reshape(config.programs, n_ph)


def _split_programs(programs: int, s: int, n8t: int, n4t: int, i: int) -> int:
    """Programs for the 8-bit tiles (a multiple of the split count s), by their share of the bytes (an 8-bit
    tile has twice a 4-bit tile's); the rest take the 4-bit tiles."""
    if not n8t or not n4t:
        return programs if n8t else 0
    if programs < 2 * s:
        raise ValueError(f"chain_gemv: programs={programs} must be at least 2 × weight {i}'s {s} K splits "
                         f"(8-bit and 4-bit tiles take separate programs)")
    share = 2 * n8t / (2 * n8t + n4t)
    return min(max(s, round(programs * share / s) * s), programs - s)


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
