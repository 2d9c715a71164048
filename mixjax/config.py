"""Model configuration for the Llama family (Llama 2/3/3.1/3.2, Mistral, Qwen2, Qwen3, SmolLM2, SmolLM3, Phi-3/Phi-4)
and the Gemma decoders built like it (Gemma 1, Gemma 2, Gemma 3 text).

`LlamaConfig` is a frozen, hashable dataclass: pass it as a static argument to jitted functions.
`LlamaConfig.from_hf(d)` reads a Hugging Face `config.json` dict and refuses architectures the
model code does not implement, naming the field and what is supported.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Literal

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "smollm2", "smollm3", "phi3", "granite", "gemma",
                         "gemma2", "gemma3_text")
GEMMA_TYPES = ("gemma", "gemma2", "gemma3_text")  # norms that scale by (1 + w), folded into w as a checkpoint loads
SANDWICH_TYPES = ("gemma2", "gemma3_text")  # norms on the attention's and the MLP's outputs too
_UNSUPPORTED_HINTS = {
    "mixtral": "mixture-of-experts models are not supported",
    "qwen2_moe": "mixture-of-experts models are not supported",
    "qwen3_moe": "mixture-of-experts models are not supported",
    "granitemoe": "mixture-of-experts models are not supported",
    "deepseek_v2": "mixture-of-experts models are not supported",
    "gemma3": "a Gemma 3 image-text config without a text_config; mixjax reads Gemma3ForCausalLM checkpoints and "
              "the language model of Gemma3ForConditionalGeneration ones",
}
MLP_ACTIVATIONS = ("silu", "gelu_tanh")


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
    """RoPE frequency scaling: Llama-3's frequency-dependent one (`rope_type == "llama3"`, all fields), or every
    frequency ÷ factor (`"linear"`, Gemma 3's global layers; the other fields None)."""

    factor: float
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    original_max_position_embeddings: int | None = None
    rope_type: Literal["llama3", "linear"] = "llama3"

    def __post_init__(self):
        llama3 = (self.low_freq_factor, self.high_freq_factor, self.original_max_position_embeddings)
        if self.rope_type == "llama3" and None in llama3:
            raise ConfigError("llama3 RoPE scaling needs low_freq_factor, high_freq_factor and "
                              "original_max_position_embeddings")
        if self.rope_type not in ("llama3", "linear"):
            raise ConfigError(f"rope_type={self.rope_type!r}: mixjax implements 'llama3' and 'linear' RoPE scaling")
        if not self.factor > 0:
            raise ConfigError(f"RoPE scaling factor={self.factor} must be positive")


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
    # Gemma (norm weights are stored as 1 + w: the (1 + w) scaling is folded in as a checkpoint loads)
    mlp_act: str = "silu"  # the gate's activation: "silu" (SwiGLU) or "gelu_tanh" (Gemma's GeGLU, tanh GELU)
    embed_scale: float | None = None  # Gemma: looked-up embeddings × this (√D), rounded to the params' dtype
    sandwich_norms: bool = False  # Gemma 2, 3: RMSNorms on the attention and MLP outputs before each residual add
    # (params `layers.attn_output_norm`, `layers.mlp_output_norm`)
    global_layers: tuple[int, ...] = ()  # with sliding_window: the layers that attend to every position (Gemma 2, 3);
    # empty: every layer has the window (Mistral)
    rope_local_theta: float | None = None  # Gemma 3: the RoPE base of the sliding-window layers (no scaling there)
    final_logit_softcap: float | None = None  # logits → cap·tanh(logits / cap)
    attn_logit_softcap: float | None = None  # Gemma 2: attention scores → cap·tanh(scores / cap) before the softmax
    # (in the decode attention kernels and XLA's; cuDNN's prefill attention steps aside)
    query_pre_attn_scalar: float | None = None  # Gemma 2/3: attention scores × this^-1/2 instead of head_dim^-1/2
    # (gemma-3-27b: 168 against heads of 128): √(head_dim / this) on the query head norm's weight where there is one
    # (Gemma 3), else the attention's score factor (Gemma 2)

    def __post_init__(self):
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_attention_heads} must be a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "head_dim"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}={getattr(self, name)} must be positive")
        for name in ("nope_layers", "global_layers"):
            ids = getattr(self, name)
            if list(ids) != sorted(set(ids)) or any(not 0 <= i < self.num_hidden_layers for i in ids):
                raise ConfigError(f"{name}={ids} must be increasing layer indices in [0, {self.num_hidden_layers})")
        if self.global_layers and not self.sliding_window:
            raise ConfigError(f"global_layers={self.global_layers} without a sliding_window: every layer is global")
        if self.mlp_act not in MLP_ACTIVATIONS:
            raise ConfigError(f"mlp_act={self.mlp_act!r}: mixjax implements {', '.join(MLP_ACTIVATIONS)}")
        for name in ("query_pre_attn_scalar", "final_logit_softcap", "attn_logit_softcap"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ConfigError(f"{name}={value} must be positive (or None)")

    def layer_window(self, i: int) -> int | None:
        """Layer i's sliding window (None: it attends to every earlier position)."""
        return None if i in self.global_layers else self.sliding_window

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
        gemma = model_type in GEMMA_TYPES
        act_field = "hidden_activation" if d.get("hidden_activation") else "hidden_act"
        act = d.get(act_field, "gelu_pytorch_tanh" if gemma else "silu")
        mlp_act = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh"}.get(act)
        if gemma and act == "gelu":  # Gemma's first releases: meant as the tanh approximation (as transformers reads it)
            mlp_act = "gelu_tanh"
        if mlp_act is None:
            raise ConfigError(f"{source}: {act_field}={act!r} is not supported; mixjax runs 'silu' (SwiGLU) and "
                              "'gelu_pytorch_tanh' (Gemma's GeGLU)")
        if d.get("attn_logit_softcapping") and model_type != "gemma2":
            raise ConfigError(f"{source}: attn_logit_softcapping={d['attn_logit_softcapping']} (attention scores "
                              f"soft-capped) is Gemma 2's; mixjax does not run it in a {model_type} model")
        if d.get("use_bidirectional_attention"):
            raise ConfigError(f"{source}: use_bidirectional_attention=true (an encoder-style Gemma) is not supported; "
                              "mixjax runs causal decoders")
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
        qpas = d.get("query_pre_attn_scalar") if gemma else None
        qpas = None if qpas is None or float(qpas) == cfg["head_dim"] else float(qpas)
        rope_params = d.get("rope_parameters") if isinstance(d.get("rope_parameters"), dict) else None
        local_rope = None
        if model_type == "gemma3_text":  # global and sliding-window layers have RoPE of their own
            if rope_params is not None and "full_attention" in rope_params:
                local_rope = rope_params.get("sliding_attention") or {}
                rope_params = rope_params.get("full_attention") or {}
            else:
                local_rope = {"rope_theta": d.get("rope_local_base_freq", 10000.0)}
            if local_rope.get("rope_type", "default") != "default":
                raise ConfigError(f"{source}: the sliding-window layers' RoPE has rope_type="
                                  f"{local_rope['rope_type']!r}; mixjax runs 'default' there")
        scaling = d.get("rope_scaling") or rope_params
        partial = d.get("partial_rotary_factor", (scaling or {}).get("partial_rotary_factor", 1.0))
        if partial is not None and float(partial) != 1.0:
            raise ConfigError(f"{source}: partial_rotary_factor={partial} (RoPE on part of each head, e.g. Phi-4-mini) is "
                              "not supported; mixjax rotates whole heads")
        rope_theta = d.get("rope_theta")
        if rope_theta is None and rope_params is not None:
            rope_theta = rope_params.get("rope_theta")
        if rope_theta is None and model_type == "gemma3_text":
            rope_theta = 1_000_000.0  # transformers' default for Gemma 3's global layers
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
            elif kind == "linear":
                rope = RopeScaling(factor=float(scaling["factor"]), rope_type="linear")
            elif kind != "default":
                raise ConfigError(
                    f"{source}: rope_scaling type {kind!r} is not supported; mixjax implements "
                    "'default', 'linear' and 'llama3'"
                )
        eos = d.get("eos_token_id")
        eos_ids = tuple(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else []))
        window = d.get("sliding_window") if d.get("use_sliding_window", model_type in ("mistral", "phi3",
                                                                                    *SANDWICH_TYPES)) else None
        layers = int(d["num_hidden_layers"])
        global_layers: tuple[int, ...] = ()
        if model_type in SANDWICH_TYPES:
            kinds = d.get("layer_types")
            if kinds is None:  # older config.json files: every `sliding_window_pattern`-th layer is global (Gemma 2:
                # every other)
                step = int(d.get("sliding_window_pattern") or (6 if model_type == "gemma3_text" else 2))
                kinds = ["full_attention" if (i + 1) % step == 0 else "sliding_attention" for i in range(layers)]
            if len(kinds) != layers or set(kinds) - {"full_attention", "sliding_attention"}:
                raise ConfigError(f"{source}: layer_types must name 'full_attention' or 'sliding_attention' for each "
                                  f"of the {layers} layers")
            global_layers = tuple(i for i, kind in enumerate(kinds) if kind == "full_attention")
            if not window:
                global_layers = ()
        return cls(
            **cfg,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6 if gemma else 1e-5)),
            rope_theta=float(rope_theta if rope_theta is not None else 10000.0),
            rope_scaling=rope,
            max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", gemma)),
            attention_bias=bool(d.get("attention_bias", model_type == "qwen2")),
            model_type=model_type,
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=eos_ids,
            sliding_window=int(window) if window else None,
            qk_norm=model_type in ("qwen3", "gemma3_text"),
            nope_layers=_nope_layers(d, layers, source) if model_type == "smollm3" else (),
            mlp_act=mlp_act,
            embed_scale=hidden ** 0.5 if gemma else None,
            sandwich_norms=model_type in SANDWICH_TYPES,
            global_layers=global_layers,
            rope_local_theta=float(local_rope.get("rope_theta", 10000.0)) if local_rope is not None else None,
            final_logit_softcap=float(d["final_logit_softcapping"]) if d.get("final_logit_softcapping") else None,
            attn_logit_softcap=float(d["attn_logit_softcapping"]) if d.get("attn_logit_softcapping") else None,
            query_pre_attn_scalar=qpas,
        )

    def to_hf(self) -> dict[str, Any]:
        """The Hugging Face config.json dict of this config, for `LlamaForCausalLM`, `MistralForCausalLM`,
        `Qwen2ForCausalLM`, `Qwen3ForCausalLM`, `SmolLM3ForCausalLM`, `Phi3ForCausalLM`, `GemmaForCausalLM`, `Gemma2ForCausalLM` or
        `Gemma3ForCausalLM` (`from_hf` reads it back to an equal config; a SmolLM2 read from GGUF is a Llama). Raises
        ConfigError for a combination none of them runs."""
        model_type = self.model_type if self.model_type in ("mistral", "qwen2", "qwen3", "smollm3", "phi3",
                                                            *GEMMA_TYPES) else "llama"
        if self.nope_layers and model_type != "smollm3":
            raise ConfigError(f"nope_layers={self.nope_layers} (layers without RoPE) is SmolLM3's layout; a "
                              f"{model_type} config.json cannot hold it")
        if self.qk_norm != (model_type in ("qwen3", "gemma3_text")):
            raise ConfigError(f"qk_norm={self.qk_norm} with model_type={self.model_type!r}: the query/key head norms "
                              "are Qwen3's and Gemma 3's layout and theirs only")
        if self.attention_bias and model_type not in ("qwen2", "qwen3"):
            raise ConfigError(f"attention_bias (q/k/v biases without an o_proj bias) is Qwen2's layout; a "
                              f"{model_type} config.json cannot hold it")
        if self.sliding_window and model_type not in ("mistral", "phi3", *SANDWICH_TYPES):
            raise ConfigError(f"sliding_window={self.sliding_window} is Mistral's; a {model_type} config.json "
                              "cannot hold it")
        gemma = model_type in GEMMA_TYPES
        layout = (self.mlp_act == "gelu_tanh", self.embed_scale == self.hidden_size ** 0.5,
                  self.sandwich_norms == (model_type in SANDWICH_TYPES))
        if gemma != all(layout) or (not gemma and any(layout[:2])) or self.sandwich_norms and not gemma:
            raise ConfigError(f"mlp_act={self.mlp_act!r}, embed_scale={self.embed_scale}, sandwich_norms="
                              f"{self.sandwich_norms} with model_type={self.model_type!r}: no Hugging Face class runs "
                              "that combination (Gemma: GeGLU, embeddings × √D; Gemma 2 and 3 also the sandwich norms)")
        if self.global_layers and model_type not in SANDWICH_TYPES:
            raise ConfigError(f"global_layers is Gemma 2's and 3's layout; a {model_type} config.json cannot hold it")
        if self.rope_local_theta is not None and model_type != "gemma3_text":
            raise ConfigError(f"rope_local_theta is Gemma 3's layout; a {model_type} config.json cannot hold it")
        if self.attn_logit_softcap is not None and model_type != "gemma2":
            raise ConfigError(f"attn_logit_softcap is Gemma 2's; a {model_type} config.json cannot hold it")
        if self.query_pre_attn_scalar is not None and model_type not in SANDWICH_TYPES:
            raise ConfigError(f"query_pre_attn_scalar is Gemma 2's and 3's; a {model_type} config.json cannot hold it")
        if self.rope_scaling is not None and self.rope_scaling.rope_type == "linear" and model_type != "gemma3_text":
            raise ConfigError(f"linear RoPE scaling is written for Gemma 3 only; a {model_type} config.json from "
                              "mixjax cannot hold it")
        if self.final_logit_softcap is not None and not gemma:
            raise ConfigError(f"final_logit_softcap is Gemma's; a {model_type} config.json cannot hold it")
        arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                "qwen3": "Qwen3ForCausalLM", "smollm3": "SmolLM3ForCausalLM", "phi3": "Phi3ForCausalLM",
                "gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM",
                "gemma3_text": "Gemma3ForCausalLM"}[model_type]
        eos = list(self.eos_token_ids)
        d: dict[str, Any] = dict(
            architectures=[arch], model_type=model_type, vocab_size=self.vocab_size, hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size, num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads, num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim, hidden_act="gelu_pytorch_tanh" if gemma else "silu", rms_norm_eps=self.rms_norm_eps,
            rope_theta=self.rope_theta,
            max_position_embeddings=self.max_position_embeddings, tie_word_embeddings=self.tie_word_embeddings,
            bos_token_id=self.bos_token_id, eos_token_id=eos[0] if len(eos) == 1 else eos or None)
        if self.rope_scaling is not None:
            d["rope_scaling"] = {k: v for k, v in dataclasses.asdict(self.rope_scaling).items() if v is not None}
        if gemma:
            qpas = self.query_pre_attn_scalar or self.head_dim
            d.update(attention_bias=False, query_pre_attn_scalar=int(qpas) if float(qpas).is_integer() else qpas,
                     pad_token_id=None,
                     final_logit_softcapping=self.final_logit_softcap)
            if model_type in SANDWICH_TYPES:
                d.update(hidden_activation="gelu_pytorch_tanh", sliding_window=self.sliding_window,
                         attn_logit_softcapping=self.attn_logit_softcap,
                         layer_types=["full_attention" if self.layer_window(i) is None else "sliding_attention"
                                      for i in range(self.num_hidden_layers)])
            if model_type == "gemma3_text":
                d["rope_local_base_freq"] = self.rope_local_theta if self.rope_local_theta is not None else self.rope_theta
        elif model_type in ("llama", "smollm3"):
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
        for name in ("nope_layers", "global_layers"):  # JSON gives lists; a config is hashed (jit's static)
            d[name] = tuple(d.get(name) or ())
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown LlamaConfig fields {sorted(unknown)}")
        return cls(**d)

    def to_json(self, path: str | os.PathLike) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2)
