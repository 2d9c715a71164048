"""Hugging Face checkpoint directories ⇄ (LlamaConfig, params).

A directory holds config.json and weights as one or several `*.safetensors` files (sharded ones listed in
`model.safetensors.index.json`) or `pytorch_model*.bin` files. Tensors stream one at a time into a
`ParamBuffer`; the checkpoint is never held twice.

`save_hf` writes the other way: float params as config.json (`LlamaConfig.to_hf`) and safetensors shards of at
most `max_shard_bytes`, with an index when there are several, names from the same `NAME_TABLE`; a layer's tensor
is converted to numpy only while its shard is written. Like every writer here it fills a temporary directory
beside the target and renames it into place.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from convert.layout import (HF_NAMES, IGNORED_SUFFIXES, ConvertError, NameMap, ParamBuffer, flat_shapes, fuse_for_hf,
                            gemma_hf_name, is_norm_name, split_fused)
from mixjax.config import GEMMA_TYPES, LlamaConfig


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
    return LlamaConfig.from_hf(_text_config(d), source=str(path))


def _text_config(d: dict) -> dict:
    """A Gemma 3 config.json as a complete text-model dict: transformers' `Gemma3TextConfig` fills in the fields a
    file leaves at their defaults (an image-text checkpoint's `text_config` lists few), and an image-text checkpoint
    (gemma-3-4b/12b, `Gemma3ForConditionalGeneration`) gives its language model's."""
    multimodal = d.get("model_type") == "gemma3" and isinstance(d.get("text_config"), dict)
    if d.get("model_type") != "gemma3_text" and not multimodal:
        return d
    import transformers

    text = dict(d["text_config"]) if multimodal else dict(d)
    if multimodal:
        for key in ("bos_token_id", "eos_token_id", "tie_word_embeddings"):  # the outer config's, where it has them
            if key in d and key not in text:
                text[key] = d[key]
    text.pop("model_type", None)
    return {**transformers.Gemma3TextConfig(**text).to_dict(), "model_type": "gemma3_text"}


_VISION_PREFIXES = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.")


def _language_model_name(name: str) -> str | None:
    """An image-text Gemma 3 checkpoint's tensor as its language model's (None: a vision tower or projector tensor)."""
    if name.startswith(_VISION_PREFIXES):
        return None
    if name.startswith("language_model."):  # the layout Hugging Face's Gemma 3 checkpoints are saved in
        return name[len("language_model."):]
    if name.startswith("model.language_model."):  # transformers' in-memory names
        return "model." + name[len("model.language_model."):]
    return name


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


def load_hf(directory: Path, dtype, mesh=None) -> tuple[LlamaConfig, dict]:
    cfg = read_config(directory)
    files = weight_files(directory)
    buffer = ParamBuffer(cfg, dtype, HF_NAMES, source=str(directory))
    multimodal = json.loads((directory / "config.json").read_text()).get("model_type") == "gemma3"
    for file in files:
        for name, value in _tensors(file):
            name = _language_model_name(name) if multimodal else name
            if name is not None:  # (an image-text model's vision tower: not loaded)
                _put(buffer, name, value, file)
    params = buffer.finish(mesh)
    if cfg.model_type == "granite":
        return fold_granite(json.loads((directory / "config.json").read_text()), cfg, params)
    return cfg, params


GRANITE_MULTIPLIERS = ("embedding_multiplier", "logits_scaling", "residual_multiplier", "attention_multiplier")


def fold_granite(d: dict, cfg: LlamaConfig, params: dict) -> tuple[LlamaConfig, dict]:
    """IBM Granite's four scalars folded into the weights, which makes the model a Llama (its config says so): the
    embeddings × embedding_multiplier; q_proj × attention_multiplier·√Dh (the attention's own 1/√Dh then leaves
    Granite's scale, and RoPE is linear); o_proj and down_proj × residual_multiplier (each residual branch ends in
    them, without bias); the LM head ÷ logits_scaling, a table of its own when tied embeddings must differ. Computed
    in f32, stored in the params' dtype; exported, the result is a Llama checkpoint."""
    import dataclasses
    import math

    emb, logits, resid, attn = (float(d.get(k, 1.0)) for k in GRANITE_MULTIPLIERS)
    scale = lambda a, s: (a.astype(jnp.float32) * s).astype(a.dtype)  # noqa: E731
    layers = params["layers"]
    sa, mlp = dict(layers["self_attn"]), dict(layers["mlp"])
    q = attn * math.sqrt(cfg.head_dim)
    sa["q_proj"] = {k: scale(v, q) for k, v in sa["q_proj"].items()}
    sa["o_proj"] = {"weight": scale(sa["o_proj"]["weight"], resid)}
    mlp["down_proj"] = {"weight": scale(mlp["down_proj"]["weight"], resid)}
    out = {**params, "layers": {**layers, "self_attn": sa, "mlp": mlp}}
    table = params["embed_tokens"]
    untie = cfg.tie_word_embeddings and (emb != 1.0 or logits != 1.0)
    out["embed_tokens"] = scale(table, emb)
    if not cfg.tie_word_embeddings or untie:
        out["lm_head"] = scale(params.get("lm_head", table), 1.0 / logits)
    return dataclasses.replace(cfg, model_type="llama", tie_word_embeddings=cfg.tie_word_embeddings and not untie), out


def _put(buffer: ParamBuffer, name: str, value: np.ndarray, file: Path) -> None:
    if name.endswith(IGNORED_SUFFIXES):
        return
    pieces = split_fused(name, value, buffer.cfg, str(file))  # Phi-3's fused q/k/v and gate/up
    if pieces is not None:
        for piece_name, piece in pieces:
            _put(buffer, piece_name, piece, file)
        return
    if buffer.cfg.model_type in GEMMA_TYPES and is_norm_name(name):  # Gemma's RMSNorms scale by 1 + w: folded
        value = value.astype(np.float32) + 1.0  # (in f32, before the params' dtype)
    if buffer.cfg.sandwich_norms:
        name = gemma_hf_name(name)
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


# ------------------------------------------------------------------------------------------------ export

SHARD_BYTES = 5 * 2**30  # the largest safetensors file `save_hf` writes (Hugging Face's default shard size)


def save_hf(directory: str | os.PathLike, params, cfg: LlamaConfig, *, dtype=None, tokenizer=None,
            max_shard_bytes: int = SHARD_BYTES, force: bool = False) -> Path:
    """Writes float params (stacked layers or a tuple of per-layer dicts, as `convert.load` and `unstack_layers`
    give them) as a Hugging Face model directory that `transformers.AutoModelForCausalLM.from_pretrained` and
    `convert.load` read: config.json, the weights in safetensors shards of ≤ `max_shard_bytes`, and `tokenizer`'s
    files when one is given. dtype: None keeps the params' own; else the weights are cast to it. An existing
    directory is replaced only with force=True; the checks of params and config run before the first write, and
    a tensor found non-finite while writing (NaN in the model, or beyond float16's range) stops the export with
    nothing written."""
    target = Path(directory).expanduser().absolute()
    if target.exists() and not force:
        raise FileExistsError(f"{target} already exists; pass force=True (--force) to overwrite it")
    config = cfg.to_hf()  # a config no Hugging Face class runs: refused here, before any write
    tensors = export_tensors(params, cfg, HF_NAMES)
    if cfg.model_type == "phi3":  # Phi3ForCausalLM holds q/k/v and gate/up fused
        tensors = fuse_for_hf(tensors, cfg)
    if cfg.model_type in GEMMA_TYPES:  # Gemma stores its norms as w where they scale by 1 + w
        tensors = [(gemma_hf_name(name, to_hf=True) if cfg.sandwich_norms else name, shape, dtype,
                    (lambda g=get: g().astype(jnp.float32) - 1.0) if is_norm_name(name) else get)
                   for name, shape, dtype, get in tensors]
    np_dtype = np.dtype(jnp.dtype(dtype or tensors[0][2]))
    if np_dtype not in (np.dtype(np.float32), np.dtype(jnp.bfloat16), np.dtype(np.float16)):
        raise ConvertError(f"dtype={np_dtype} is not a float dtype Hugging Face models load; use float32, bfloat16 "
                           "or float16")
    config["torch_dtype"] = np_dtype.name
    shards = _plan_shards([int(np.prod(shape)) * np_dtype.itemsize for _, shape, _, _ in tensors], max_shard_bytes)
    from convert.orbax_io import _replace, temp_dir_beside

    tmp = temp_dir_beside(target)
    try:
        _write_shards(tmp, tensors, shards, np_dtype)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        _replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return target


def export_tensors(params, cfg: LlamaConfig, names: NameMap) -> list[tuple[str, tuple[int, ...], str, object]]:
    """(checkpoint name in `names`' column, shape, dtype name, a function giving the array) for every tensor the
    config implies, checked against params: float arrays of the right shape, unfused and unquantized."""
    from mixjax.linear import QuantizedLinear

    if any(isinstance(leaf, QuantizedLinear)
           for leaf in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, QuantizedLinear))):
        raise ConvertError("these params hold quantized linears; an exported model holds float weights. Export "
                           "`mixjax.quant.dequantize_params(params)` (`mixjax export --dequantize`): the quantized "
                           "weights' values, without the int8 activation rounding the kernels add")
    layers = params.get("layers")
    stacked = isinstance(layers, dict)
    fused = [name for layer in ([layers] if stacked else list(layers or ())) for group in ("self_attn", "mlp")
             for name in layer.get(group, {}) if name.endswith(("qkv_proj", "gate_up_proj"))]
    if fused:
        raise ConvertError(f"these params hold fused projections ({fused[0]}): export them as loaded, before "
                           "`model.fuse_projections`")
    if not stacked and len(layers) != cfg.num_hidden_layers:
        raise ConvertError(f"{len(layers)} layers for a config of num_hidden_layers={cfg.num_hidden_layers}")
    out = []
    for path, shape in flat_shapes(cfg).items():
        per_layer = path.startswith("layers.")
        for layer in range(cfg.num_hidden_layers) if per_layer else (None,):
            name = names.source_name(path, layer)
            keys = path.split(".")[1:] if per_layer else path.split(".")
            node = (layers if stacked else layers[layer]) if per_layer else params
            try:
                for key in keys:
                    node = node[key]
            except (KeyError, TypeError):
                raise ConvertError(f"params have no {path!r} ({name}); the params do not match the config") from None
            want = shape[1:] if per_layer and not stacked else shape  # a stacked leaf holds every layer
            if tuple(node.shape) != tuple(want) or not jnp.issubdtype(node.dtype, jnp.floating):
                raise ConvertError(f"{path} ({name}) is {node.dtype} {tuple(node.shape)}, but the config implies a "
                                   f"float {tuple(want)}; the params do not match the config")
            get = (lambda a=node, i=layer: a[i]) if stacked and per_layer else (lambda a=node: a)
            out.append((name, tuple(shape[1:] if per_layer else shape), jnp.dtype(node.dtype).name, get))
    return out


