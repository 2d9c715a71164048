"""Per-token activation scales for the prompt only: their accuracy cost against MixLLM's per-group scales, with a
paired standard error over the evaluation windows (CPU, embedded model). `mixjax ablate prompt-scales` runs the
token and selective rows for any model; this script also prices each linear kind alone (`--by-linear`).

    MIXJAX_CACHE=... PYTHONPATH=. python benchmarks/prefill_scales.py          # ≈ 10 min on 2 cores

Why: the prefill GEMM runs 12 % faster with one activation scale a row (`mgpu.PREFILL_ACT_SCALE = "token"`,
NOTES-kernels.md item 91). Session 27 measured that scheme at 28.60 perplexity over the decoded tokens against
MixLLM's 28.50 (results/accuracy.md), without saying whether 0.10 is more than the windows' own spread. Here both
schemes run on the same quantization and the same windows, one window at a time. So each window gives a paired
difference of mean NLL over its decoded tokens, and the spread of those differences gives the standard error.

`--by-linear` adds one scheme per linear kind: per-token scales for the prompt in that kind's GEMMs only (q/k/v,
o_proj, gate/up, down_proj), per group everywhere else, to see where the cost comes from, and the "selective" scheme
(o_proj and gate/up); `--selective` adds that one alone. `--eval-tokens 32768 --skip-windows 32` evaluates on the
32 windows after the default ones (held out from the choice of the selective scheme).

Setting as session 27's: MixLLM W4.4A8 (16 × 512 OpenWebText tokens), 32 Wikipedia windows of 512 tokens, a
128-token prompt, 384 teacher-forced decoded tokens through one KV cache (`evaluate.phased_nll`), the kernels'
activation rounding simulated (`as_fake_quant`).
"""

from __future__ import annotations

import argparse
import datetime
import math
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import convert
from mixjax import assets, data
from mixjax.evaluate import phased_nll
from mixjax.quant import ActFormat, QuantConfig, as_fake_quant, quantize
from mixjax.quant.ablate import with_token_scales


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--eval-seq-len", type=int, default=512)
    p.add_argument("--eval-tokens", type=int, default=16384)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--by-linear", action="store_true", help="also per-token prompt scales in one linear kind at a time")
    p.add_argument("--selective", action="store_true", help="also the selective scheme alone (o_proj and gate/up)")
    p.add_argument("--skip-windows", type=int, default=0,
                   help="leave out the first N evaluation windows (with --eval-tokens raised: held-out windows)")
    args = p.parse_args(argv)

    path = assets.embedded_model_path()
    tokenizer = convert.load_tokenizer(path)
    cfg, params = convert.load(path, dtype=jnp.float32)
    calib = data.calibration_batches(tokenizer, "owt", n_samples=args.samples, seq_len=args.seq_len, seed=0,
                                     batch_size=4)
    windows = data.eval_windows(tokenizer, "wikipedia", args.eval_seq_len, args.eval_tokens)[args.skip_windows:]
    n, T = windows.shape
    t = time.perf_counter()
    qp = quantize(params, calib, cfg, config=QuantConfig(bits=4.4, batch_size=4))
    print(f"W4.4A8 quantized in {time.perf_counter() - t:.0f} s", flush=True)
    group, token = as_fake_quant(qp), as_fake_quant(qp, act=ActFormat(granularity="token"))
    schemes = {"float model": [(params, T)],
               "per (token, group of 128) throughout (MixLLM)": [(group, T)],
               "per token for the prompt, per group for decoding": [(token, args.prompt), (group, T)]}
    kinds = [("q/k/v", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
             ("o_proj", ("self_attn.o_proj",)), ("gate/up", ("mlp.gate_proj", "mlp.up_proj")),
             ("down_proj", ("mlp.down_proj",))] if args.by_linear else []
    if args.by_linear or args.selective:
        kinds.append(("o_proj and gate/up (`PREFILL_ACT_SCALE = \"selective\"`)",
                      ("self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj")))
        for kind, names in kinds:
            prompt_params = with_token_scales(group, token, names)
            schemes[f"per token for the prompt in {kind} only"] = [(prompt_params, args.prompt), (group, T)]
    nll = {}  # scheme → [windows, decoded positions]
    for name, phases in schemes.items():
        t = time.perf_counter()
        nll[name] = np.stack([phased_nll(phases, cfg, windows[i:i + 1], prompt=args.prompt, batch_size=1)
                              for i in range(n)])
        print(f"{name}: perplexity {math.exp(nll[name].mean()):.3f} ({time.perf_counter() - t:.0f} s)", flush=True)

    fp, base = (nll[k] for k in list(schemes)[:2])
    rise = math.exp(base.mean()) - math.exp(fp.mean())
    ppl = math.exp(base.mean())
    dev = jax.devices()[0]
    print(f"\n{datetime.date.today()}, {dev.platform}, jax {jax.__version__}; {n} windows × {T} tokens, prompt "
          f"{args.prompt}\n")
    print("| activation scales | perplexity, decoded tokens | × MixLLM's increase |")
    print("|---|---|---|")
    for name, v in nll.items():
        ratio = "—" if v is fp else f"{(math.exp(v.mean()) - math.exp(fp.mean())) / rise:.2f}"
        print(f"| {name} | {math.exp(v.mean()):.3f} | {ratio} |")
    print("\nPaired over windows, against MixLLM (mean NLL ± standard error; ≈ perplexity):")
    for name in list(schemes)[2:]:
        d = nll[name].mean(axis=1) - base.mean(axis=1)  # a window each
        se = d.std(ddof=1) / math.sqrt(n)
        print(f"- {name}: {d.mean():+.5f} ± {se:.5f}, ≈ {ppl * d.mean():+.3f} ± {ppl * se:.3f} perplexity, "
              f"{d.mean() / se:+.1f} standard errors; {int((d > 0).sum())} of {n} windows worse")
    return 0


if __name__ == "__main__":
    sys.exit(main())
