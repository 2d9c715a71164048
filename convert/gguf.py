"""GGUF files (llama.cpp) → (LlamaConfig, params).

Read with `gguf.GGUFReader` (memory-mapped), each tensor dequantized to f32 with
`gguf.quants.dequantize` as it is copied into the `ParamBuffer`. GGML stores a [N, K] weight with its
dimensions listed as (K, N); the numpy view is already [N, K]. llama.cpp's converter interleaves the
rows of q_proj / k_proj of `llama` (and `smollm3`) models for GGML's adjacent-pair RoPE; `_unpermute_rows` restores
Hugging Face's rotate-half order. `qwen2`, `qwen3` and `phi3` files are stored unpermuted (GGML runs them with NeoX
RoPE); `phi3` keeps q/k/v in one `attn_qkv` and gate/up in one `ffn_up`, split here (`layout.split_fused_gguf`).
`gemma2` and `gemma3` files are unpermuted too, store each RMSNorm weight as 1 + w (what mixjax folds in from Hugging
Face's w) and leave to the architecture, as llama.cpp does, the embeddings' √D scale, the sliding-window layers'
pattern (Gemma 2: every other layer global; Gemma 3: every sixth) unless `attention.sliding_window_pattern` says
otherwise, Gemma 3's windowed layers' RoPE base (10 000, or `rope.freq_base_swa`) and the 27B models' attention
scale ((hidden / heads)^-1/2).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from convert.layout import GGUF_FUSED_NAME, GGUF_NAMES, IGNORED_SUFFIXES, ConvertError, ParamBuffer, split_fused_gguf
from mixjax.config import ConfigError, LlamaConfig, RopeScaling
from mixjax.model import rope_inv_freq

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3", "smollm3", "phi3", "gemma2", "gemma3")
SMOLLM3_NOPE_STEP = 4  # llama.cpp's SmolLM3: every 4th layer without RoPE, fixed (no GGUF key holds it)
GEMMA_GLOBAL_STEP = {"gemma2": 2, "gemma3": 6}  # llama.cpp: every n-th layer global, the others with the window
GEMMA3_LOCAL_THETA = 10000.0  # llama.cpp's Gemma 3: the sliding-window layers' RoPE base
GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}  # llama.cpp's 27B models (by depth) scale attention by
# (hidden / heads)^-1/2


def gemma_global_layers(arch: str, layers: int) -> tuple[int, ...]:
    """llama.cpp's global (window-less) layers of a `gemma2` / `gemma3` file without a pattern key."""
    return tuple(i for i in range(layers) if (i + 1) % GEMMA_GLOBAL_STEP[arch] == 0)


def gemma_query_scalar(arch: str, layers: int, hidden: int, heads: int, head_dim: int) -> float | None:
    """llama.cpp's Gemma 2 / 3 attention scale as `LlamaConfig.query_pre_attn_scalar` (None: head_dim's)."""
    qpas = hidden / heads if layers == GEMMA_27B_LAYERS[arch] else head_dim
    return None if qpas == head_dim else float(qpas)


def _gemma_global_layers(reader, arch: str, layers: int, path: Path) -> tuple[int, ...]:
    pattern = _field(reader, f"{arch}.attention.sliding_window_pattern")
    if pattern is None:
        return gemma_global_layers(arch, layers)
    if isinstance(pattern, (list, tuple)):  # a flag a layer: true where it has the window
        if len(pattern) != layers:
            raise ConfigError(f"{path}: {arch}.attention.sliding_window_pattern has {len(pattern)} entries for "
                              f"{layers} layers")
        return tuple(i for i, windowed in enumerate(pattern) if not windowed)
    return tuple(i for i in range(layers) if (i + 1) % int(pattern) == 0)


def _open(path: Path):
    from gguf import GGUFReader

    try:
        return GGUFReader(str(path))
    except (ValueError, IndexError, KeyError, OSError, TypeError) as e:
        raise ConvertError(f"{path}: truncated or corrupt GGUF file ({type(e).__name__}: {e}); re-download it") from None


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


