"""The `mixjax quantize` subcommand (registered by `mixjax.cli`): parses into `quantize_model(...)`."""

from __future__ import annotations

import argparse

SALIENCE_CHOICES = ("fisher", "diag", "first-order-off", "hvp", "local")
ACT_SCALES = ("dynamic", "static", "static-mse")  # --act-scales → ActFormat


def act_format(scales: str):
    """--act-scales → the `ActFormat` of int8 activations per group of 128."""
    from mixjax.quant.activations import ActFormat

    if scales not in ACT_SCALES:
        raise ValueError(f"--act-scales {scales!r}; expected one of {ACT_SCALES}")
    return ActFormat(static=scales != "dynamic", static_calib="mse" if scales == "static-mse" else "max")


def register(sub) -> None:
    p = sub.add_parser("quantize", help="MixLLM mixed-precision quantization (default W4.4A8) of a model")
    p.add_argument("--model", default=None, metavar="PATH",
                   help="Hugging Face directory, .gguf file or mixjax checkpoint (default: the embedded model)")
    p.add_argument("--out", required=True, metavar="DIR", help="directory of the quantized checkpoint")
    _quant_options(p)
    p.set_defaults(run=run)


def register_convert(sub) -> None:
    p = sub.add_parser("convert", help="Hugging Face directory or .gguf → quantized mixjax checkpoint (Orbax)")
    p.add_argument("src", metavar="SRC", help="Hugging Face directory or .gguf file")
    p.add_argument("out", metavar="OUT", help="directory of the quantized checkpoint (not overwritten without --force)")
    _quant_options(p)
    p.set_defaults(run=lambda args: run(argparse.Namespace(**{**vars(args), "model": args.src})))


def _quant_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bits", type=float, default=4.4,
                   help="average weight bits in [4, 8] over the decoder linears (default 4.4)")
    p.add_argument("--budget", choices=("elements", "channels"), default="elements",
                   help="count the bit budget in weight elements (exact, default) or in channels (official code)")
    p.add_argument("--data", default="owt", metavar="NAME|FILE",
                   help="calibration text: owt (default), wikipedia, wikitext2, c4 (online), or a .txt/.jsonl file")
    p.add_argument("--samples", type=int, default=128, help="calibration samples (default 128)")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per calibration sample (default 2048)")
    p.add_argument("--batch-size", type=int, default=4, help="calibration samples per forward/backward (default 4)")
    p.add_argument("--salience", choices=SALIENCE_CHOICES, default="fisher",
                   help="fisher (default): first order + full-channel Fisher; diag; first-order-off; hvp; "
                        "local: fisher scores, 8-bit channels chosen within each layer")
    p.add_argument("--gptq", action=argparse.BooleanOptionalAction, default=True, help="GPTQ (default on)")
    p.add_argument("--clip", action=argparse.BooleanOptionalAction, default=True,
                   help="clipping search (default on)")
    p.add_argument("--head-bits", type=int, choices=(4, 8), default=None,
                   help="also quantize the token embedding table and the LM head: 8 (int8 g128) or 4 (int4 asym "
                        "g128); the head then takes int8 activations like every linear (default: keep them float)")
    p.add_argument("--act-scales", choices=ACT_SCALES, default="dynamic",
                   help="int8 activation scales: dynamic, one per token and group of 128 (MixLLM, default); static, "
                        "one per group of 128 calibrated to the largest input seen, or static-mse, that maximum "
                        "clipped for the least squared error (the static-vs-dynamic ablation, on the kernels)")
    p.add_argument("--seed", type=int, default=0, help="calibration sampling seed")
    p.add_argument("--devices", default="all", metavar="N|all",
                   help="local devices the calibration samples are split over (default all; the params are "
                        "replicated on each, so each needs the memory one device would, unless --shard-weights)")
    p.add_argument("--shard-weights", action="store_true",
                   help="also split the float weights over those devices (FSDP: each holds 1/N of them and gathers "
                        "one layer at a time), loading them straight into their slices: for a model one device "
                        "cannot hold in float; slower than replicated weights where they fit")
    p.add_argument("--eval-tokens", type=int, default=0, metavar="N",
                   help="also measure the float and the quantized perplexity on N tokens of --eval-data and record "
                        "them in the checkpoint (`mixjax info` shows them; default 0: skip)")
    p.add_argument("--eval-data", default="wikipedia", metavar="NAME|FILE",
                   help="text of --eval-tokens: wikipedia (default), owt, wikitext2, c4 (online), or a file")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out directory")
    p.add_argument("--quiet", action="store_true", help="no progress bars, no report")


