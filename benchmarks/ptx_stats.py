"""Instruction counts of our Pallas-Triton kernels, on a machine without a GPU.

    python benchmarks/ptx_stats.py --kernel mma --m 32 --k 4096 --n 28672
    python benchmarks/ptx_stats.py --kernel mma --m 16 --set word_unpack=False     # a GemmConfig field
    python benchmarks/ptx_stats.py --kernel gemv --m 1 --triton-python /tmp/tvenv/bin/python
    python benchmarks/ptx_stats.py --kernel attend_new --m 1 --k 384 --set parts=8     # B 1, a 384-position cache

The kernels are lowered for CUDA (`lowering_platforms=("cuda",)`, which works on a CPU machine); the
Triton IR that Pallas hands to XLA is captured and compiled to PTX for sm_90 by the `triton` package
(`triton.compile` on an IR file; no GPU or driver needed). Install it apart from the project, e.g.
`python -m venv /tmp/tvenv && /tmp/tvenv/bin/pip install triton`, and pass that interpreter as
`--triton-python`. The pip Triton is newer than the one inside the device's XLA, so the PTX is an
estimate of the device's, not a copy; it answers "how many instructions does one loop iteration cost
per thread, and which ones" before a device call is spent (session 9: it showed Triton lowering an int8
shift byte by byte, ≈ 150 of the 4-bit loop's 525 instructions).

Prints, per kernel, the basic blocks with more than 20 instructions (a loop body is one block) and
their opcode mix; inline-asm blocks count their instructions; then each loop of the SASS that ptxas made of it
(cuobjdump, shipped with Triton), which is what the GPU issues. The PTX and SASS files stay in --out.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import os
import re
import subprocess
import sys
import tempfile

import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from bench_matmul import random_packed  # noqa: E402
from pallas_kernels import gemv, kernels, triton_ir  # noqa: E402
from pallas_kernels.format import tile_codes  # noqa: E402

_COMPILE = r"""
import sys, triton
from triton._C.libtriton import ir, passes
from triton.backends.compiler import GPUTarget
path, warps, stages = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
# a .ttir file enters triton.compile after its TTIR passes; run them first (XLA's pipeline does: they fold
# `dot + acc` into the MMA's accumulator, among others)
ctx = ir.context()
ir.load_dialects(ctx)
mod = ir.parse_mlir_module(path, ctx)
pm = ir.pass_manager(ctx)
passes.common.add_inliner(pm)
passes.common.add_canonicalizer(pm)
passes.ttir.add_combine(pm)
passes.ttir.add_reorder_broadcast(pm)
passes.common.add_cse(pm)
passes.common.add_symbol_dce(pm)
pm.run(mod, "make_ttir")
path = path[:-5] + ".opt.ttir"
open(path, "w").write(str(mod))
c = triton.compile(path, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=stages))
open(path[:-9] + ".ptx", "w").write(c.asm["ptx"])
open(path[:-9] + ".ttgir", "w").write(c.asm["ttgir"])
open(path[:-9] + ".cubin", "wb").write(c.asm["cubin"])
# registers a thread, from the cubin (cuobjdump ships with Triton's NVIDIA backend)
import os, re, subprocess
tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
usage = subprocess.run([tool, "--dump-resource-usage", path[:-9] + ".cubin"], capture_output=True, text=True).stdout
regs = re.search(r"REG:(\d+)", usage)
sass = subprocess.run([tool, "-sass", path[:-9] + ".cubin"], capture_output=True, text=True).stdout
open(path[:-9] + ".sass", "w").write(sass)
print(c.metadata.shared, regs.group(1) if regs else "?")
"""

_OPCODE = re.compile(r"^\s+(?:@!?%p\d+\s+)?([a-z][a-z0-9._]*)", re.M)
_ASM = re.compile(r"^\s*\{(.*)\}\s*$", re.M)


def capture_ttir(fn, *args) -> list[str]:
    """The Triton IR of every pallas_call in jit(fn)(*args), lowered for CUDA, for the pip Triton."""
    captured = triton_ir.capture_ttir(fn, *args)
    # syntax the newer Triton parser does not take; an eviction hint does not change the instruction mix
    return [t.replace(" evictionPolicy = evict_first", "") for t in captured]


def block_stats(ptx: str, min_size: int = 20) -> list[tuple[str, int, collections.Counter]]:
    """(label, instructions, opcode counts) of each basic block of the kernel with > min_size instructions."""
    body = ptx[ptx.index("{", ptx.index(".entry")):]
    parts = re.split(r"^(\$L__BB\d+_\d+):", body, flags=re.M)
    out, label = [], "entry"
    for part in parts:
        if part.startswith("$L__BB"):
            label = part
            continue
        ops = [op.split(".")[0] for op in _OPCODE.findall(part)]
        for asm in _ASM.findall(part):  # inline asm: `{ .reg ...; op a, b; op c, d; }` on one line
            ops += [s.split()[0].split(".")[0] for s in asm.split(";") if s.strip() and not s.strip().startswith(".")]
        if len(ops) > min_size:
            out.append((label, len(ops), collections.Counter(ops)))
    return out


_SASS = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)(?:\.\S*)?\s*(0x[0-9a-f]+)?")


def sass_loops(sass: str) -> list[tuple[int, int, collections.Counter]]:
    """(start, end, opcode counts) of each loop in cuobjdump's SASS: the instructions from a backward branch's
    target to the branch. What the GPU issues, after ptxas (the PTX counts above come before it: session 33 found
    the M = 32 decode tile's 4-bit loop at 318 PTX but 207 SASS instructions a thread a group)."""
    ins = [(int(a, 16), op, target) for a, op, target in _SASS.findall(sass)]
    loops = []
    for addr, op, target in ins:
        if op == "BRA" and target and int(target, 16) < addr:
            body = [o for a, o, _ in ins if int(target, 16) <= a <= addr]
            loops.append((int(target, 16), addr, collections.Counter(body)))
    return loops


def config_overrides(cfg, text: str):
    """`cfg` with "field=value,..." applied (ints and bools; the --set option of the bench scripts)."""
    types = {f.name: f.type for f in dataclasses.fields(cfg)}
    over = {}
    for kv in filter(None, text.split(",")):
        key, value = kv.split("=")
        if key not in types:
            raise SystemExit(f"--set: {key!r} is not a field of {type(cfg).__name__} ({', '.join(types)})")
        over[key] = value in ("1", "True", "true") if "bool" in str(types[key]) else int(value)
    return dataclasses.replace(cfg, **over)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kernel", default="mma", choices=("mma", "gemv", "attention", "attend_new"),
                   help="attention / attend_new (pallas_kernels/attention.py): --m is the batch, --k the cache "
                        "positions, Llama-3-8B heads; --set takes block_s, splits, parts (split-K partials), int8, "
                        "stages, warps, codes, v_block (an int8 cache's values in blocks of that many positions)")
    p.add_argument("--m", type=int, default=32)
    p.add_argument("--k", type=int, default=4096)
    p.add_argument("--n", type=int, default=28672)
    p.add_argument("--share8", type=float, default=0.1, help="8-bit share of the rows (0: only the 4-bit branch)")
    p.add_argument("--set", default="", help="config overrides, e.g. block_n=32,word_unpack=False")
    p.add_argument("--tiled", action="store_true", help="the weight's codes in (tile, group) order (format.tile_codes)")
    p.add_argument("--triton-python", default=sys.executable, help="a python with the `triton` package")
    p.add_argument("--out", default=None, help="folder for the .ttir / .ptx files (default: a temp folder)")
    args = p.parse_args(argv)

    if args.kernel in ("attention", "attend_new"):
        return _attention_stats(args)
    w = random_packed(np.random.default_rng(0), args.n, args.k, args.share8)
    x = jnp.zeros((args.m, args.k), jnp.bfloat16)
    rows = w.q8.shape[0] + w.q4.shape[0]
    if args.kernel == "mma":
        cfg = kernels.choose_config(args.m, w.num_groups, rows)
    else:
        cfg = gemv.choose_gemv_config(w.num_groups, rows, m=args.m)
    cfg = config_overrides(cfg, args.set)
    print("config", cfg)
    if args.tiled:  # the codes in (64-row tile, group) order (`MixedWeight.tiled`)
        w = tile_codes(w)
    if args.kernel == "mma":
        fn = lambda x, w: kernels.mixed_matmul_pallas(x, w, config=cfg)  # noqa: E731
    else:
        fn = lambda x, w: gemv.mixed_gemv_pallas(x, w, config=cfg)  # noqa: E731
    _report(capture_ttir(fn, x, w), args, cfg.num_warps, lambda name: 1 if name == "quantize_activations" else cfg.num_stages)


