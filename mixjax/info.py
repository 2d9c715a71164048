"""What a model path holds, read from its metadata without loading a weight: `mixjax info PATH`.

Every source `convert.load` reads is described the same way: its format, the model's config, the parameter
count, the bytes on disk and how the tensors are stored (safetensors dtypes, GGML types, or a mixjax
checkpoint's dtype), the tokenizer, and for a quantized mixjax checkpoint its quantization: the config it was
made with, the 8-bit share of each linear type and the average weight bits reached (from the per-layer 8-bit
channel counts its metadata records).
"""

from __future__ import annotations

import collections
import dataclasses
import os
from pathlib import Path
from typing import Any

from mixjax.config import LlamaConfig


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    path: str
    format: str  # "Hugging Face directory" | "GGUF file" | "mixjax checkpoint" | "quantized mixjax checkpoint"
    config: LlamaConfig
    parameters: int  # the float model's (embedding and head counted once when tied)
    disk_bytes: int
    storage: dict[str, int]  # how the tensors are stored → tensor count
    tokenizer: dict[str, Any] | None  # {"tokens": int, "kind": str, "chat_template": bool}, None when absent
    quantization: dict[str, Any] | None = None  # quantized mixjax checkpoints only
    provenance: dict[str, Any] | None = None  # mixjax checkpoints: what they were made from (source, calibration)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["config"] = self.config.to_dict()
        return d


def model_info(path: str | os.PathLike) -> ModelInfo:
    """Describes a Hugging Face directory, a .gguf file or a mixjax checkpoint; the errors `convert.load` gives
    for paths that are none of these."""
    from convert import _existing, orbax_io

    p = _existing(path)
    if p.is_dir() and orbax_io.is_checkpoint(p):
        return _checkpoint_info(p)
    if p.is_dir():
        return _hf_info(p)
    if p.suffix == ".gguf":
        return _gguf_info(p)
    import convert

    convert.load(p)  # raises the loader's message for this path
    raise AssertionError("unreachable")


def _parameters(cfg: LlamaConfig) -> int:
    import math

    from convert.layout import flat_shapes

    return sum(math.prod(shape) for shape in flat_shapes(cfg).values())


def _disk_bytes(p: Path) -> int:
    return p.stat().st_size if p.is_file() else sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def _tokenizer(p: Path) -> dict[str, Any] | None:
    import convert
    from convert.tokenizer import tokenizer_kind

    try:
        tokenizer = convert.load_tokenizer(p)
    except (ValueError, ImportError):
        return None
    return {"tokens": len(tokenizer), "kind": tokenizer_kind(tokenizer), "chat_template": bool(tokenizer.chat_template)}


def _hf_info(p: Path) -> ModelInfo:
    from safetensors import safe_open

    from convert.hf import read_config

    cfg = read_config(p)
    storage: collections.Counter = collections.Counter()
    for f in sorted(p.glob("*.safetensors")):
        with safe_open(str(f), "np") as st:
            for key in st.keys():
                storage[f"safetensors {st.get_slice(key).get_dtype()}"] += 1
    for f in sorted(p.glob("pytorch_model*.bin")):
        storage["pytorch .bin file"] += 1
    return ModelInfo(str(p), "Hugging Face directory", cfg, _parameters(cfg), _disk_bytes(p), dict(storage),
                     _tokenizer(p))


def _gguf_info(p: Path) -> ModelInfo:
    from convert import gguf
    from convert.tokenizer import GGUF_KINDS

    reader = gguf._open(p)
    cfg = gguf.read_config(reader, p)
    storage = collections.Counter(f"GGML {t.tensor_type.name}" for t in reader.tensors)
    tokens = reader.fields.get("tokenizer.ggml.tokens")  # read, not built: a 100k-token BPE takes seconds to build
    model = reader.fields.get("tokenizer.ggml.model")
    model = None if model is None else str(model.contents())
    tokenizer = None if tokens is None else {"tokens": len(tokens.data),
                                             "kind": GGUF_KINDS.get(model, f"GGUF {model!r} vocabulary"),
                                             "chat_template": "tokenizer.chat_template" in reader.fields}
    return ModelInfo(str(p), "GGUF file", cfg, _parameters(cfg), _disk_bytes(p), dict(storage), tokenizer)


def _checkpoint_info(p: Path) -> ModelInfo:
    from convert import orbax_io

    meta = orbax_io.read_metadata(p)
    cfg = LlamaConfig.from_dict(meta["config"])
    q = meta.get("extra", {}).get("quantization")
    if q is None:
        import jax

        n = len(jax.tree.leaves(orbax_io.abstract_float_params(cfg, meta["dtype"], meta["layers"])))
        quantization, storage = None, {f"orbax {meta['dtype']} arrays ({meta['layers']} layers)": n}
    else:
        quantization, storage = _quantization(cfg, q)
    provenance = {k: v for k, v in meta.get("extra", {}).items() if k != "quantization"} or None
    return ModelInfo(str(p), "mixjax checkpoint" if q is None else "quantized mixjax checkpoint", cfg, _parameters(cfg),
                     _disk_bytes(p), storage, _tokenizer(p), quantization, provenance)


