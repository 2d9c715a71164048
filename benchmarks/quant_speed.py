"""Wall time and peak memory of a full MixLLM W4.4A8 quantization of a random-weight model.

    python benchmarks/quant_speed.py --shape llama3-8b --samples 128 --seq-len 2048   # on one GPU
    python benchmarks/quant_speed.py --shape tiny                                    # smoke test
    python benchmarks/quant_speed.py --devices 8 --shard-weights --dtype float32     # several GPUs, FSDP weights

Random weights (std 0.02, bf16) and random calibration tokens: the cost does not depend on the values.
Prints the QuantReport (wall time per phase includes JIT compilation; peak device memory).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from mixjax import model
from mixjax.config import LlamaConfig
from mixjax.parallel import data_mesh, weight_shardings
from mixjax.quant import QuantConfig, quantize

SHAPES = {
    "llama3-8b": LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                             num_attention_heads=32, num_key_value_heads=8, head_dim=128, rope_theta=500000.0,
                             max_position_embeddings=8192),
    "llama3-70b": LlamaConfig(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                              num_attention_heads=64, num_key_value_heads=8, head_dim=128, rope_theta=500000.0,
                              max_position_embeddings=8192),
    "tiny": LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=704, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=64),
}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--bits", type=float, default=4.4)
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                   help="the weights' dtype (the CLIs load float32)")
    p.add_argument("--layers-form", choices=("stacked", "tuple"), default="stacked",
                   help="stacked (as convert.load gives them; since 2026-12-06 the salience pass scans them, each "
                        "layer's delta in its iteration) or a tuple of layers (every delta held; the 2026-11-23 table)")
    p.add_argument("--layers", type=int, default=0, help="decoder layers (default: the shape's)")
    p.add_argument("--devices", type=int, default=1, help="local devices the calibration samples are split over")
    p.add_argument("--shard-weights", action="store_true",
                   help="with --devices > 1: the float weights split over them too (FSDP, `mixjax.shard_weights`), "
                        "created in place")
    args = p.parse_args(argv)
    cfg = dataclasses.replace(SHAPES[args.shape], num_hidden_layers=args.layers or SHAPES[args.shape].num_hidden_layers)
    dev = jax.devices()[0]
    mesh = data_mesh(args.devices) if args.devices > 1 else None
    print(f"jax {jax.__version__}, {dev.device_kind}; shape {args.shape} ({cfg.num_hidden_layers} layers); "
          f"calibration {args.samples}×{args.seq_len}, batch {args.batch_size}; {args.devices} device(s)"
          + (", FSDP weights" if mesh is not None and args.shard_weights else ""), flush=True)
    t = time.perf_counter()
    init = functools.partial(model.init_params, cfg, jax.random.key(0), jnp.dtype(args.dtype))
    if mesh is not None and args.shard_weights:  # each device creates its slices: never whole on one device
        params = jax.jit(init, out_shardings=weight_shardings(jax.eval_shape(init), mesh))()
    else:
        params = init()
    if args.layers_form == "tuple":
        params = model.unstack_layers(params)
    jax.block_until_ready(params)
    print(f"random {args.dtype} params ({args.layers_form} layers) in {time.perf_counter() - t:.0f} s", flush=True)
    rng = np.random.default_rng(0)
    calib = [rng.integers(0, cfg.vocab_size, (args.batch_size, args.seq_len), dtype=np.int32)
             for _ in range(args.samples // args.batch_size)]
    config = QuantConfig(bits=args.bits, batch_size=args.batch_size)
    t = time.perf_counter()
    qparams, report = quantize(params, calib, cfg, config=config, return_report=True, progress=True, mesh=mesh)
    jax.block_until_ready(qparams)
    print(f"W{args.bits:g}A8 quantization wall time {time.perf_counter() - t:.1f} s", flush=True)
    print(report, flush=True)


if __name__ == "__main__":
    main()
