"""Model configuration for the Llama family (Llama 2/3/3.1/3.2, Mistral, Qwen2, Qwen3, SmolLM2, SmolLM3, Phi-3/Phi-4).

`LlamaConfig` is a frozen, hashable dataclass: pass it as a static argument to jitted functions.
`LlamaConfig.from_hf(d)` reads a Hugging Face `config.json` dict and refuses architectures the
model code does not implement, naming the field and what is supported.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Literal

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "smollm2", "smollm3", "phi3", "granite")
_UNSUPPORTED_HINTS = {
    "mixtral": "mixture-of-experts models are not supported",
    "qwen2_moe": "mixture-of-experts models are not supported",
    "qwen3_moe": "mixture-of-experts models are not supported",
    "granitemoe": "mixture-of-experts models are not supported",
    "deepseek_v2": "mixture-of-experts models are not supported",
    "gemma": "Gemma uses GeGLU and scaled embeddings; it is not a Llama-family model",
    "gemma2": "Gemma uses GeGLU and scaled embeddings; it is not a Llama-family model",
}


class ConfigError(ValueError):
    """A model configuration that mixjax cannot run; the message names the field and the fix."""


def _nope_layers(d: dict[str, Any], layers: int, source: str) -> tuple[int, ...]:
    """SmolLM3's layers without RoPE from config.json: `no_rope_layers` (1 where a layer uses RoPE), else every
    `no_rope_layer_interval`-th layer (transformers' default: 4, the layers 3, 7, 11, ...)."""
    flags = d.get("no_rope_layers")
    if flags is None:
        step = int(d.get("no_rope_layer_interval", 4))
        return tuple(i for i in range(layers) if (i + 1) % step == 0)
    if len(flags) != layers:
        raise ConfigError(f"{source}: no_rope_layers has {len(flags)} entries for num_hidden_layers={layers}")
    return tuple(i for i, use in enumerate(flags) if not use)


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama-3 style frequency-dependent RoPE scaling (`rope_type == "llama3"`)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int
    rope_type: Literal["llama3"] = "llama3"


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Hyper-parameters of a Llama-family decoder.

    Dimension legend used across mixjax: B batch, T time, D hidden size, H query heads,
    KVH key/value heads, Dh head dim, F feed-forward size, V vocabulary, L layers, S cache length.
    """

    vocab_size: int
    hidden_size: int  # D
    intermediate_size: int  # F
    num_hidden_layers: int  # L
    num_attention_heads: int  # H
    num_key_value_heads: int  # KVH
    head_dim: int  # Dh
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v biases (Qwen2); o_proj never has one
    model_type: str = "llama"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    sliding_window: int | None = None  # Mistral: keys older than this many positions are masked
    qk_norm: bool = False  # Qwen3: an RMSNorm over each query and key head (weights [Dh]) before RoPE
    nope_layers: tuple[int, ...] = ()  # SmolLM3: the layers whose attention has no RoPE (NoPE), in increasing order

    def __post_init__(self):
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_attention_heads} must be a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "head_dim"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}={getattr(self, name)} must be positive")
        nope = self.nope_layers
        if list(nope) != sorted(set(nope)) or any(not 0 <= i < self.num_hidden_layers for i in nope):
            raise ConfigError(f"nope_layers={nope} must be increasing layer indices in [0, {self.num_hidden_layers})")

    @property
    def q_per_kv(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @classmethod
    def from_hf(cls, d: dict[str, Any], *, source: str = "config.json") -> "LlamaConfig":
        """Builds a config from a Hugging Face config dict; raises ConfigError naming `source`."""
        model_type = d.get("model_type", "llama")
        if model_type not in SUPPORTED_MODEL_TYPES:
            hint = _UNSUPPORTED_HINTS.get(model_type, "")
            raise ConfigError(
                f"{source}: model_type={model_type!r} is not supported"
                + (f" ({hint})" if hint else "")
                + f"; mixjax runs {', '.join(SUPPORTED_MODEL_TYPES)}."
            )
        if d.get("num_local_experts") or d.get("num_experts"):
            raise ConfigError(f"{source}: mixture-of-experts models are not supported")
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"{source}: hidden_act={act!r} is not supported; Llama-family models use 'silu'")
        if d.get("mlp_bias"):
            raise ConfigError(f"{source}: mlp_bias=true is not supported")
        try:
            hidden = int(d["hidden_size"])
            heads = int(d["num_attention_heads"])
            cfg = dict(
                vocab_size=int(d["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(d["intermediate_size"]),
                num_hidden_layers=int(d["num_hidden_layers"]),
                num_attention_heads=heads,
                num_key_value_heads=int(d.get("num_key_value_heads") or heads),
                head_dim=int(d.get("head_dim") or hidden // heads),
            )
        except KeyError as e:
            raise ConfigError(f"{source}: required field {e.args[0]!r} is missing") from None
        scaling = d.get("rope_scaling") or (d.get("rope_parameters") if isinstance(d.get("rope_parameters"), dict) else None)
        partial = d.get("partial_rotary_factor", (scaling or {}).get("partial_rotary_factor", 1.0))
        if partial is not None and float(partial) != 1.0:
            raise ConfigError(f"{source}: partial_rotary_factor={partial} (RoPE on part of each head, e.g. Phi-4-mini) is "
                              "not supported; mixjax rotates whole heads")
        rope_theta = d.get("rope_theta")
        if rope_theta is None and isinstance(d.get("rope_parameters"), dict):
            rope_theta = d["rope_parameters"].get("rope_theta")
        rope = None
        if scaling:
            kind = scaling.get("rope_type", scaling.get("type", "default"))
            if kind == "llama3":
                rope = RopeScaling(
                    factor=float(scaling["factor"]),
                    low_freq_factor=float(scaling["low_freq_factor"]),
                    high_freq_factor=float(scaling["high_freq_factor"]),
                    original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
                )
            elif kind != "default":
                raise ConfigError(
                    f"{source}: rope_scaling type {kind!r} is not supported; mixjax implements "
                    "'default' and 'llama3'"
                )
        eos = d.get("eos_token_id")
        eos_ids = tuple(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else []))
        window = d.get("sliding_window") if d.get("use_sliding_window", model_type in ("mistral", "phi3")) else None
        return cls(
            **cfg,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-5)),
            rope_theta=float(rope_theta if rope_theta is not None else 10000.0),
            rope_scaling=rope,
            max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=bool(d.get("attention_bias", model_type == "qwen2")),
            model_type=model_type,
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=eos_ids,
            sliding_window=int(window) if window else None,
            qk_norm=model_type == "qwen3",
            nope_layers=_nope_layers(d, int(d["num_hidden_layers"]), source) if model_type == "smollm3" else (),
        )

    def to_hf(self) -> dict[str, Any]:
        """The Hugging Face config.json dict of this config, for `LlamaForCausalLM`, `MistralForCausalLM`,
        `Qwen2ForCausalLM`, `Qwen3ForCausalLM` or `SmolLM3ForCausalLM` (`from_hf` reads it back to an equal config; a
        SmolLM2 read from GGUF is a Llama). Raises ConfigError for a combination none of them runs."""
        model_type = self.model_type if self.model_type in ("mistral", "qwen2", "qwen3", "smollm3", "phi3") else "llama"
        if self.nope_layers and model_type != "smollm3":
            raise ConfigError(f"nope_layers={self.nope_layers} (layers without RoPE) is SmolLM3's layout; a "
                              f"{model_type} config.json cannot hold it")
        if self.qk_norm != (model_type == "qwen3"):
            raise ConfigError(f"qk_norm={self.qk_norm} with model_type={self.model_type!r}: the query/key head norms "
                              "are Qwen3's layout and Qwen3's only")
        if self.attention_bias and model_type not in ("qwen2", "qwen3"):
            raise ConfigError(f"attention_bias (q/k/v biases without an o_proj bias) is Qwen2's layout; a "
                              f"{model_type} config.json cannot hold it")
        if self.sliding_window and model_type not in ("mistral", "phi3"):
            raise ConfigError(f"sliding_window={self.sliding_window} is Mistral's; a {model_type} config.json "
                              "cannot hold it")
        arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                "qwen3": "Qwen3ForCausalLM", "smollm3": "SmolLM3ForCausalLM", "phi3": "Phi3ForCausalLM"}[model_type]
        eos = list(self.eos_token_ids)
        d: dict[str, Any] = dict(
            architectures=[arch], model_type=model_type, vocab_size=self.vocab_size, hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size, num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads, num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim, hidden_act="silu", rms_norm_eps=self.rms_norm_eps, rope_theta=self.rope_theta,
            max_position_embeddings=self.max_position_embeddings, tie_word_embeddings=self.tie_word_embeddings,
            bos_token_id=self.bos_token_id, eos_token_id=eos[0] if len(eos) == 1 else eos or None)
        if self.rope_scaling is not None:
            d["rope_scaling"] = dataclasses.asdict(self.rope_scaling)
        if model_type in ("llama", "smollm3"):
            d.update(attention_bias=False, mlp_bias=False)
            if model_type == "smollm3":  # HF's list: 1 where a layer uses RoPE; no pad token (mixjax keeps none,
                # and SmolLM3Config's default, 128004, lies outside smaller vocabularies)
                d.update(no_rope_layers=[int(i not in self.nope_layers) for i in range(self.num_hidden_layers)],
                         use_sliding_window=False, sliding_window=None, pad_token_id=None)
        elif model_type in ("mistral", "phi3"):
            d["sliding_window"] = self.sliding_window
            if model_type == "phi3":  # (its q/k/v and gate/up are stored fused: `convert.save_hf` fuses them)
                d.update(attention_bias=False, pad_token_id=None)
        else:
            d.update(use_sliding_window=False, sliding_window=None)
            if model_type == "qwen3":
                d["attention_bias"] = self.attention_bias
        return d

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LlamaConfig":
        d = dict(d)
        if d.get("rope_scaling") is not None:
            d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
        d["eos_token_ids"] = tuple(d.get("eos_token_ids") or ())
        d["nope_layers"] = tuple(d.get("nope_layers") or ())  # JSON gives lists; a config is hashed (jit's static)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown LlamaConfig fields {sorted(unknown)}")
        return cls(**d)

    def to_json(self, path: str | os.PathLike) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2)