def _quantization(cfg: LlamaConfig, q: dict) -> tuple[dict[str, Any], dict[str, int]]:
    """The quantization a checkpoint's metadata records (its config, the 8-bit share of each linear type, the
    average bits of the decoder linears' weights, scales and zeros not counted), and its arrays by dtype."""
    import jax
    import numpy as np

    from mixjax import model
    from mixjax.quant.ablate import describe
    from mixjax.quant.checkpoint import abstract_quantized_params, config_from_dict, stored_linear_form
    from mixjax.quant.salience import linear_weight

    config = config_from_dict(q["config"])
    form = stored_linear_form(q)
    abstract = abstract_quantized_params(cfg, config, q["dtype"], q["n8"], q["a_groups"], q.get("head_n8"), form=form)
    share, elements, bits = {}, 0, 0.0
    for name in model.LINEAR_NAMES:
        n, k = linear_weight(abstract["layers"][0], name).shape
        n8 = sum(q["n8"][name])
        share[name] = n8 / (n * cfg.num_hidden_layers)
        elements += n * k * cfg.num_hidden_layers
        bits += (8 * n8 + 4 * (n * cfg.num_hidden_layers - n8)) * k  # int8 rows and int4 rows
    storage: collections.Counter = collections.Counter()
    for leaf in jax.tree.leaves(abstract):
        storage[f"{np.dtype(leaf.dtype).name} arrays"] += 1
    weight_bytes = sum(int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize for leaf in jax.tree.leaves(abstract))
    return {"config": q["config"], "config_dtype": q["dtype"], "label": describe(config),
            "kernel_format": form != "fake_quant", "int8_share": share, "average_bits": bits / elements,
            "weight_bytes": weight_bytes}, dict(storage)


def _size(n: float, unit: str = "B") -> str:
    for prefix in ("", "k", "M", "G", "T"):
        if abs(n) < 1000 or prefix == "T":
            return f"{n:.1f} {prefix}{unit}" if prefix else f"{n:.0f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def to_text(info: ModelInfo) -> str:
    c = info.config
    heads = f"{c.num_attention_heads} heads ({c.num_key_value_heads} kv) × {c.head_dim}"
    extras = [("tied" if c.tie_word_embeddings else "untied") + " embeddings", f"context {c.max_position_embeddings}",
              f"rope θ {c.rope_theta:g}" + (f", {c.rope_scaling.rope_type} scaling × {c.rope_scaling.factor:g}"
                                            if c.rope_scaling else "")]
    if c.attention_bias:
        extras.append("q/k/v biases")
    if c.qk_norm:
        extras.append("q/k head norms")
    if c.nope_layers:
        extras.append(f"{len(c.nope_layers)} layers without RoPE")
    if c.sliding_window:
        extras.append(f"sliding window {c.sliding_window}" + (
            f" on {c.num_hidden_layers - len(c.global_layers)} layers" if c.global_layers else "")
            + (f" (rope θ {c.rope_local_theta:g} there)" if c.rope_local_theta is not None else ""))
    if c.mlp_act != "silu":
        extras.append({"gelu_tanh": "GeGLU"}.get(c.mlp_act, c.mlp_act))
    if c.embed_scale is not None:
        extras.append(f"embeddings × {c.embed_scale:.4g}")
    if c.sandwich_norms:
        extras.append("norms on the attention and MLP outputs")
    if c.query_pre_attn_scalar is not None:
        extras.append(f"attention scores × {c.query_pre_attn_scalar:g}^-1/2")
    if c.final_logit_softcap is not None:
        extras.append(f"logits soft-capped at {c.final_logit_softcap:g}")
    lines = [
        f"{info.path}: {info.format}",
        f"  model: {c.model_type}, {c.num_hidden_layers} layers, hidden {c.hidden_size}, {heads}, ffn "
        f"{c.intermediate_size}, vocab {c.vocab_size}; {', '.join(extras)}",
        f"  parameters: {_size(info.parameters, '')} (bf16: {_size(2 * info.parameters)}); on disk: "
        f"{_size(info.disk_bytes)}",
        "  stored as: " + ", ".join(f"{kind} × {n}" for kind, n in sorted(info.storage.items())),
    ]
    q = info.quantization
    if q is not None:
        avg = f", {q['average_bits']:.2f} average bits in the decoder linears"
        lines.append(f"  quantization: {q['label']}{avg}; weights in memory {_size(q['weight_bytes'])} "
                     f"({q['weight_bytes'] / (2 * info.parameters):.2f}× bf16; float parts {q['config_dtype']})"
                     + ("" if q["kernel_format"] else "; simulated (float weights: an ablation format)"))
        if 4 < q["average_bits"] < 8:
            lines.append("  8-bit channels: " + ", ".join(f"{name.split('.')[-1]} {share:.0%}"
                                                          for name, share in q["int8_share"].items()))
    made = info.provenance or {}
    if "source" in made:
        c = made.get("calibration")
        lines.append(f"  made from: {made['source']}" + ("" if not isinstance(c, dict) else
                     f"; calibration {c.get('samples')} × {c.get('seq_len')} tokens of {c.get('data')}, seed {c.get('seed')}"))
    e = made.get("evaluation")
    if isinstance(e, dict):
        lines.append(f"  perplexity on {e['windows']}×{e['seq_len']} tokens of {e['data']}: float {e['float']:.3f}, "
                     f"quantized {e['quantized']:.3f} ({e['quantized'] - e['float']:+.3f})")
    t = info.tokenizer
    lines.append("  tokenizer: none found" if t is None else
                 f"  tokenizer: {t['tokens']} tokens ({t['kind']})" + (", chat template" if t["chat_template"] else ""))
    return "\n".join(lines)