def _report(modules, args, warps: int, stages) -> None:
    """Compiles each captured module to PTX with --triton-python and prints its large basic blocks."""
    out = args.out or tempfile.mkdtemp(prefix="ptx_stats_")
    os.makedirs(out, exist_ok=True)
    for i, ttir in enumerate(modules):
        name = re.search(r"module @(\w+)", ttir).group(1)
        path = os.path.join(out, f"{i}_{name}.ttir")
        with open(path, "w") as f:
            f.write(ttir)
        res = subprocess.run([args.triton_python, "-c", _COMPILE, path, str(warps), str(stages(name))],
                             capture_output=True, text=True, env={**os.environ, "TRITON_DEFAULT_FP_FUSION": "1"})
        if res.returncode:
            tail = res.stderr.strip().splitlines()[-3:]
            raise SystemExit(f"compiling {path} with {args.triton_python} failed (is `triton` installed there?):\n"
                             + "\n".join(tail))
        ptx = open(path[:-5] + ".ptx").read()
        shared, regs = res.stdout.split()
        print(f"\n{name}: shared memory {shared} B, {regs} registers a thread, PTX {path[:-5]}.ptx")
        for label, n, ops in block_stats(ptx):
            print(f"  {label:>12} {n:4d} instructions: " + ", ".join(f"{k} {v}" for k, v in ops.most_common(12)))
        for start, end, ops in sass_loops(open(path[:-5] + ".sass").read()):
            print(f"  SASS loop {start:#06x}–{end:#06x} {sum(ops.values()):4d} instructions: "
                  + ", ".join(f"{k} {v}" for k, v in ops.most_common(10)))


