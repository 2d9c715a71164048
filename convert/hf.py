"""Hugging Face checkpoint directories → (LlamaConfig, params).

A directory holds config.json and weights as one or several `*.safetensors` files (sharded ones listed in
`model.safetensors.index.json`) or `pytorch_model*.bin` files. Tensors stream one at a time into a
`ParamBuffer`; the checkpoint is never held twice.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from convert.layout import HF_NAMES, IGNORED_SUFFIXES, ConvertError, ParamBuffer
from mixjax.config import LlamaConfig


def read_config(directory: Path) -> LlamaConfig:
    path = directory / "config.json"
    if not path.is_file():
        raise ConvertError(
            f"{directory}: no config.json; pass a Hugging Face model directory (config.json + weights) "
            "or a .gguf file"
        )
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConvertError(f"{path}: not valid JSON ({e}); re-download or re-save the model") from None
    return LlamaConfig.from_hf(d, source=str(path))


def weight_files(directory: Path) -> list[Path]:
    """The weight files of a directory, safetensors preferred; checks that listed shards exist."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = directory / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise ConvertError(f"{index}: not a valid shard index ({e!r})") from None
            files = [directory / f for f in dict.fromkeys(weight_map.values())]
            absent = [f.name for f in files if not f.is_file()]
            if absent:
                raise ConvertError(f"{index} lists shards that are missing: {absent}; download them too")
            return files
    for pattern in ("*.safetensors", "pytorch_model*.bin"):
        files = sorted(directory.glob(pattern))
        if files:
            return files
    raise ConvertError(
        f"{directory}: no weights found (expected model*.safetensors or pytorch_model*.bin next to config.json)"
    )


def _safetensors_tensors(path: Path) -> Iterator[tuple[str, np.ndarray]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)
    except SafetensorError as e:
        raise ConvertError(f"{path}: truncated or corrupt safetensors file ({e}); re-download it") from None


def _torch_bin_tensors(path: Path) -> Iterator[tuple[str, np.ndarray]]:
    try:
        import torch
    except ImportError:
        raise ConvertError(f"{path}: reading pytorch_model*.bin needs torch; pip install torch (CPU is enough)") from None
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises several unrelated types for damaged files
        raise ConvertError(f"{path}: truncated or corrupt PyTorch checkpoint ({type(e).__name__}: {e})") from None
    for name in list(state):
        tensor = state.pop(name)
        yield name, tensor.to(torch.float32).numpy()


def _tensors(path: Path) -> Iterator[tuple[str, np.ndarray]]:
    return _safetensors_tensors(path) if path.suffix == ".safetensors" else _torch_bin_tensors(path)


def load_hf(directory: Path, dtype) -> tuple[LlamaConfig, dict]:
    cfg = read_config(directory)
    files = weight_files(directory)
    buffer = ParamBuffer(cfg, dtype, HF_NAMES, source=str(directory))
    for file in files:
        for name, value in _tensors(file):
            _put(buffer, name, value, file)
    return cfg, buffer.finish()


def _put(buffer: ParamBuffer, name: str, value: np.ndarray, file: Path) -> None:
    if name.endswith(IGNORED_SUFFIXES):
        return
    target = HF_NAMES.resolve(name)
    if target is None:
        raise ConvertError(
            f"{file}: unexpected tensor {name!r}; it is not part of a Llama-family model "
            "(is this checkpoint a different architecture?)"
        )
    path, layer = target
    if not buffer.wants(path):
        if path == "lm_head":  # tied embeddings: a saved copy of embed_tokens
            return
        raise ConvertError(
            f"{file}: tensor {name!r} is not expected with this config.json "
            "(e.g. a bias while attention_bias is false); the weights do not match the config"
        )
    buffer.put(name, path, layer, value)
