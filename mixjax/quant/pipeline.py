"""`quantize_model`: the library function behind `mixjax quantize` (load → calibrate → quantize → save)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from mixjax.quant.api import QuantConfig, quantize
from mixjax.quant.report import QuantReport


def refuse_quantized_source(path: Path) -> None:
    """A quantized mixjax checkpoint as the source: refused before any loading, naming the float model it was made
    from where its metadata records one."""
    from convert import orbax_io
    from mixjax.quant.checkpoint import is_quantized_checkpoint

    if is_quantized_checkpoint(path):
        source = orbax_io.read_metadata(path).get("extra", {}).get("source")
        raise ValueError(f"{path} is already a quantized mixjax checkpoint; quantize the float model it was made from"
                         + (f" ({source})" if isinstance(source, str) else "") + " instead")


def quantize_model(*, model_path: str | os.PathLike | None, out: str | os.PathLike, config: QuantConfig = QuantConfig(),
                   data: str = "owt", samples: int = 128, seq_len: int = 2048, seed: int = 0,
                   force: bool = False, progress: bool = True, log=print,
                   devices: int | None = None, shard_weights: bool = False, eval_tokens: int = 0,
                   eval_data: str = "wikipedia") -> QuantReport:
    """Quantizes a model (Hugging Face dir, .gguf, mixjax checkpoint; None = the embedded model) and saves it.

    Checks the output path before any work: an existing `out` needs `force=True`.
    devices: local devices the calibration samples are split over (None: all; `mixjax.parallel`).
    shard_weights: the float weights are split over those devices too (FSDP, `mixjax.shard_weights`), loaded
      straight into their slices: for a model one device cannot hold in float; slower otherwise.
    eval_tokens: > 0 also measures the float and the quantized model's perplexity on that many tokens of
      `eval_data` (windows of up to 2048 tokens), logs both and records them in the checkpoint
      (`extra["evaluation"]`, which `mixjax info` shows).
    """
    import jax.numpy as jnp

    from mixjax.parallel import mesh_or_none

    import convert
    from mixjax import assets
    from mixjax import data as data_mod
    from mixjax.quant.checkpoint import save_quantized

    target = Path(out).expanduser()
    if target.exists() and not force:
        raise ValueError(f"{target} already exists; pass --force to overwrite it or choose another --out")
    mesh = mesh_or_none(devices)
    path = assets.resolve_model_path(model_path)
    refuse_quantized_source(path)
    tokenizer = convert.load_tokenizer(path)
    calib = data_mod.calibration_batches(tokenizer, data, n_samples=samples, seq_len=seq_len, seed=seed,
                                         batch_size=config.batch_size)
    cfg, params = convert.load(path, dtype=jnp.float32, mesh=mesh if shard_weights else None)
    if seq_len > cfg.max_position_embeddings:
        raise ValueError(f"--seq-len {seq_len} exceeds the model context {cfg.max_position_embeddings}")
    log(f"quantizing {path} to W{config.bits:g}A{config.act.bits or 16}: {samples}×{seq_len} tokens of {data}")
    if shard_weights and mesh is None:
        log("--shard-weights: one device, so the weights stay whole on it")
    if mesh is not None:
        n = mesh.size
        log(f"calibration samples split over {n} devices"
            + (f", the float weights too (FSDP: each device holds 1/{n} of them)" if shard_weights else "")
            + (f" (each batch of {config.batch_size} padded to {-(-config.batch_size // n) * n}: "
               f"--batch-size {n} or a multiple of it wastes nothing)" if config.batch_size % n else ""))
    windows = None
    if eval_tokens:  # read before the work, so a bad source fails first
        eval_len = min(2048, cfg.max_position_embeddings, eval_tokens)
        windows = data_mod.eval_windows(tokenizer, eval_data, seq_len=eval_len, max_tokens=eval_tokens)
        if len(windows) == 0:
            raise ValueError(f"--eval-tokens {eval_tokens}: {eval_data} holds fewer than {eval_len} tokens")
    qparams, report = quantize(params, calib, cfg, config=config, return_report=True, progress=progress, mesh=mesh)
    extra = {"source": str(path), "calibration": {"data": str(data), "samples": samples, "seq_len": seq_len,
                                                  "seed": seed}}
    if windows is not None:
        extra["evaluation"] = _evaluate(params, qparams, cfg, windows, str(eval_data), mesh, log)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        save_quantized(target, qparams, cfg, config=config, files={"tokenizer": tmp}, force=force, extra=extra)
    log(str(report))
    log(f"saved to {target}")
    return report


def _evaluate(params, qparams, cfg, windows, data: str, mesh, log) -> dict:
    """Float and quantized perplexity on the same windows, as `extra["evaluation"]` records them."""
    from mixjax.evaluate import perplexity

    fp = perplexity(params, cfg, windows, mesh=mesh)
    quantized = perplexity(qparams, cfg, windows, mesh=mesh)
    n, t = windows.shape
    log(f"perplexity on {n}×{t} tokens of {data}: float {fp:.3f}, quantized {quantized:.3f} ({quantized - fp:+.3f})")
    return {"data": data, "windows": int(n), "seq_len": int(t), "float": fp, "quantized": quantized}