def _attention_stats(args) -> None:
    from pallas_kernels import attention

    over = dict(block_s=64, splits=1, parts=0, int8=0, stages=2, warps=4, codes=0, v_block=0)
    for kv in filter(None, args.set.split(",")):
        key, value = kv.split("=")
        if key not in over:
            raise SystemExit(f"--set: {key!r} is not one of {', '.join(over)} for --kernel {args.kernel}")
        over[key] = int(value)
    B, S, H, KVH, Dh = args.m, args.k, 32, 8, 128
    cache = jnp.zeros((B, KVH, S, Dh), jnp.int8 if over["int8"] else jnp.bfloat16)
    scales = jnp.zeros((B, KVH, S), jnp.float32) if over["int8"] else None
    pos = jnp.zeros((B, 1), jnp.int32)
    kw = dict(k_scale=scales, v_scale=scales, block_s=over["block_s"], splits=over["splits"], v_block=over["v_block"])
    stages, warps, codes = over.pop("stages"), over.pop("warps"), over.pop("codes")
    print("config", over, "stages", stages, "warps", warps)
    if args.kernel == "attention":
        q = jnp.zeros((B, 1, H, Dh), jnp.bfloat16)
        modules = capture_ttir(lambda q, c, pos: attention.decode_attention_pallas(q, c, c, pos, **kw), q, cache, pos)
    else:
        width = (H + 2 * KVH) * Dh
        x = jnp.zeros((over["parts"], B, 1, width), jnp.float32) if over["parts"] else jnp.zeros((B, 1, width), jnp.bfloat16)
        rope = jnp.zeros((B, 1, 1, Dh), jnp.float32)
        modules = capture_ttir(lambda x, c, pos, r: attention.attend_new_tokens_pallas(
            x, pos, r, r, c, c, heads=H, kv_heads=KVH, dtype=jnp.bfloat16, k_scale_store=kw.pop("k_scale"),
            v_scale_store=kw.pop("v_scale"), num_stages=stages, num_warps=warps, codes=bool(codes),
            **kw), x, cache, pos, rope)
    _report(modules, args, warps, lambda name: stages)


if __name__ == "__main__":
    main()
