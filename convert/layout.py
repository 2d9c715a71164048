"""The one name table between checkpoint formats and mixjax params, and the buffer converters fill.

`NAME_TABLE` rows are (params path, Hugging Face name, GGUF name); `{i}` marks the layer index of a
per-layer tensor. Shapes are never written here: they come from `mixjax.model.param_shapes(cfg)`.

`ParamBuffer` preallocates one numpy array per params leaf (stacked layers: [L, ...]) and is filled one
tensor at a time, so a converter holds the checkpoint once (plus the tensor being copied).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mixjax.config import LlamaConfig
from mixjax.model import _out_features, param_shapes


class ConvertError(ValueError):
    """A checkpoint that cannot be converted; the message names the file or tensor and the fix."""


def not_a_model(path) -> ConvertError:
    """The error for a file that is not a model by itself (one weight file, or any other file), the same whether the
    weights or the tokenizer are read first."""
    p = Path(path)
    if p.suffix in (".safetensors", ".bin", ".json"):
        return ConvertError(f"{p}: pass the model directory that holds it and config.json ({p.parent}), not one file")
    return ConvertError(
        f"{p}: not a model; pass a Hugging Face directory (config.json + weights), a .gguf file, "
        "or a mixjax checkpoint directory"
    )


# (params path, Hugging Face name, GGUF name)
NAME_TABLE: tuple[tuple[str, str, str], ...] = (
    ("embed_tokens", "model.embed_tokens.weight", "token_embd.weight"),
    ("norm", "model.norm.weight", "output_norm.weight"),
    ("lm_head", "lm_head.weight", "output.weight"),
    ("layers.input_layernorm", "model.layers.{i}.input_layernorm.weight", "blk.{i}.attn_norm.weight"),
    ("layers.post_attention_layernorm", "model.layers.{i}.post_attention_layernorm.weight", "blk.{i}.ffn_norm.weight"),
    ("layers.q_norm", "model.layers.{i}.self_attn.q_norm.weight", "blk.{i}.attn_q_norm.weight"),  # Qwen3
    ("layers.k_norm", "model.layers.{i}.self_attn.k_norm.weight", "blk.{i}.attn_k_norm.weight"),
    # Gemma 2's and 3's norms on the attention and MLP outputs (Hugging Face calls them post_attention_layernorm and
    # post_feedforward_layernorm, and its pre-MLP norm pre_feedforward_layernorm: `gemma_hf_name` renames)
    ("layers.attn_output_norm", "model.layers.{i}.attn_output_norm.weight", "blk.{i}.post_attention_norm.weight"),
    ("layers.mlp_output_norm", "model.layers.{i}.mlp_output_norm.weight", "blk.{i}.post_ffw_norm.weight"),
    ("layers.self_attn.q_proj.weight", "model.layers.{i}.self_attn.q_proj.weight", "blk.{i}.attn_q.weight"),
    ("layers.self_attn.q_proj.bias", "model.layers.{i}.self_attn.q_proj.bias", "blk.{i}.attn_q.bias"),
    ("layers.self_attn.k_proj.weight", "model.layers.{i}.self_attn.k_proj.weight", "blk.{i}.attn_k.weight"),
    ("layers.self_attn.k_proj.bias", "model.layers.{i}.self_attn.k_proj.bias", "blk.{i}.attn_k.bias"),
    ("layers.self_attn.v_proj.weight", "model.layers.{i}.self_attn.v_proj.weight", "blk.{i}.attn_v.weight"),
    ("layers.self_attn.v_proj.bias", "model.layers.{i}.self_attn.v_proj.bias", "blk.{i}.attn_v.bias"),
    ("layers.self_attn.o_proj.weight", "model.layers.{i}.self_attn.o_proj.weight", "blk.{i}.attn_output.weight"),
    ("layers.mlp.gate_proj.weight", "model.layers.{i}.mlp.gate_proj.weight", "blk.{i}.ffn_gate.weight"),
    ("layers.mlp.up_proj.weight", "model.layers.{i}.mlp.up_proj.weight", "blk.{i}.ffn_up.weight"),
    ("layers.mlp.down_proj.weight", "model.layers.{i}.mlp.down_proj.weight", "blk.{i}.ffn_down.weight"),
)

# Hugging Face checkpoints that store a layer's projections fused (Phi-3, Phi-4): the fused linear under the layer's
# group → its members, stacked along the output rows in this order (q, k, v; gate, up).
HF_FUSED = {"self_attn.qkv_proj": ("q_proj", "k_proj", "v_proj"), "mlp.gate_up_proj": ("gate_proj", "up_proj")}
_HF_FUSED_NAME = re.compile(r"model\.layers\.(\d+)\.(self_attn\.qkv_proj|mlp\.gate_up_proj)\.weight")


def split_fused(name: str, value: np.ndarray, cfg: LlamaConfig, source: str,
                shown: str | None = None) -> list[tuple[str, np.ndarray]] | None:
    """A fused q/k/v or gate/up tensor as its members' (Hugging Face name, rows), or None for any other tensor.
    shown: the tensor's name in the checkpoint, for the error (default `name`)."""
    match = _HF_FUSED_NAME.fullmatch(name)
    if match is None:
        return None
    layer, key = match.groups()
    group, members = key.split(".")[0], HF_FUSED[key]
    sizes = [_out_features(m, cfg) for m in members]
    if value.ndim != 2 or value.shape[0] != sum(sizes):
        raise ConvertError(f"{source}: tensor {shown or name!r} has shape {tuple(value.shape)}, but the config implies "
                           f"({sum(sizes)}, K): {' + '.join(map(str, sizes))} rows of {', '.join(members)}")
    pieces = np.split(value, np.cumsum(sizes)[:-1], axis=0)
    return [(f"model.layers.{layer}.{group}.{m}.weight", piece) for m, piece in zip(members, pieces)]


