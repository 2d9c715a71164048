"""Checkpoints into mixjax: Hugging Face directories, GGUF files and mixjax's own Orbax checkpoints; and out of
it as Hugging Face directories and GGUF files.

    cfg, params = convert.load(path, dtype=jnp.float32)
    tokenizer = convert.load_tokenizer(path)
    convert.save_checkpoint(directory, params, cfg)
    cfg, params = convert.restore_checkpoint(directory)
    convert.save_hf(directory, params, cfg, tokenizer=tokenizer)   # transformers' from_pretrained reads it
    convert.save_gguf("model.gguf", params, cfg, tokenizer=tokenizer, dtype="q8_0")   # llama.cpp reads it
"""

from __future__ import annotations

import os
from pathlib import Path

import jax.numpy as jnp

from convert.layout import NAME_TABLE, ConvertError, not_a_model
from mixjax.config import LlamaConfig


def _existing(path: str | os.PathLike) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file or directory; pass a Hugging Face model directory or a .gguf file")
    return p


def load(path: str | os.PathLike, *, dtype=jnp.float32, mesh=None) -> tuple[LlamaConfig, dict]:
    """Loads a model as (cfg, float params with stacked layers) from a Hugging Face directory, a .gguf
    file, or a float checkpoint written by `save_checkpoint`.

    mesh: a one-axis "data" mesh (`mixjax.data_mesh`): the weights go from the host straight to their slices
    on its devices (`mixjax.parallel.shard_weights`, FSDP-style), never whole on one device; for quantizing a
    model one device cannot hold in float (`mixjax quantize --shard-weights`)."""
    p = _existing(path)
    if mesh is not None:
        from mixjax.parallel import check_mesh

        check_mesh(mesh)
    if p.is_dir():
        from convert import orbax_io

        if orbax_io.is_checkpoint(p):
            from mixjax.quant.checkpoint import is_quantized_checkpoint, load_quantized

            if is_quantized_checkpoint(p):  # quantized params: the quantizer rebuilds their tree
                if mesh is not None:
                    raise ConvertError(f"{p} is a quantized checkpoint: mesh= splits float weights only; load it "
                                       "without one (mixjax.shard_model splits quantized params for inference)")
                cfg, qparams, _ = load_quantized(p)
                return cfg, qparams
            return orbax_io.restore_checkpoint(p, dtype=dtype, mesh=mesh)
        from convert.hf import load_hf

        return load_hf(p, dtype, mesh)
    if p.suffix == ".gguf":
        from convert.gguf import load_gguf

        return load_gguf(p, dtype, mesh)
    raise not_a_model(p)


def load_tokenizer(path: str | os.PathLike):
    """The Hugging Face tokenizer of a model directory, a .gguf file, or a mixjax checkpoint."""
    from convert.tokenizer import load_tokenizer as _load

    return _load(_existing(path))


def save_hf(directory, params, cfg, *, dtype=None, tokenizer=None, max_shard_bytes=None, force=False) -> Path:
    """Float params as a Hugging Face model directory (config.json, safetensors shards, the tokenizer's files);
    see `convert.hf.save_hf`."""
    from convert.hf import SHARD_BYTES, save_hf as _save

    return _save(directory, params, cfg, dtype=dtype, tokenizer=tokenizer, max_shard_bytes=max_shard_bytes or SHARD_BYTES,
                 force=force)


def save_gguf(path, params, cfg, *, dtype="float32", tokenizer=None, name=None, force=False) -> Path:
    """Float params as one GGUF file in llama.cpp's layout, with a byte-level BPE tokenizer's vocabulary; see
    `convert.gguf_export.save_gguf`."""
    from convert.gguf_export import save_gguf as _save

    return _save(path, params, cfg, dtype=dtype, tokenizer=tokenizer, name=name, force=force)


def gguf_arch(cfg: LlamaConfig) -> str:
    """llama.cpp's architecture name for cfg (`llama`, `qwen2`, `qwen3` or `smollm3`)."""
    from convert.gguf_export import gguf_arch as _arch

    return _arch(cfg)


def save_checkpoint(directory, params, cfg, *, extra_metadata=None, files=None, force=False) -> Path:
    """Writes params + config (Orbax) atomically; see `convert.orbax_io.save_checkpoint`."""
    from convert import orbax_io

    return orbax_io.save_checkpoint(directory, params, cfg, extra_metadata=extra_metadata, files=files, force=force)


def restore_checkpoint(directory, *, abstract_params=None, dtype=None):
    """Reads a checkpoint written by `save_checkpoint` → (cfg, params); see `convert.orbax_io`."""
    from convert import orbax_io

    return orbax_io.restore_checkpoint(_existing(directory), abstract_params=abstract_params, dtype=dtype)


__all__ = ["NAME_TABLE", "ConvertError", "gguf_arch", "load", "load_tokenizer", "restore_checkpoint", "save_checkpoint",
           "save_gguf", "save_hf"]
