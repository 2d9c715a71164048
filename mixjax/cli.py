"""The `mixjax` command line: each subcommand parses its arguments into one keyword-only library call.

    mixjax demo                                   # embedded model: perplexity + a generated sample
    mixjax eval --model PATH [--data NAME|FILE] [--seq-len T] [--max-tokens N] [--batch-size B] [--devices N]
    mixjax generate --model PATH --prompt "..." [--chat] [--max-new-tokens N] [--temperature ...]
                    [--prefill-model PATH --switch-after N] [--tensor-parallel N]
    mixjax quantize --out DIR [--model PATH] [--bits 4.4] [--samples N] [--seq-len T] [--salience ...]
    mixjax ablate salience|activations|progressive|prompt-scales|kv-cache|dequant [--model PATH] [--bits 4.4] [--out FILE.json]
    mixjax export SRC OUT|OUT.gguf [--dtype float32|bfloat16|float16|q8_0] [--dequantize] [--force]
    mixjax info PATH [--json]                     # format, config, storage, quantization, tokenizer

`--model` defaults to the embedded SmolLM2-135M-Instruct everywhere. User errors (bad paths, bad
values, unusable data or checkpoints) print one message on stderr and exit with status 2; a device out of
memory prints one line naming the options that lower the need and exits with status 1.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

from mixjax.assets import AssetError

USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, AssetError)
DTYPES = ("float32", "bfloat16")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        _check_implementation(getattr(args, "implementation", "auto"))
        args.run(args)
    except USER_ERRORS as e:  # ConfigError, ConvertError and DataError are ValueErrors
        print(f"mixjax {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mixjax {args.command}: interrupted", file=sys.stderr)
        return 130
    except RuntimeError as e:  # jax.errors.JaxRuntimeError; only a device out of memory is answered here
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        first = str(e).strip().splitlines()[0]
        print(f"mixjax {args.command}: error: the device ran out of memory ({first}); "
              f"{OOM_HINTS.get(args.command, 'use a smaller batch or model')}", file=sys.stderr)
        return 1
    return 0


OOM_HINTS = {  # the fix a command's options offer; a checkpoint is written atomically, so none was left half-written
    "quantize": "lower --batch-size (calibration samples per forward/backward), or with several devices split the "
                "float weights over them with --shard-weights; no checkpoint was written",
    "eval": "lower --batch-size or --seq-len, or with several devices split a float model with --shard-weights",
    "generate": "use a shorter --max-new-tokens, store the KV cache in int8 with --kv-int8, or split the model over "
                "several devices with --tensor-parallel N",
    "ablate": "lower --batch-size, --seq-len or --eval-seq-len",
    "demo": "run it on the CPU (JAX_PLATFORMS=cpu)",
}
OOM_HINTS["convert"] = OOM_HINTS["quantize"]


def _check_implementation(implementation: str) -> None:
    """Refuses a GPU-only setting before any loading, so the user learns it in a second, not after minutes."""
    if implementation != "pallas":
        return
    import jax

    if jax.default_backend() != "gpu":
        raise ValueError(
            f"--implementation pallas runs the Pallas GPU kernels, but JAX's backend here is "
            f"{jax.default_backend()!r}: use --implementation auto (XLA on CPU), or install jax with CUDA "
            "(pip install -e '.[cuda]') on a machine with an NVIDIA GPU"
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mixjax", description="MixLLM mixed-precision quantization of Llama-family models in JAX.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in COMMANDS:
        register(sub)
    return parser


# ------------------------------------------------------------------------------------------------
# Shared options


def _model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, metavar="PATH",
                   help="Hugging Face directory, .gguf file or mixjax checkpoint (default: the embedded model)")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="parameter dtype (default: float32)")
    p.add_argument("--implementation", choices=("auto", "xla", "pallas"), default="auto",
                   help="linear-layer implementation (default: auto = Pallas on GPU, XLA elsewhere)")
    p.add_argument("--quiet", action="store_true", help="print only the result")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return value


def _nonnegative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is a negative count")
    return value


def _jnp_dtype(name: str):
    import jax.numpy as jnp

    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16, "int8": jnp.int8}[name]


# ------------------------------------------------------------------------------------------------
# eval


def _register_eval(sub) -> None:
    p = sub.add_parser("eval", help="perplexity of a model on a text corpus")
    _model_options(p)
    p.add_argument("--data", default="wikipedia", metavar="NAME|FILE",
                   help="wikipedia (default), owt, wikitext2, c4 (online), or a .txt/.jsonl file")
    p.add_argument("--seq-len", type=_positive_int, default=2048, help="tokens per window (default 2048)")
    p.add_argument("--max-tokens", type=_positive_int, default=None, help="evaluate at most this many tokens")
    p.add_argument("--batch-size", type=_positive_int, default=4, help="windows per forward pass (default 4)")
    p.add_argument("--devices", default="all", metavar="N|all",
                   help="local devices each batch is split over, the model replicated on each (default all)")
    p.add_argument("--shard-weights", action="store_true",
                   help="split a float model's weights over those devices too (FSDP: each holds 1/N of them), "
                        "loading them straight into their slices: for a model one device cannot hold")
    p.set_defaults(run=_run_eval)


def _run_eval(args) -> None:
    from mixjax.evaluate import evaluate_model
    from mixjax.parallel import parse_devices

    result = evaluate_model(model_path=args.model, data=args.data, seq_len=args.seq_len,
                            max_tokens=args.max_tokens, batch_size=args.batch_size, dtype=_jnp_dtype(args.dtype),
                            implementation=args.implementation, progress=not args.quiet,
                            devices=parse_devices(args.devices), shard_weights=args.shard_weights)
    if args.quiet:
        print(f"{result['perplexity']:.4f}")
    else:
        print(f"perplexity {result['perplexity']:.4f} on {result['windows']} windows of {result['seq_len']} "
              f"tokens of {result['data']} ({result['model']})")


# ------------------------------------------------------------------------------------------------
# generate


def _register_generate(sub) -> None:
    p = sub.add_parser("generate", help="continue a prompt, streaming the text")
    _model_options(p)
    p.add_argument("--prompt", required=True, help="the text to continue")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    p.add_argument("--max-new-tokens", type=_positive_int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kv-int8", action="store_true",
                   help="int8 KV cache (one scale per row, head and position): half the cache memory; on an H100, "
                        "W4.4A8 decode +2.5%% tokens/s at batch 32, -1.8%% at batch 1")
    p.add_argument("--int8-prefill", action="store_true",
                   help="quantized model on a Hopper GPU: also hold the weights as int8 for the prompt (one more byte "
                        "a weight, no unpack pass before the first token)")
    p.add_argument("--prefill-scales", choices=("group", "token", "selective"), default=None,
                   help="quantized model: the prompt's int8 activation scales, one per token and group of 128 "
                        "(group, MixLLM's, the default), one per token (token), or one per token in o_proj and "
                        "gate/up only (selective: the prompt's GEMMs faster at no measured accuracy cost; with "
                        "--int8-prefill 1.36x bf16 on an H100). Decoding keeps per-group scales. Hopper GPUs "
                        "only: elsewhere prompts keep per-group scales and token / selective are refused")
    p.add_argument("--prefill-model", default=None, metavar="PATH",
                   help="progressive precision: another quantization of the same model (e.g. W8A8) that runs the "
                        "prompt and the first --switch-after decoded tokens; --model runs the rest")
    p.add_argument("--switch-after", type=_nonnegative_int, default=0, metavar="N",
                   help="with --prefill-model: decoded tokens it runs before --model takes over (default 0)")
    p.add_argument("--tensor-parallel", default="1", metavar="N|all",
                   help="split the model over N local devices (heads and MLP features; default 1). With more than "
                        "one, the text is printed at the end")
    p.add_argument("--sync-every", type=_positive_int, default=None, metavar="K",
                   help="decode K tokens between looks from the host (to stop at EOS and print the text; the first "
                        "token at once): default 8 on a GPU, where each look stalls it, 1 on the CPU")
    p.add_argument("--stats", action="store_true",
                   help="print on stderr how long generating took: compiling, the first token, decode tokens/s")
    p.set_defaults(run=_run_generate)


def _run_generate(args) -> None:
    from mixjax.generate import generate_text
    from mixjax.parallel import parse_devices

    stream = _stdout_stream()
    stats = []  # the call's GenerationStats, with --stats
    generate_text(model_path=args.model, prompt=args.prompt, chat=args.chat, max_new_tokens=args.max_new_tokens,
                  temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                  dtype=_jnp_dtype(args.dtype), implementation=args.implementation, on_text=stream,
                  cache_dtype=_jnp_dtype("int8") if args.kv_int8 else None, int8_prefill=args.int8_prefill,
                  prefill_model_path=args.prefill_model, switch_after=args.switch_after,
                  prefill_scales=args.prefill_scales, sync_every=args.sync_every,
                  tensor_parallel=parse_devices(args.tensor_parallel, option="--tensor-parallel"),
                  on_stats=stats.append if args.stats else None)
    print(flush=True)
    for record in stats:
        print(record.summary(), file=sys.stderr, flush=True)


def _stdout_stream() -> Callable[[str], None]:
    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    return write


# ------------------------------------------------------------------------------------------------
# demo


def _register_demo(sub) -> None:
    p = sub.add_parser("demo", help="embedded model: perplexity on Wikipedia passages and a generated sample")
    _model_options(p)
    p.add_argument("--seq-len", type=_positive_int, default=512)
    p.add_argument("--max-tokens", type=_positive_int, default=4096)
    p.add_argument("--prompt", default="What is the capital of France? Answer in one sentence.")
    p.add_argument("--max-new-tokens", type=_positive_int, default=48)
    p.add_argument("--calib-samples", type=int, default=8, help="W4.4A8 calibration samples (0: no quantization)")
    p.add_argument("--calib-seq-len", type=_positive_int, default=256, help="tokens per calibration sample")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="where the demo saves its W4.4A8 checkpoint (default: $MIXJAX_CACHE/demo/MODEL-w4.4a8)")
    p.set_defaults(run=_run_demo)


def _run_demo(args) -> None:
    demo(model_path=args.model, seq_len=args.seq_len, max_tokens=args.max_tokens, prompt=args.prompt,
         max_new_tokens=args.max_new_tokens, dtype=_jnp_dtype(args.dtype), implementation=args.implementation,
         quiet=args.quiet, calib_samples=args.calib_samples, calib_seq_len=args.calib_seq_len, out=args.out)


def demo(*, model_path=None, seq_len: int = 512, max_tokens: int = 4096, prompt: str,
         max_new_tokens: int = 48, dtype=None, implementation="auto", quiet: bool = False,
         calib_samples: int = 8, calib_seq_len: int = 256, out=None) -> dict:
    """Loads the model once, prints its perplexity on the Wikipedia passages and one chat answer.

    With calib_samples > 0 it also quantizes (RTN W4A8 and MixLLM W4.4A8, perplexities printed), saves the
    W4.4A8 checkpoint to `out` (default: the cache's demo folder) and generates from the checkpoint."""
    import jax
    import jax.numpy as jnp

    import convert
    from mixjax import assets, data
    from mixjax.evaluate import perplexity
    from mixjax.generate import TextStream, encode_prompt, generate

    log = (lambda s: None) if quiet else (lambda s: print(s, flush=True))
    path = assets.resolve_model_path(model_path)
    log(f"model: {path}  (jax {jax.__version__}, {jax.devices()[0].device_kind})")
    tokenizer = convert.load_tokenizer(path)
    windows = data.eval_windows(tokenizer, "wikipedia", seq_len, max_tokens)  # [N, T]
    ids = encode_prompt(tokenizer, prompt, chat=bool(getattr(tokenizer, "chat_template", None)))
    cfg, params = convert.load(path, dtype=dtype or jnp.float32)
    log(f"loaded: {cfg.num_hidden_layers} layers, d={cfg.hidden_size}, vocab {cfg.vocab_size}")
    ppl = perplexity(params, cfg, windows, batch_size=2, implementation=implementation, progress=not quiet)
    log(f"perplexity on {windows.shape[0]}×{seq_len} tokens of Wikipedia passages: {ppl:.3f}")
    quantized = {}
    if calib_samples > 0:
        from mixjax.quant.demo import quantized_demo

        out = out or assets.cache_dir() / "demo" / f"{Path(path).stem}-w4.4a8"
        params, quantized = quantized_demo(params, cfg, tokenizer, windows, samples=calib_samples,
                                           seq_len=calib_seq_len, out=out, implementation=implementation,
                                           progress=not quiet, log=log)
    log(f"prompt: {prompt}")
    eos = sorted(set(cfg.eos_token_ids) | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()))
    write = _stdout_stream() if not quiet else (lambda s: None)
    stream = TextStream(tokenizer, write)
    from mixjax.model import fuse_projections

    # one sequence: the stored row-major codes (its one-row GEMV reads them faster than the tiled order)
    new = generate(fuse_projections(params, tile=False), cfg, [ids], max_new_tokens=max_new_tokens, eos_token_ids=eos,
                   implementation=implementation, on_token=stream)[0]
    stream.flush()
    log("")
    return {"perplexity": ppl, "sample": tokenizer.decode(new, skip_special_tokens=True), **quantized}