def read_config(reader, path: Path) -> LlamaConfig:
    """Maps GGUF metadata to a LlamaConfig; refuses architectures and RoPE variants mixjax lacks."""
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ConfigError(
            f"{path}: general.architecture={arch!r} is not supported; mixjax reads GGUF files of "
            f"{', '.join(SUPPORTED_ARCHITECTURES)} models"
        )
    names = {t.name for t in reader.tensors}
    scaling = _field(reader, f"{arch}.rope.scaling.type")
    linear = None
    if arch in ("gemma2", "gemma3") and scaling == "linear":  # Gemma 3's global layers (4B and larger)
        linear = RopeScaling(factor=float(_field(reader, f"{arch}.rope.scaling.factor", 1.0)), rope_type="linear")
    elif scaling not in (None, "none"):
        raise ConfigError(
            f"{path}: {arch}.rope.scaling.type={scaling!r} is not supported; mixjax implements default RoPE, "
            "Llama-3 scaling (stored as rope_freqs) and Gemma 3's linear scaling"
        )

    def need(key):
        value = _field(reader, f"{arch}.{key}")
        if value is None:
            raise ConfigError(f"{path}: required GGUF metadata {arch}.{key!s} is missing")
        return value

    hidden, heads = int(need("embedding_length")), int(need("attention.head_count"))
    head_dim = int(_field(reader, f"{arch}.attention.key_length", hidden // heads))
    rotated = _field(reader, f"{arch}.rope.dimension_count")
    if rotated is not None and int(rotated) != head_dim:
        raise ConfigError(f"{path}: {arch}.rope.dimension_count={rotated} rotates part of each {head_dim}-wide head "
                          "(partial RoPE, e.g. Phi-4-mini), which mixjax does not implement")
    vocab = _field(reader, f"{arch}.vocab_size")
    if vocab is None:
        tokens = reader.fields.get("tokenizer.ggml.tokens")
        vocab = len(tokens.data) if tokens is not None else None
    if vocab is None:
        raise ConfigError(f"{path}: neither {arch}.vocab_size nor tokenizer.ggml.tokens is present")
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    window = _field(reader, f"{arch}.attention.sliding_window")  # mixjax's export records Mistral's window here
    layers = int(need("block_count"))
    gemma = arch in ("gemma2", "gemma3")
    softcap = {k: _field(reader, f"{arch}.{k}_logit_softcapping") for k in ("attn", "final")}
    cfg = LlamaConfig(
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(need("feed_forward_length")),
        num_hidden_layers=int(need("block_count")),
        num_attention_heads=heads,
        num_key_value_heads=int(_field(reader, f"{arch}.attention.head_count_kv", heads)),
        head_dim=head_dim,
        rms_norm_eps=_decimal(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-6 if gemma else 1e-5)),
        rope_theta=_decimal(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        max_position_embeddings=int(_field(reader, f"{arch}.context_length", 2048)),
        tie_word_embeddings="output.weight" not in names,
        attention_bias="blk.0.attn_q.bias" in names,
        model_type="mistral" if window and arch == "llama" else "gemma3_text" if arch == "gemma3" else arch,  # (Mistral:
        sliding_window=int(window) if window else None,  # llama.cpp's llama with a window)
        qk_norm=arch in ("qwen3", "gemma3"),
        nope_layers=tuple(i for i in range(layers) if (i + 1) % SMOLLM3_NOPE_STEP == 0) if arch == "smollm3" else (),
        rope_scaling=linear,
        mlp_act="gelu_tanh" if gemma else "silu",
        embed_scale=hidden ** 0.5 if gemma else None,
        sandwich_norms=gemma,
        global_layers=_gemma_global_layers(reader, arch, layers, path) if gemma and window else (),
        rope_local_theta=_decimal(_field(reader, f"{arch}.rope.freq_base_swa", GEMMA3_LOCAL_THETA))
        if arch == "gemma3" else None,
        query_pre_attn_scalar=gemma_query_scalar(arch, layers, hidden, heads, head_dim) if gemma else None,
        attn_logit_softcap=_decimal(softcap["attn"]) if gemma and softcap["attn"] else None,
        final_logit_softcap=_decimal(softcap["final"]) if gemma and softcap["final"] else None,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_ids=_end_ids(reader, eos),
    )
    rope_freqs = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    if rope_freqs is not None:
        cfg = dataclasses.replace(cfg, rope_scaling=_llama3_scaling(reader, arch, cfg, _dequantize(rope_freqs), path))
    return cfg


def _end_ids(reader, eos) -> tuple[int, ...]:
    """The ids generation stops at: eos, then llama.cpp's end-of-turn and end-of-message tokens if present (llama.cpp
    stops at all three; Llama 3 Instruct ends its turns with eot)."""
    ids = [eos, _field(reader, "tokenizer.ggml.eot_token_id"), _field(reader, "tokenizer.ggml.eom_token_id")]
    return tuple(dict.fromkeys(int(i) for i in ids if i is not None))


def _decimal(value) -> float:
    """A GGUF float32 as the shortest decimal it rounds from (1e-05, not 9.999999747378752e-06): the value the
    model's config held before llama.cpp stored it in 32 bits."""
    return float(str(np.float32(value)))


def _llama3_scaling(reader, arch: str, cfg: LlamaConfig, rope_freqs: np.ndarray, path: Path) -> RopeScaling:
    """Recovers Llama-3 RoPE scaling from llama.cpp's `rope_freqs` (per-frequency divisors of inv_freq).

    llama.cpp stores the divisors, not the parameters. The factor is the largest divisor; the other
    parameters take Llama 3.x's published values unless the file records them, and the candidate must
    reproduce every divisor.
    """
    orig = _field(reader, f"{arch}.rope.scaling.original_context_length", 8192)
    candidate = RopeScaling(
        factor=float(rope_freqs.max()), low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=int(orig),
    )
    unscaled = rope_inv_freq(cfg)
    scaled = rope_inv_freq(dataclasses.replace(cfg, rope_scaling=candidate))
    expected = unscaled / rope_freqs.reshape(-1)
    if expected.shape != scaled.shape or not np.allclose(scaled, expected, rtol=1e-4, atol=0):
        raise ConfigError(
            f"{path}: rope_freqs.weight is not a Llama-3 RoPE scaling mixjax recognizes; convert from the "
            "Hugging Face directory instead"
        )
    return candidate


def _unpermute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """[n_heads*Dh, ...] rows (GGML pairs (0,1),(2,3)... per head) → rotate-half order (i, i + Dh/2)."""
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _dequantize(tensor) -> np.ndarray:
    from gguf.quants import dequantize

    shape = tuple(int(d) for d in reversed(tensor.shape))  # GGML lists dims fastest-first
    return dequantize(tensor.data, tensor.tensor_type).reshape(shape)


def _dequantize_named(tensor, path: Path) -> np.ndarray:
    try:
        return _dequantize(tensor)
    except (ValueError, NotImplementedError) as e:
        raise ConvertError(f"{path}: tensor {tensor.name!r} ({tensor.tensor_type.name}) cannot be dequantized: {e}") from None


def load_gguf(path: Path, dtype, mesh=None) -> tuple[LlamaConfig, dict]:
    reader = _open(path)
    cfg = read_config(reader, path)
    buffer = ParamBuffer(cfg, dtype, GGUF_NAMES, source=str(path))
    arch = _field(reader, "general.architecture")
    permute = arch in ("llama", "smollm3")  # Mistral and SmolLM2 files too
    for tensor in reader.tensors:
        if tensor.name.endswith(IGNORED_SUFFIXES):
            continue
        if tensor.name.startswith("rope_factors_"):
            raise ConfigError(f"{path}: {tensor.name} holds long-context RoPE factors (Phi-3.5, Phi-3-128k), which "
                              "mixjax does not implement")
        if arch == "phi3" and GGUF_FUSED_NAME.fullmatch(tensor.name):
            for name, piece in split_fused_gguf(tensor.name, _dequantize_named(tensor, path), cfg, str(path)):
                buffer.put(name, *GGUF_NAMES.resolve(name), piece)
            continue
        target = GGUF_NAMES.resolve(tensor.name)
        if target is None or not buffer.wants(target[0]):
            raise ConvertError(f"{path}: unexpected tensor {tensor.name!r} for a {cfg.model_type} model")
        value = _dequantize_named(tensor, path)
        if permute and target[0].startswith("layers.self_attn.q_proj"):
            value = _unpermute_rows(value, cfg.num_attention_heads)
        elif permute and target[0].startswith("layers.self_attn.k_proj"):
            value = _unpermute_rows(value, cfg.num_key_value_heads)
        buffer.put(tensor.name, *target, value)
    return cfg, buffer.finish(mesh)