GGUF_FUSED_NAME = re.compile(r"blk\.(\d+)\.(attn_qkv|ffn_up)\.weight")  # (in `phi3` files only)


def split_fused_gguf(name: str, value: np.ndarray, cfg: LlamaConfig, source: str) -> list[tuple[str, np.ndarray]] | None:
    """llama.cpp's `phi3` tensors: `attn_qkv` (q, k, v rows) and `ffn_up` holding gate and up (SwiGLU's halves) →
    their members' (GGUF name, rows) as `NAME_TABLE` knows them; None for any other tensor."""
    match = GGUF_FUSED_NAME.fullmatch(name)
    if match is None:
        return None
    layer, kind = match.groups()
    key = "self_attn.qkv_proj" if kind == "attn_qkv" else "mlp.gate_up_proj"
    pieces = split_fused(f"model.layers.{layer}.{key}.weight", value, cfg, source, shown=name)
    return [(GGUF_NAMES.source_name(HF_NAMES.resolve(hf)[0], int(layer)), piece) for hf, piece in pieces]


def fuse_for_hf(tensors: list, cfg: LlamaConfig) -> list:
    """`export_tensors`' entries with each layer's q/k/v and gate/up joined as Phi-3 stores them (in the place of
    the first member; the array is concatenated only when the shard is written)."""
    by_name = {entry[0]: entry for entry in tensors}
    joined, dropped = {}, set()
    for i in range(cfg.num_hidden_layers):
        for key, members in HF_FUSED.items():
            group = key.split(".")[0]
            parts = [by_name[f"model.layers.{i}.{group}.{m}.weight"] for m in members]
            rows, k = sum(p[1][0] for p in parts), parts[0][1][1]
            joined[parts[0][0]] = (f"model.layers.{i}.{key}.weight", (rows, k), parts[0][2],
                                   lambda gets=tuple(p[3] for p in parts): jnp.concatenate([g() for g in gets]))
            dropped.update(p[0] for p in parts[1:])
    return [joined.get(entry[0], entry) for entry in tensors if entry[0] not in dropped]


_GEMMA_NORMS = {"post_attention_layernorm": "attn_output_norm", "pre_feedforward_layernorm": "post_attention_layernorm",
                "post_feedforward_layernorm": "mlp_output_norm"}  # Hugging Face's Gemma 2/3 names → NAME_TABLE's
_GEMMA_NORMS_BACK = {v: k for k, v in _GEMMA_NORMS.items()}
_LAYER_NORM_NAME = re.compile(r"(model\.layers\.\d+\.)(\w+)(\.weight)")


def gemma_hf_name(name: str, *, to_hf: bool = False) -> str:
    """A Gemma 2 / 3 checkpoint's layer norm name as `NAME_TABLE` has it (to_hf: back). The same Hugging Face name
    means another norm in a Llama (post_attention_layernorm: the MLP's input norm there, the attention output's here)."""
    match = _LAYER_NORM_NAME.fullmatch(name)
    if match is None:
        return name
    head, norm, tail = match.groups()
    return head + (_GEMMA_NORMS_BACK if to_hf else _GEMMA_NORMS).get(norm, norm) + tail


def is_norm_name(name: str) -> bool:
    """Whether a Hugging Face tensor is an RMSNorm weight (Gemma stores those as w, applied as 1 + w)."""
    return name.endswith("norm.weight")


# Checkpoint entries that are not parameters (recomputed buffers) and are skipped.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "rope_freqs.weight")


def _compile(column: int) -> tuple[dict[str, str], dict[str, str]]:
    globals_, per_layer = {}, {}
    for row in NAME_TABLE:
        name = row[column]
        if "{i}" in name:
            prefix, suffix = name.split("{i}")
            per_layer[(prefix, suffix)] = row[0]
        else:
            globals_[name] = row[0]
    return globals_, per_layer


