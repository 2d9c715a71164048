"""`quantize_model`: the library function behind `mixjax quantize` (load → calibrate → quantize → save)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from mixjax.quant.api import QuantConfig, quantize
from mixjax.quant.report import QuantReport


def quantize_model(*, model_path: str | os.PathLike | None, out: str | os.PathLike, config: QuantConfig = QuantConfig(),
                   data: str = "owt", samples: int = 128, seq_len: int = 2048, seed: int = 0,
                   force: bool = False, progress: bool = True, log=print,
                   devices: int | None = None) -> QuantReport:
    """Quantizes a model (Hugging Face dir, .gguf, mixjax checkpoint; None = the embedded model) and saves it.

    Checks the output path before any work: an existing `out` needs `force=True`.
    devices: local devices the calibration samples are split over (None: all; `mixjax.parallel`).
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
    tokenizer = convert.load_tokenizer(path)
    calib = data_mod.calibration_batches(tokenizer, data, n_samples=samples, seq_len=seq_len, seed=seed,
                                         batch_size=config.batch_size)
    cfg, params = convert.load(path, dtype=jnp.float32)
    if seq_len > cfg.max_position_embeddings:
        raise ValueError(f"--seq-len {seq_len} exceeds the model context {cfg.max_position_embeddings}")
    log(f"quantizing {path} to W{config.bits:g}A{config.act.bits or 16}: {samples}×{seq_len} tokens of {data}")
    if mesh is not None:
        n = mesh.size
        log(f"calibration samples split over {n} devices"
            + (f" (each batch of {config.batch_size} padded to {-(-config.batch_size // n) * n}: "
               f"--batch-size {n} or a multiple of it wastes nothing)" if config.batch_size % n else ""))
    qparams, report = quantize(params, calib, cfg, config=config, return_report=True, progress=progress, mesh=mesh)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        save_quantized(target, qparams, cfg, config=config, files={"tokenizer": tmp}, force=force,
                       extra={"source": str(path), "calibration": {"data": str(data), "samples": samples,
                                                                   "seq_len": seq_len, "seed": seed}})
    log(str(report))
    log(f"saved to {target}")
    return report
