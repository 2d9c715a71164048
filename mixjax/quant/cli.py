"""The `mixjax quantize` subcommand (registered by `mixjax.cli`): parses into `quantize_model(...)`."""

from __future__ import annotations

import argparse

SALIENCE_CHOICES = ("fisher", "diag", "first-order-off", "hvp", "local")


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
    p.add_argument("--seed", type=int, default=0, help="calibration sampling seed")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out directory")
    p.add_argument("--quiet", action="store_true", help="no progress bars, no report")


def run(args) -> None:
    from mixjax.quant.api import QuantConfig
    from mixjax.quant.pipeline import quantize_model

    for name in ("samples", "seq_len", "batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    if args.seq_len < 2:
        raise ValueError("--seq-len must be at least 2 (the LM loss needs a next token)")
    local = args.salience == "local"
    config = QuantConfig(bits=args.bits, budget=args.budget, salience="fisher" if local else args.salience,
                         local=local, gptq=args.gptq, clip=args.clip, batch_size=args.batch_size,
                         head_bits=args.head_bits)
    quantize_model(model_path=args.model, out=args.out, config=config, data=args.data, samples=args.samples,
                   seq_len=args.seq_len, seed=args.seed, force=args.force, progress=not args.quiet,
                   log=(lambda *_: None) if args.quiet else print)