def _check_counts(args, names, *, windows) -> None:
    """Each option in `names` a positive integer, and each in `windows` (tokens a window) at least 2."""
    for name in names:
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    for name in windows:
        if getattr(args, name) < 2:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 2 (the LM loss needs a next token)")


def run(args) -> None:
    from mixjax.parallel import parse_devices
    from mixjax.quant.api import QuantConfig
    from mixjax.quant.pipeline import quantize_model

    _check_counts(args, ("samples", "seq_len", "batch_size"), windows=("seq_len",))
    if args.eval_tokens and args.eval_tokens < 2:
        raise ValueError(f"--eval-tokens must be 0 (skip) or at least 2, got {args.eval_tokens}")
    devices = parse_devices(args.devices)
    local = args.salience == "local"
    config = QuantConfig(bits=args.bits, budget=args.budget, salience="fisher" if local else args.salience,
                         local=local, gptq=args.gptq, clip=args.clip, batch_size=args.batch_size,
                         head_bits=args.head_bits, act=act_format(getattr(args, "act_scales", "dynamic")))
    quantize_model(model_path=args.model, out=args.out, config=config, data=args.data, samples=args.samples,
                   seq_len=args.seq_len, seed=args.seed, force=args.force, progress=not args.quiet,
                   log=(lambda *_: None) if args.quiet else print, devices=devices,
                   shard_weights=args.shard_weights, eval_tokens=args.eval_tokens,
                   eval_data=args.eval_data)



def register_ablate(sub) -> None:
    from mixjax.quant.ablate import STUDIES

    p = sub.add_parser("ablate", help="one of MixLLM's design choices against its alternatives (perplexity table)",
                       description="Quantizes the model once per alternative and prints their perplexities beside "
                                   "the float model's. Studies: "
                                   + "; ".join(f"{k}: {v.title}" for k, v in STUDIES.items()))
    p.add_argument("study", choices=tuple(STUDIES), metavar="STUDY", help=" | ".join(STUDIES))
    p.add_argument("--model", default=None, metavar="PATH",
                   help="Hugging Face directory or .gguf file of a float model (default: the embedded model)")
    p.add_argument("--bits", type=float, default=4.4, help="average weight bits in [4, 8] (default 4.4)")
    p.add_argument("--data", default="owt", metavar="NAME|FILE", help="calibration text (default owt)")
    p.add_argument("--samples", type=int, default=16,
                   help="calibration samples (default 16; the paper uses 128 × 2048 tokens)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per calibration sample (default 512)")
    p.add_argument("--eval-data", default="wikipedia", metavar="NAME|FILE", help="evaluation text (default wikipedia)")
    p.add_argument("--eval-seq-len", type=int, default=512, help="tokens per evaluation window (default 512)")
    p.add_argument("--eval-tokens", type=int, default=16384, help="evaluation tokens at most (default 16384)")
    p.add_argument("--batch-size", type=int, default=4, help="samples per forward/backward and per evaluation pass")
    p.add_argument("--seed", type=int, default=0, help="calibration sampling seed")
    p.add_argument("--high-bits", type=float, default=8.0,
                   help="progressive: the precision decoding starts at (default 8: W8A8)")
    p.add_argument("--prompt-len", type=int, default=128,
                   help="progressive, prompt-scales: tokens of each evaluation window taken as the prompt "
                        "(default 128)")
    p.add_argument("--switch-after", default="32,128", metavar="N,N",
                   help="progressive: decoded tokens before the switch to --bits, one row each (default 32,128)")
    p.add_argument("--devices", default="all", metavar="N|all",
                   help="local devices the calibration and evaluation samples are split over (default all)")
    p.add_argument("--out", default=None, metavar="FILE.json", help="also write the results as JSON")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out file")
    p.add_argument("--quiet", action="store_true", help="print only the table")
    p.set_defaults(run=run_ablate)


