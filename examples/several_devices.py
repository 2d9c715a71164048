"""Several devices: quantize with the calibration samples and the float weights split over them, evaluate the
quantized model with the samples split, then generate with the model itself split over them (tensor parallel).

    python examples/several_devices.py                  # every local device (GPUs, or one CPU)
    python examples/several_devices.py --cpu-devices 3  # three simulated CPU devices (the embedded model's 9
                                                        # heads and 3 KV heads split 3 ways; 2 CPU cores: ≈ 4 min)

The results equal one device's up to summation order (tests/test_parallel.py checks that).
"""

import argparse
import os


def main(cpu_devices: int | None = None) -> None:
    if cpu_devices:  # must precede jax's start: XLA reads it once
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={cpu_devices}"
        os.environ["JAX_PLATFORMS"] = "cpu"
    import jax
    import jax.numpy as jnp

    import convert
    import mixjax

    path = mixjax.embedded_model_path()
    data = mixjax.data_mesh()
    # The float weights split over the devices (FSDP): each holds 1/N of them, read straight into its slice. For
    # a model one device cannot hold; drop mesh= to replicate them (faster where they fit, the same result).
    cfg, params = convert.load(path, dtype=jnp.float32, mesh=data)
    tokenizer = convert.load_tokenizer(path)
    print(f"{len(jax.local_devices())} devices: {jax.local_devices()}")

    # Data parallel: each batch of calibration samples split over the devices.
    calib = mixjax.calibration_batches(tokenizer, n_samples=6, seq_len=256, batch_size=len(data.devices.flat))
    qparams = mixjax.quantize(params, calib, cfg, config=mixjax.QuantConfig(bits=4.4), mesh=data)
    windows = mixjax.eval_windows(tokenizer, "wikipedia", 256, 2048)
    print(f"W4.4A8 perplexity {mixjax.perplexity(qparams, cfg, windows, mesh=data):.3f}")

    # Tensor parallel: each device holds its heads and MLP features of every layer. A quantized model splits the
    # inputs of o_proj and down_proj at groups of 128 (Llama-3-8B: 4096 and 14336 over 2, 4 or 8 devices); the
    # embedded model's 576 attention features do not split that way, so it shows the float model instead.
    model = mixjax.model_mesh()
    try:
        sharded = mixjax.shard_model(qparams, cfg, model)
    except ValueError as e:
        print(f"quantized model not split ({e}); splitting the float model")
        sharded = mixjax.shard_model(params, cfg, model)
    ids = tokenizer.encode("The capital of France is")
    (new,) = mixjax.generate(sharded, cfg, [ids], max_new_tokens=16, mesh=model)
    print(repr(tokenizer.decode(new, skip_special_tokens=True)))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-devices", type=int, default=None, help="simulate this many CPU devices")
    main(parser.parse_args().cpu_devices)