class NameMap:
    """Resolves a checkpoint tensor name to (params path, layer index or None), or None if unknown."""

    def __init__(self, column: int):
        self._globals, self._per_layer = _compile(column)

    def resolve(self, name: str) -> tuple[str, int | None] | None:
        if name in self._globals:
            return self._globals[name], None
        for (prefix, suffix), path in self._per_layer.items():
            if name.startswith(prefix) and name.endswith(suffix):
                index = name[len(prefix) : len(name) - len(suffix)]
                if index.isdigit():
                    return path, int(index)
        return None

    def source_name(self, path: str, layer: int | None) -> str:
        for name, p in self._globals.items():
            if p == path:
                return name
        for (prefix, suffix), p in self._per_layer.items():
            if p == path:
                return f"{prefix}{layer}{suffix}"
        return path


HF_NAMES = NameMap(1)
GGUF_NAMES = NameMap(2)


def flat_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
    is_shape = lambda x: isinstance(x, tuple) and all(isinstance(i, int) for i in x)  # noqa: E731
    flat = jax.tree_util.tree_flatten_with_path(param_shapes(cfg), is_leaf=is_shape)[0]
    return {".".join(k.key for k in path): shape for path, shape in flat}


def _unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        node = tree
        *parents, leaf = path.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


HALF_DTYPES = (np.dtype(jnp.bfloat16), np.dtype(np.float16))  # exact in f32


class ParamBuffer:
    """Numpy params of `cfg`, filled tensor by tensor; `finish()` returns jax params.

    Each leaf's host array is allocated at its first tensor: in the checkpoint's own dtype where that is bf16 or f16
    and the target f32 (exact either way, cast on the device: half the host memory for the common bf16 checkpoint
    loaded in f32), else in the target dtype. A later tensor of another dtype widens the leaf to the target."""

    def __init__(self, cfg: LlamaConfig, dtype, names: NameMap, source: str):
        self.cfg, self.names, self.source = cfg, names, source
        self.np_dtype = np.dtype(jnp.dtype(dtype))
        if self.np_dtype not in (np.dtype(np.float32), *HALF_DTYPES):
            raise ConvertError(f"dtype={self.np_dtype} is not supported; use jnp.float32 or jnp.bfloat16")
        self.shapes = flat_shapes(cfg)
        self.arrays: dict[str, np.ndarray] = {}
        self.filled = {p: np.zeros(s[0] if p.startswith("layers.") else 1, bool) for p, s in self.shapes.items()}

    def _slot(self, path: str, dtype: np.dtype) -> np.ndarray:
        """The host array of `path` for a tensor of `dtype`, allocated or widened to the target as needed."""
        array = self.arrays.get(path)
        if array is None:
            narrow = self.np_dtype == np.float32 and dtype in HALF_DTYPES
            array = self.arrays[path] = np.empty(self.shapes[path], dtype if narrow else self.np_dtype)
        elif array.dtype != self.np_dtype and dtype != array.dtype:  # a half leaf meets another dtype
            array = self.arrays[path] = array.astype(self.np_dtype)
        return array

    def expected_shape(self, path: str) -> tuple[int, ...]:
        shape = self.shapes[path]
        return shape[1:] if path.startswith("layers.") else shape

    def wants(self, path: str) -> bool:
        return path in self.shapes

    def put(self, name: str, path: str, layer: int | None, value: np.ndarray) -> None:
        """Copies checkpoint tensor `name` (numpy, any float dtype) into its slot."""
        if path.startswith("layers.") and not 0 <= layer < self.cfg.num_hidden_layers:
            raise ConvertError(
                f"{self.source}: tensor {name!r} is for layer {layer}, but the config has "
                f"num_hidden_layers={self.cfg.num_hidden_layers}"
            )
        expected = self.expected_shape(path)
        if tuple(value.shape) != expected:
            raise ConvertError(
                f"{self.source}: tensor {name!r} has shape {tuple(value.shape)}, but the config implies "
                f"{expected}; the weights do not match the config"
            )
        slot = self._slot(path, np.dtype(value.dtype))
        if path.startswith("layers."):
            slot[layer] = value
            self.filled[path][layer] = True
        else:
            slot[...] = value
            self.filled[path][0] = True

    def finish(self, mesh=None) -> dict[str, Any]:
        """Checks every tensor arrived, then moves the arrays to jax one leaf at a time: to the default device,
        or with a "data" mesh split over its devices as `mixjax.parallel.shard_weights` places them."""
        missing = [
            self.names.source_name(p, int(i) if p.startswith("layers.") else None)
            for p, done in self.filled.items()
            for i in np.flatnonzero(~done)
        ]
        if missing:
            shown = ", ".join(repr(m) for m in missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise ConvertError(f"{self.source}: missing tensors {shown}; the checkpoint is incomplete")
        from mixjax.parallel import weight_sharding

        flat = {}
        for path in list(self.arrays):
            array = self.arrays.pop(path)
            leaf = jnp.asarray(array) if mesh is None else jax.device_put(
                array, weight_sharding(array.shape, mesh, layer_axis=path.startswith("layers.")))
            flat[path] = leaf.astype(self.np_dtype)  # a half leaf widened on the device(s), where it lies
        return _unflatten(flat)
