"""Memory of MixLLM's salience pass (the probe gradient over every decoder linear) at a Llama-3-8B shape.

The salience pass is the one step of `mixjax quantize` that holds the whole model on a device. This prints XLA's
compiled memory analysis of `salience.probe_terms` (arguments, temporaries) for its three forms, without allocating
the model: stacked layers under `lax.scan` with each layer's Δ = RTN4(w) − w computed in its iteration (what
`quantize` runs on the params `convert.load` gives), and a tuple of layers with every Δ held (`HOLD_DELTAS`) or
computed in each layer. With `--run FORM` it also runs one batch of random tokens on random weights in that form in
this process and reports the device's peak bytes in use.

    python benchmarks/salience_memory.py --layers 32 --dtype float32 --batch 1 --seq-len 2048 [--run stacked|held|inlayer]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from mixjax import model  # noqa: E402
from mixjax.quant import salience  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from bench_generate import LLAMA3_8B  # noqa: E402

GIB = 2**30
FORMS = ("stacked", "held", "inlayer")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--run", choices=FORMS, default=None, help="also run one batch in this form")
    args = ap.parse_args()
    cfg = dataclasses.replace(LLAMA3_8B, num_hidden_layers=args.layers)
    dtype = jnp.dtype(args.dtype)
    dev = jax.devices()[0]
    limit = (dev.memory_stats() or {}).get("bytes_limit") if hasattr(dev, "memory_stats") else None
    print(f"device: {dev.device_kind} ({dev.platform}), jax {jax.__version__}, memory limit "
          f"{'—' if limit is None else f'{limit / GIB:.1f} GiB'}; Llama-3-8B shape, {args.layers} layers, {args.dtype}, "
          f"{args.batch} × {args.seq_len} tokens")
    shapes = jax.eval_shape(lambda: model.init_params(cfg, jax.random.PRNGKey(0), dtype))
    rest = {k: v for k, v in shapes.items() if k != "layers"}
    tuple_layers = jax.eval_shape(model.unstack_layers, shapes)["layers"]
    tokens = jax.ShapeDtypeStruct((args.batch, args.seq_len), jnp.int32)
    print("| form | arguments GiB | temporaries GiB | total GiB | compile s |\n|---|---|---|---|---|")
    for form, layers, deltas in (("stacked", shapes["layers"], None),
                                 ("held", tuple_layers, jax.eval_shape(salience.rtn4_deltas, tuple_layers)),
                                 ("inlayer", tuple_layers, None)):
        t = time.perf_counter()
        m = salience.probe_terms.lower(rest, layers, tokens, cfg=cfg, deltas=deltas).compile().memory_analysis()
        a, tmp = m.argument_size_in_bytes / GIB, m.temp_size_in_bytes / GIB
        print(f"| {form} | {a:.2f} | {tmp:.2f} | {a + tmp:.2f} | {time.perf_counter() - t:.1f} |", flush=True)
    if args.run:
        params = model.init_params(cfg, jax.random.PRNGKey(0), dtype)
        if args.run != "stacked":
            params = model.unstack_layers(params)  # the stacked arrays are dropped here
        layers, rest = params["layers"], {k: v for k, v in params.items() if k != "layers"}
        deltas = salience.rtn4_deltas(layers) if args.run == "held" else None
        ids = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (args.batch, args.seq_len)), jnp.int32)
        t = time.perf_counter()
        u, _ = salience.probe_terms(rest, layers, ids, cfg=cfg, deltas=deltas)
        jax.block_until_ready(u)
        peak = (dev.memory_stats() or {}).get("peak_bytes_in_use", 0) / GIB
        finite = all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(u))
        print(f"ran {args.run}: {time.perf_counter() - t:.1f} s with compile, peak {peak:.2f} GiB in use, "
              f"terms finite: {finite}")


if __name__ == "__main__":
    main()