def _register_quantize(sub) -> None:
    from mixjax.quant.cli import register  # `mixjax quantize` lives with the quantizer

    register(sub)


def _register_convert(sub) -> None:
    from mixjax.quant.cli import register_convert  # `mixjax convert SRC OUT` = quantize + save

    register_convert(sub)


def _register_ablate(sub) -> None:
    from mixjax.quant.cli import register_ablate  # `mixjax ablate STUDY`: MixLLM's choices against alternatives

    register_ablate(sub)


# ------------------------------------------------------------------------------------------------
# export


def _register_export(sub) -> None:
    p = sub.add_parser("export", help="write a model as a Hugging Face directory or a GGUF file",
                       description="Reads SRC (Hugging Face directory, .gguf file or mixjax checkpoint) and writes "
                                   "OUT: a Hugging Face directory (config.json + safetensors) that transformers' "
                                   "from_pretrained reads, or, when OUT ends in .gguf, a GGUF file that llama.cpp "
                                   "reads. mixjax loads both.")
    p.add_argument("src", metavar="SRC", help="Hugging Face directory, .gguf file or mixjax checkpoint")
    p.add_argument("out", metavar="OUT", help="the Hugging Face model directory, or the .gguf file, to write")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16", "q8_0"), default="float32",
                   help="type of the written weights (default float32: every source loads through it exactly); "
                        "q8_0 (llama.cpp's 8-bit blocks of 32) for a .gguf OUT only")
    p.add_argument("--dequantize", action="store_true",
                   help="SRC is a quantized mixjax checkpoint: write its dequantized weights (the weight "
                        "quantization only: a float model has no int8 activations)")
    p.add_argument("--force", action="store_true", help="replace an existing OUT")
    p.add_argument("--quiet", action="store_true", help="print nothing on success")
    p.set_defaults(run=_run_export)


