"""Accuracy of MixLLM quantization on the embedded model (SmolLM2-135M-Instruct), CPU.

Calibration on OpenWebText passages (`owt`), evaluation on Wikipedia passages (`wikipedia`): disjoint
text. One salience computation per salience kind is shared by all rows that use it (timed once).
Perplexities of kernel-format rows are computed through `as_fake_quant` (same codes, same activation
rounding as the kernels' XLA reference, float summation order aside); the W4.4A8 row is also evaluated
through the `MixedWeight` XLA reference itself to show the two agree.

    python benchmarks/accuracy.py                      # writes benchmarks/results/accuracy.md
    python benchmarks/accuracy.py --samples 128 --seq-len 2048   # the paper's calibration
    python benchmarks/accuracy.py --head-sweep         # appends a section: W4.4A8 with the embedding / LM head
                                                       # float, int8, int4 (QuantConfig.head_bits)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import time

import jax
import jax.numpy as jnp

import convert
from mixjax import assets, data
from mixjax.evaluate import perplexity
from mixjax.quant import ActFormat, QuantConfig, WeightFormat, as_fake_quant, quantize
from mixjax.quant.api import salience
from mixjax.quant.report import peak_memory

RTN = dict(gptq=False, clip=False)
PER_CHANNEL_SYM = WeightFormat(group_size=None, symmetric4=True)
PER_CHANNEL_ASYM = WeightFormat(group_size=None, symmetric4=False)
A8_TOKEN = ActFormat(bits=8, granularity="token")

# (section, name, config); rows with 4 < bits < 8 use the salience of config.salience.
ROWS = [
    ("main", "RTN W4A16", QuantConfig(bits=4, act=ActFormat(bits=None), **RTN)),
    ("main", "RTN W4A8", QuantConfig(bits=4, **RTN)),
    ("main", "GPTQ W4A8", QuantConfig(bits=4, clip=False)),
    ("main", "MixLLM W4A8 (GPTQ + clip, no 8-bit channels)", QuantConfig(bits=4)),
    ("main", "MixLLM W4.2A8 global", QuantConfig(bits=4.2)),
    ("main", "MixLLM W4.4A8 global", QuantConfig(bits=4.4)),
    ("main", "MixLLM W4.8A8 global", QuantConfig(bits=4.8)),
    ("main", "MixLLM W4.4A8 local", QuantConfig(bits=4.4, local=True)),
    ("main", "MixLLM W4.4A8, static activation scales", QuantConfig(bits=4.4, act=ActFormat(static=True))),
    ("main", "MixLLM W4.4A8, static activation scales, MSE-clipped",
     QuantConfig(bits=4.4, act=ActFormat(static=True, static_calib="mse"))),
    ("main", "MixLLM W4.4A8, per-token activation scales", QuantConfig(bits=4.4, act=A8_TOKEN)),
    ("main", "W8A8 (GPTQ + clip)", QuantConfig(bits=8)),
    ("ladder", "1. W4A4 per-channel sym / per-token RTN",
     QuantConfig(bits=4, weight=PER_CHANNEL_SYM, act=ActFormat(bits=4, granularity="token"), **RTN)),
    ("ladder", "2. + 8-bit activations", QuantConfig(bits=4, weight=PER_CHANNEL_SYM, act=A8_TOKEN, **RTN)),
    ("ladder", "3. + asymmetric weights", QuantConfig(bits=4, weight=PER_CHANNEL_ASYM, act=A8_TOKEN, **RTN)),
    ("ladder", "4. + weight groups of 128", QuantConfig(bits=4, act=A8_TOKEN, **RTN)),
    ("ladder", "5. + activation groups of 128", QuantConfig(bits=4, **RTN)),
    ("ladder", "6. + 10% int8 (W4.4), diagonal Fisher", QuantConfig(bits=4.4, salience="diag", **RTN)),
    ("ladder", "7. + full Fisher + first order", QuantConfig(bits=4.4, **RTN)),
    ("ladder", "8. + GPTQ", QuantConfig(bits=4.4, group_reorder=False, clip=False)),
    ("ladder", "9. + group reorder", QuantConfig(bits=4.4, clip=False)),
    ("ladder", "10. + clipping", QuantConfig(bits=4.4)),
]
PAPER_LADDER = [744.4, 9.867, 8.551, 6.937, 6.830, 6.496, 6.489, 6.424, 6.422, 6.420]


def needs_salience(c: QuantConfig) -> bool:
    return 4.0 < c.bits < 8.0


def describe(c: QuantConfig) -> str:
    w = "per-channel" if c.weight.group_size is None else f"g{c.weight.group_size}"
    w = f"int8 {w} sym (all channels)" if c.bits >= 8 else f"int4 {w}" + (" sym" if c.weight.symmetric4 else " asym")
    a = "A16" if c.act.bits is None else (f"A{c.act.bits} " + ("per-token" if c.act.granularity == "token" else "g128")
                                          + (" static" if c.act.static else "")
                                          + (" MSE-clipped" if c.act.static and c.act.static_calib == "mse" else ""))
    q = "GPTQ" + ("" if c.group_reorder else " (no reorder)") if c.gptq else "RTN"
    q += " + clip" if c.clip else ""
    sel = f", {c.salience} {'local' if c.local else 'global'}" if needs_salience(c) else ""
    return f"{w}, {a}, {q}{sel}"


def load(args):
    path = assets.embedded_model_path()
    tok = convert.load_tokenizer(path)
    cfg, params = convert.load(path, dtype=jnp.float32)
    calib = data.calibration_batches(tok, "owt", n_samples=args.samples, seq_len=args.seq_len, seed=0,
                                     batch_size=args.batch_size)
    windows = data.eval_windows(tok, "wikipedia", args.eval_seq_len, args.eval_tokens)
    return cfg, params, calib, windows


def measure_one(args) -> None:
    """Child process: one full W4.4A8 quantization (salience + GPTQ + clip); prints a JSON line."""
    cfg, params, calib, _ = load(args)
    t = time.perf_counter()
    _, report = quantize(params, calib, cfg, config=QuantConfig(batch_size=args.batch_size), return_report=True)
    wall = time.perf_counter() - t
    peak, kind = peak_memory()
    print(json.dumps({"wall_s": wall, "seconds": report.seconds, "peak_bytes": peak, "peak_kind": kind,
                      "report": report.to_markdown()}))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--eval-seq-len", type=int, default=512)
    p.add_argument("--eval-tokens", type=int, default=16384)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "accuracy.md"))
    p.add_argument("--rows", default="", help="only rows whose name contains one of these comma-separated strings")
    p.add_argument("--measure-one", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--head-sweep", action="store_true",
                   help="only W4.4A8 with head_bits None/8/4 (and 4 without clipping); appends a section to --out")
    args = p.parse_args(argv)
    if args.measure_one:
        return measure_one(args)
    if args.head_sweep:
        return head_sweep(args)

    child = [sys.executable, __file__, "--measure-one", "--samples", str(args.samples), "--seq-len",
             str(args.seq_len), "--batch-size", str(args.batch_size)]
    print("measuring one W4.4A8 quantization in a fresh process ...", flush=True)
    out = subprocess.run(child, check=True, capture_output=True, text=True).stdout
    measured = json.loads(out.strip().splitlines()[-1])

    cfg, params, calib, windows = load(args)
    settings = dict(samples=args.samples, seq_len=args.seq_len, eval_windows=int(windows.shape[0]),
                    eval_seq_len=int(windows.shape[1]))
    fp = perplexity(params, cfg, windows, batch_size=4)
    print(f"fp {fp:.3f}", flush=True)
    scores, score_time = {}, {}
    results: dict[QuantConfig, tuple[float, float]] = {}
    rows_out = []
    extra = {}
    wanted = [w for w in args.rows.split(",") if w]
    for section, name, c in ROWS:
        if wanted and not any(w in name for w in wanted):
            continue
        c = dataclasses.replace(c, batch_size=args.batch_size)
        if c not in results:
            s = None
            if needs_salience(c):
                if c.salience not in scores:
                    t = time.perf_counter()
                    scores[c.salience] = salience(params, calib, cfg, config=c)
                    score_time[c.salience] = time.perf_counter() - t
                s = scores[c.salience]
            qp, report = quantize(params, calib, cfg, config=c, scores=s, return_report=True)
            ppl = perplexity(as_fake_quant(qp), cfg, windows, batch_size=4)
            if name == "MixLLM W4.4A8 global":
                extra["mixed_ref_ppl"] = perplexity(qp, cfg, windows, batch_size=4, implementation="xla")
                extra["report"] = report.to_markdown()
            results[c] = (ppl, report.seconds["quantize"] + (score_time.get(c.salience, 0.0) if needs_salience(c) else 0.0))
        ppl, secs = results[c]
        rows_out.append((section, name, c, ppl, secs))
        print(f"{name}: {ppl:.3f} ({secs:.0f} s)", flush=True)
        write(args.out, fp, rows_out, settings, measured, extra, score_time)


HEAD_ROWS = [("float (default)", None, False), ("int8 g128 RTN (head_bits=8)", 8, False),
             ("int8 g128, weight-MSE clip search", 8, True), ("int4 g128 asym RTN (head_bits=4)", 4, False),
             ("int4 g128 asym, weight-MSE clip search", 4, True)]


def head_sweep(args) -> None:
    """W4.4A8 (GPTQ + clip, global Fisher) quantized once; its embedding table / LM head then float or
    quantized by `quantize_head`. That equals `quantize(..., config=QuantConfig(head_bits=b))`: the decoder
    is calibrated on the float embeddings whatever head_bits is (tests/test_head_quant.py checks it)."""
    from mixjax.quant.api import quantize_head
    from mixjax.quant.report import weight_bytes

    cfg, params, calib, windows = load(args)
    t = time.perf_counter()
    qp = quantize(params, calib, cfg, config=QuantConfig(batch_size=args.batch_size))
    t_decoder = time.perf_counter() - t
    table_bf16 = cfg.vocab_size * cfg.hidden_size * 2
    fp = perplexity(params, cfg, windows, batch_size=4)
    print(f"fp {fp:.3f}; W4.4A8 decoder quantized in {t_decoder:.0f} s", flush=True)
    lines = ["| embedding table / LM head | perplexity | Δ vs fp | Δ vs float head | head bytes (one table; bf16 "
             f"{table_bf16 / 1e6:.1f} MB) | head quantization time (s) |", "|---|---|---|---|---|---|"]
    base = None
    for name, bits, clip in HEAD_ROWS:
        t = time.perf_counter()
        heads = {} if bits is None else quantize_head(params, cfg, bits=bits, clip=clip)
        secs = time.perf_counter() - t
        ppl = perplexity(as_fake_quant({**qp, **heads}), cfg, windows, batch_size=4)
        base = ppl if base is None else base
        size = table_bf16 if bits is None else weight_bytes(heads["embed_tokens"])
        lines.append(f"| {name} | {ppl:.3f} | {ppl - fp:+.3f} | {ppl - base:+.3f} | {size / 1e6:.1f} MB | {secs:.1f} |")
        print(lines[-1], flush=True)
    cmd = "PYTHONPATH=. python benchmarks/accuracy.py --head-sweep" + "".join(
        f" --{k.replace('_', '-')} {getattr(args, k)}" for k in ("samples", "seq_len", "eval_seq_len", "eval_tokens"))
    text = [
        "", f"## Quantized embedding table / LM head (`--head-bits`), {time.strftime('%Y-%m-%d')}", "",
        f"`{cmd}`: MixLLM W4.4A8 (GPTQ + clip, global Fisher; decoder quantized once, {t_decoder:.0f} s) with the "
        f"tied {cfg.vocab_size} × {cfg.hidden_size} embedding table / LM head kept float or quantized "
        "(`QuantConfig.head_bits`: every row int8 symmetric or int4 asymmetric, groups of 128, round to nearest; "
        "the head then takes int8 activations per (token, group of 128)); the clip-search rows are "
        "`quantize_head(..., clip=True)` (per (row, group), the clip ratio on the 80–100 % grid minimising the "
        f"weight's squared error). Calibration {args.samples} × {args.seq_len} OpenWebText tokens, evaluation "
        f"{windows.shape[0]} × {windows.shape[1]} Wikipedia tokens, as above; fp (f32) in this run {fp:.3f} "
        "(compare rows within this section: the tables above may predate a tokenizer change). Head bytes: "
        "codes + f32 scales (+ int8 zeros) + the int32 channel indices.", "", *lines, ""]
    with open(args.out, "a") as f:
        f.write("\n".join(text))


def write(path, fp, rows, settings, measured, extra, score_time) -> None:
    dev = jax.devices()[0]
    lines = [
        "# Accuracy of MixLLM quantization (embedded SmolLM2-135M-Instruct, CPU)",
        "",
        "Generated by `python benchmarks/accuracy.py`. "
        f"Calibration: {settings['samples']} samples × {settings['seq_len']} tokens of OpenWebText passages "
        f"(`owt`, seed 0). Evaluation: {settings['eval_windows']} windows × {settings['eval_seq_len']} tokens "
        f"of Wikipedia passages (`wikipedia`), disjoint from calibration. Perplexity = exp(mean next-token NLL). "
        f"Weight bits are the average code bits over all decoder-linear elements (budget counted in elements; "
        "scales/zeros not counted); 8-bit channels int8 symmetric g128, 4-bit int4 as stated. "
        f"jax {jax.__version__}, {dev.platform} ({platform.processor() or platform.machine()}), "
        f"{os.cpu_count()} cores shared with other jobs, params f32.",
        "",
        "CAVEAT (REFERENCE.md): the embedded model's linears are already on a Q4_1 grid (blocks of 32), so "
        "8-bit weights are almost lossless and 4-bit g128 still loses accuracy; absolute numbers differ from "
        "a float model's.",
        "",
        f"fp (f32): **{fp:.3f}**",
        "",
        "| row | configuration | perplexity | Δ vs fp | quantization time (s) |",
        "|---|---|---|---|---|",
    ]
    for section, name, c, ppl, secs in rows:
        if section == "main":
            lines.append(f"| {name} | {describe(c)} | {ppl:.3f} | {ppl - fp:+.3f} | {secs:.0f} |")
    lines += ["", "## Ablation ladder (paper Fig. 8 order; paper numbers: Llama-3.1-8B WikiText2)", "",
              "| rung | configuration | perplexity | paper | quantization time (s) |", "|---|---|---|---|---|"]
    ladder = [r for r in rows if r[0] == "ladder"]
    for section, name, c, ppl, secs in ladder:
        paper = PAPER_LADDER[int(name.split(".")[0]) - 1]
        lines.append(f"| {name} | {describe(c)} | {ppl:.3f} | {paper} | {secs:.0f} |")
    lines += ["", "Time of a row = its salience computation (shared by rows with the same salience kind: "
              + ", ".join(f"{k} {v:.0f} s" for k, v in score_time.items())
              + ") + its layer-by-layer quantization, including JIT compilation."]
    by_name = {name: ppl for _, name, _, ppl, _ in rows}
    checks = []
    if "RTN W4A16" in by_name and "MixLLM W4.4A8 global" in by_name:
        ratio = (by_name["MixLLM W4.4A8 global"] - fp) / (by_name["RTN W4A16"] - fp)
        checks.append(f"- W4.4A8 perplexity increase / RTN W4A16 increase = {ratio:.3f} (target ≤ 0.3)")
    if "MixLLM W4.4A8 local" in by_name and "MixLLM W4.4A8 global" in by_name:
        g, l = by_name["MixLLM W4.4A8 global"], by_name["MixLLM W4.4A8 local"]
        checks.append(f"- global {g:.3f} vs local {l:.3f} at 4.4 bits: global {'better' if g < l else 'NOT better'}")
    if len(ladder) == 10:
        ppls = [r[3] for r in ladder]
        bad = [i + 2 for i in range(9) if ppls[i + 1] > ppls[i]]
        checks.append("- ladder monotone: " + ("yes" if not bad else f"no (rung(s) {bad} worse than the previous)"))
    if "mixed_ref_ppl" in extra:
        checks.append(f"- W4.4A8 through the `MixedWeight` XLA reference (kernel arithmetic): "
                      f"{extra['mixed_ref_ppl']:.3f}")
    lines += ["", "## Targets", ""] + checks
    lines += ["", "Llama-3-8B-shaped model on one H100: see [quant_speed.md](quant_speed.md).", "",
              "## One W4.4A8 quantization, measured alone in a fresh process", "",
              f"Wall time {measured['wall_s']:.0f} s ("
              + ", ".join(f"{k} {v:.0f} s" for k, v in measured["seconds"].items())
              + f"), peak memory {measured['peak_bytes'] / 2**30:.2f} GiB ({measured['peak_kind']}, "
              "includes the f32 model, the data and JAX itself).", "", measured["report"]]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
