"""Memory of MixLLM's salience pass (the probe gradient over every decoder linear) at a Llama-3-8B shape.

The salience pass is the one step of `mixjax quantize` that holds the whole model on a device. This prints XLA's
compiled memory analysis of `salience.probe_terms` (arguments, temporaries) for its three forms, without allocating
the model: stacked layers under `lax.scan` with each layer's Δ = RTN4(w) − w computed in its iteration (what
`quantize` runs on the params `convert.load` gives), and a tuple of layers with every Δ held (`HOLD_DELTAS`) or
computed in each layer. With `--run FORM` it also runs one batch of random tokens on random weights in that form in
this process and reports the device's peak bytes in use.

    python benchmarks/salience_memory.py --layers 32 --dtype float32 --batch 1 --seq-len 2048 [--run stacked|held|inlayer]

With `--devices N` (N simulated CPU devices with `--cpu-devices N`) it compares the stacked form with its params
replicated on each device against the same params split FSDP-style (`mixjax.shard_weights`), the batch split
over the devices in both; the numbers are per device. `--shape 70b` takes Llama-3-70B's dimensions.

    python benchmarks/salience_memory.py --cpu-devices 8 --devices 8 --shape 70b --dtype bfloat16 --batch 8
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
if "--cpu-devices" in sys.argv:  # before jax starts: XLA reads the host device count once
    _n = sys.argv[sys.argv.index("--cpu-devices") + 1]
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={_n}"
    os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from mixjax import model  # noqa: E402
from mixjax.quant import salience  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from bench_generate import LLAMA3_8B  # noqa: E402

LLAMA3_70B = dataclasses.replace(LLAMA3_8B, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                                 num_attention_heads=64, num_key_value_heads=8)

GIB = 2**30
FORMS = ("stacked", "held", "inlayer")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=0, help="decoder layers (default: the shape's)")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--run", choices=FORMS, default=None, help="also run one batch in this form")
    ap.add_argument("--forms", default=",".join(FORMS), help="forms to analyse, comma-separated (default all three)")
    ap.add_argument("--shape", choices=("8b", "70b"), default="8b", help="Llama-3-8B's or Llama-3-70B's dimensions")
    ap.add_argument("--devices", type=int, default=1, help="> 1: replicated against FSDP params over this many")
    ap.add_argument("--cpu-devices", type=int, default=None, help="simulate this many CPU devices")
    args = ap.parse_args()
    base = LLAMA3_70B if args.shape == "70b" else LLAMA3_8B
    cfg = dataclasses.replace(base, num_hidden_layers=args.layers or base.num_hidden_layers)
    dtype = jnp.dtype(args.dtype)
    dev = jax.devices()[0]
    limit = (dev.memory_stats() or {}).get("bytes_limit") if hasattr(dev, "memory_stats") else None
    print(f"device: {dev.device_kind} ({dev.platform}), jax {jax.__version__}, memory limit "
          f"{'—' if limit is None else f'{limit / GIB:.1f} GiB'}; Llama-3-{args.shape} shape, "
          f"{cfg.num_hidden_layers} layers, {args.dtype}, {args.batch} × {args.seq_len} tokens")
    shapes = jax.eval_shape(lambda: model.init_params(cfg, jax.random.PRNGKey(0), dtype))
    if args.devices > 1:
        return compare_fsdp(cfg, shapes, args)
    rest = {k: v for k, v in shapes.items() if k != "layers"}
    tuple_layers = jax.eval_shape(model.unstack_layers, shapes)["layers"]
    tokens = jax.ShapeDtypeStruct((args.batch, args.seq_len), jnp.int32)
    print("| form | arguments GiB | temporaries GiB | total GiB | compile s |\n|---|---|---|---|---|")
    for form, layers, deltas in (("stacked", shapes["layers"], None),
                                 ("held", tuple_layers, jax.eval_shape(salience.rtn4_deltas, tuple_layers)),
                                 ("inlayer", tuple_layers, None)):
        if form not in args.forms.split(","):
            continue
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


def compare_fsdp(cfg, shapes, args) -> None:
    """Per device: the stacked salience pass with its params replicated, and split by `shard_weights`."""
    from jax.sharding import NamedSharding, PartitionSpec

    from mixjax.parallel import DATA_AXIS, data_mesh, weight_shardings

    mesh = data_mesh(args.devices)
    tokens = jax.ShapeDtypeStruct((args.batch, args.seq_len), jnp.int32,
                                  sharding=NamedSharding(mesh, PartitionSpec(DATA_AXIS)))
    replicated = jax.tree.map(lambda s: NamedSharding(mesh, PartitionSpec()), shapes)
    print(f"{mesh.size} devices ({mesh.devices.flat[0].platform}), per device:")
    print("| params | arguments GiB | temporaries GiB | total GiB | compile s |\n|---|---|---|---|---|")
    for name, placement in (("replicated", replicated), ("fsdp", weight_shardings(shapes, mesh))):
        placed = jax.tree.map(lambda s, p: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=p), shapes, placement)
        rest = {k: v for k, v in placed.items() if k != "layers"}
        t = time.perf_counter()
        m = salience.probe_terms.lower(rest, placed["layers"], tokens, cfg=cfg).compile().memory_analysis()
        a, tmp = m.argument_size_in_bytes / GIB, m.temp_size_in_bytes / GIB
        print(f"| {name} | {a:.2f} | {tmp:.2f} | {a + tmp:.2f} | {time.perf_counter() - t:.1f} |", flush=True)


if __name__ == "__main__":
    main()