def _run_export(args) -> None:
    import jax
    import jax.numpy as jnp

    import convert
    from mixjax.linear import QuantizedLinear
    from mixjax.quant.fakequant import dequantize_params

    out = Path(args.out).expanduser()
    to_gguf = out.suffix == ".gguf"
    if args.dtype == "q8_0" and not to_gguf:
        raise ValueError("--dtype q8_0 is a GGUF type: name OUT *.gguf, or pick float32, bfloat16 or float16")
    if out.exists() and not args.force:
        raise FileExistsError(f"{out} already exists; pass --force to replace it or choose another OUT")
    cfg, params = convert.load(args.src, dtype=jnp.float32)
    quantized = any(isinstance(leaf, QuantizedLinear)
                    for leaf in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, QuantizedLinear)))
    if quantized != args.dequantize:
        raise ValueError(f"{args.src} is a quantized mixjax checkpoint: pass --dequantize to write its dequantized "
                         "weights (its int8 activation rounding is not part of a float model)" if quantized else
                         f"--dequantize: {args.src} holds float weights already; drop --dequantize")
    if quantized:
        params = dequantize_params(params)
    try:
        tokenizer = convert.load_tokenizer(args.src)
    except ValueError as e:  # the weights are still worth writing; say what is missing
        tokenizer = None
        print(f"mixjax export: no tokenizer written ({e})", file=sys.stderr)
    if to_gguf:
        written = convert.save_gguf(out, params, cfg, dtype=args.dtype, tokenizer=tokenizer, force=args.force)
        what = f"GGUF ({convert.gguf_arch(cfg)}), {args.dtype} weights, {written.stat().st_size / 1e6:.1f} MB"
    else:
        written = convert.save_hf(out, params, cfg, dtype=_jnp_dtype(args.dtype), tokenizer=tokenizer,
                                  force=args.force)
        files = sorted(f.name for f in written.glob("*.safetensors"))
        what = (f"{cfg.to_hf()['architectures'][0]}, {args.dtype} weights in {len(files)} safetensors "
                f"file{'s' if len(files) > 1 else ''}")
    if not args.quiet:
        print(f"wrote {written}: {what}{', tokenizer' if tokenizer is not None else ''}")


# ------------------------------------------------------------------------------------------------
# info


def _register_info(sub) -> None:
    p = sub.add_parser("info", help="what a model path holds (format, config, storage, quantization, tokenizer)",
                       description="Describes a Hugging Face directory, .gguf file or mixjax checkpoint from its "
                                   "metadata, without loading the weights.")
    p.add_argument("path", metavar="PATH", help="Hugging Face directory, .gguf file or mixjax checkpoint")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(run=_run_info)


def _run_info(args) -> None:
    import json

    from mixjax.info import model_info, to_text

    info = model_info(args.path)
    print(json.dumps(info.to_dict(), indent=2) if args.json else to_text(info))


# Subcommands, in help order. Later commands (quantize, convert) add their register function here, one line each.
COMMANDS: tuple[Callable, ...] = (
    _register_demo,
    _register_eval,
    _register_generate,
    _register_quantize,
    _register_convert,
    _register_ablate,
    _register_export,
    _register_info,
)


if __name__ == "__main__":
    sys.exit(main())