def run_ablate(args) -> dict:
    import json
    import os
    from pathlib import Path

    import jax.numpy as jnp

    import convert
    from mixjax import assets, data
    from mixjax.parallel import mesh_or_none, parse_devices
    from mixjax.quant.ablate import ablate, check_study, to_markdown
    from mixjax.quant.pipeline import refuse_quantized_source

    _check_counts(args, ("samples", "seq_len", "eval_seq_len", "eval_tokens", "batch_size"),
                  windows=("seq_len", "eval_seq_len"))
    try:
        switch_after = tuple(int(n) for n in args.switch_after.split(",") if n.strip())
    except ValueError:
        raise ValueError(f"--switch-after {args.switch_after!r} must be comma-separated integers, "
                         "e.g. 32,128") from None
    check_study(args.study, args.bits, high_bits=args.high_bits, prompt=args.prompt_len, seq_len=args.eval_seq_len,
                switch_after=switch_after)
    mesh = mesh_or_none(parse_devices(args.devices))
    out = Path(args.out).expanduser() if args.out else None
    if out is not None:
        if out.exists() and not args.force:
            raise ValueError(f"{out} already exists; pass --force to overwrite it or choose another --out")
        if not out.parent.is_dir():
            raise ValueError(f"--out {out}: the directory {out.parent} does not exist")
    log = (lambda *_: None) if args.quiet else (lambda s: print(s, flush=True))
    path = assets.resolve_model_path(args.model)
    refuse_quantized_source(path)  # ablate quantizes the float model itself
    tokenizer = convert.load_tokenizer(path)
    calib = data.calibration_batches(tokenizer, args.data, n_samples=args.samples, seq_len=args.seq_len,
                                     seed=args.seed, batch_size=args.batch_size)
    windows = data.eval_windows(tokenizer, args.eval_data, args.eval_seq_len, args.eval_tokens)
    cfg, params = convert.load(path, dtype=jnp.float32)
    for what, n in (("--seq-len", args.seq_len), ("--eval-seq-len", args.eval_seq_len)):
        if n > cfg.max_position_embeddings:
            raise ValueError(f"{what} {n} exceeds the model context {cfg.max_position_embeddings}")
    log(f"ablate {args.study} on {path}: calibration {args.samples}×{args.seq_len} tokens of {args.data}, "
        f"evaluation {windows.shape[0]}×{windows.shape[1]} tokens of {args.eval_data}")
    result = ablate(params, cfg, calib, windows, study=args.study, bits=args.bits, batch_size=args.batch_size,
                    eval_batch_size=args.batch_size, high_bits=args.high_bits, prompt=args.prompt_len,
                    switch_after=switch_after, progress=not args.quiet, log=log, mesh=mesh)
    result["settings"] = {"model": str(path), "data": str(args.data), "samples": args.samples,
                          "seq_len": args.seq_len, "seed": args.seed, "eval_data": str(args.eval_data),
                          "eval_windows": int(windows.shape[0]), "eval_seq_len": int(windows.shape[1])}
    print(to_markdown(result), flush=True)
    if out is not None:  # whole or not at all: a temporary file beside it, then one rename
        tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
        try:
            tmp.write_text(json.dumps(result, indent=1) + "\n")
            os.replace(tmp, out)
        finally:
            tmp.unlink(missing_ok=True)
        log(f"wrote {out}")
    return result