def _plan_shards(sizes: list[int], max_bytes: int) -> list[list[int]]:
    """Consecutive tensor indices grouped into shards of at most max_bytes (a larger tensor alone in one)."""
    shards, current, total = [], [], 0
    for i, size in enumerate(sizes):
        if current and total + size > max_bytes:
            shards.append(current)
            current, total = [], 0
        current.append(i)
        total += size
    return shards + [current]


def _write_shards(tmp: Path, tensors, shards: list[list[int]], np_dtype) -> None:
    from safetensors.numpy import save_file

    n = len(shards)
    weight_map, total = {}, 0
    for k, shard in enumerate(shards, 1):
        file = "model.safetensors" if n == 1 else f"model-{k:05d}-of-{n:05d}.safetensors"
        arrays = {}
        for i in shard:
            name, _, _, get = tensors[i]
            value = get()
            arrays[name] = np.asarray(jnp.asarray(value, np_dtype))
            if not np.all(np.isfinite(arrays[name].astype(np.float32))):
                raise ConvertError(
                    f"{name} holds NaN or Inf: fix the model before exporting it" if not bool(jnp.all(jnp.isfinite(value)))
                    else f"{name} overflows {np_dtype.name} (|w| up to {float(jnp.max(jnp.abs(value))):.3g}): export "
                         "it as bfloat16 or float32")
        save_file(arrays, str(tmp / file), metadata={"format": "pt"})
        total += sum(a.nbytes for a in arrays.values())
        weight_map.update(dict.fromkeys(arrays, file))
        del arrays
    if n > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
