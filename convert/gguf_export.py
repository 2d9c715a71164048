"""(LlamaConfig, float params) → a GGUF file that llama.cpp and `convert.load` read: the inverse of convert/gguf.py.

The layout is llama.cpp's own (its convert_hf_to_gguf.py): `llama` for Llama, Mistral and SmolLM2 (q/k rows
interleaved per head for GGML's adjacent-pair RoPE; `smollm3` likewise, its NoPE layers llama.cpp's fixed every
fourth), `qwen2` for Qwen2 (rows as they are, q/k/v biases) and `qwen3`
for Qwen3 (rows as they are, the query/key head norms as `attn_q_norm` / `attn_k_norm`), GGUF
tensor names from the one `NAME_TABLE`, Llama-3 RoPE scaling as the `rope_freqs` divisors, no `output.weight`
when the head is tied. 1-D tensors (norms, biases) are F32, as llama.cpp writes them; the 2-D weights take the
chosen type: F32, F16, BF16 or Q8_0 (llama.cpp's blocks of 32 int8 with an f16 scale; a weight whose rows 32
does not divide falls back to F16, as llama.cpp's converter does).

A Hugging Face byte-level BPE tokenizer (Llama 3, Qwen2, SmolLM2, GPT-2) is written as the `gpt2` vocabulary
llama.cpp expects: every id's token (ids without one become `[PAD<id>]`, unused), token types (special added
tokens are control tokens, other added tokens user-defined), the merges, the bos/eos/unk/pad ids (the config's
other end-of-generation ids as eot/eom), whether a bos is prepended, the chat template, and `tokenizer.ggml.pre`,
the name llama.cpp gives the pre-tokenizer's split. A sentencepiece-style BPE tokenizer (Llama 2, Mistral: "▁" for
spaces, byte fallback) is written as llama.cpp's `llama` vocabulary: tokens with scores that rank each token by its
first merge (what convert/gguf_tokenizer.py turns back into merges), `<0xXX>` byte tokens typed as bytes, the unknown
token as unknown, and whether a space is prepended (`add_space_prefix`).
Other tokenizers are refused with the alternatives named.

The file is written tensor by tensor with `gguf.GGUFWriter` (the tensor table first, then each tensor's data),
so the export holds one tensor in numpy besides the params. It goes to a temporary file beside the target and
is renamed into place at the end: an interrupted or refused export leaves nothing.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from pathlib import Path

import numpy as np

from convert.layout import GGUF_NAMES, ConvertError
from mixjax.config import LlamaConfig

# `--dtype` names → GGML types of the 2-D weights
WEIGHT_TYPES = ("float32", "float16", "bfloat16", "q8_0")
_Q8_0_BLOCK = 32
_F16_MAX = float(np.finfo(np.float16).max)

# Byte-level BPE pre-tokenizers, as tokenizers' JSON describes them → llama.cpp's `tokenizer.ggml.pre` names
# (the same table convert/gguf_tokenizer.py builds tokenizers from, read the other way).
_GPT2_PRE = {"type": "ByteLevel", "use_regex": True}
_DIGITS_PRE = {"type": "Digits", "individual_digits": True}
_BYTE_TOKEN = re.compile(r"<0x[0-9A-F]{2}>")  # a sentencepiece byte-fallback token


def gguf_arch(cfg: LlamaConfig) -> str:
    """llama.cpp's architecture for cfg: `qwen2`, `qwen3`, `smollm3`, `gemma3`, or `llama` (Llama, Mistral,
    SmolLM2)."""
    if cfg.model_type == "gemma3_text":
        return "gemma3"
    return cfg.model_type if cfg.model_type in ("qwen2", "qwen3", "smollm3", "gemma2") else "llama"


def _check_gemma(cfg: LlamaConfig) -> None:
    """llama.cpp's gemma2 / gemma3 fix what a Hugging Face config states (module docstring of convert/gguf.py): refuses
    a config that differs there, and Gemma 1 (whose GGUF files mixjax does not read)."""
    from convert.gguf import GEMMA3_LOCAL_THETA, gemma_global_layers, gemma_query_scalar

    if cfg.model_type == "gemma":
        raise ConvertError("writing Gemma 1 as GGUF is not implemented; export it as a Hugging Face directory")
    arch = gguf_arch(cfg)
    if arch not in ("gemma2", "gemma3"):
        return
    layers = cfg.num_hidden_layers
    fixed = {"global_layers": (cfg.global_layers, gemma_global_layers(arch, layers) if cfg.sliding_window else ()),
             "query_pre_attn_scalar": (cfg.query_pre_attn_scalar, gemma_query_scalar(
                 arch, layers, cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim))}
    if arch == "gemma3":  # (and no final soft cap: llama.cpp's gemma3 has none)
        fixed.update(rope_local_theta=(cfg.rope_local_theta, GEMMA3_LOCAL_THETA),
                     final_logit_softcap=(cfg.final_logit_softcap, None))
    for field, (have, want) in fixed.items():
        if have != want:
            raise ConvertError(f"{field}={have}: llama.cpp's gemma3 runs {want} and no GGUF key says otherwise; export "
                               "this model as a Hugging Face directory instead")


def _ggml_type(dtype: str):
    from gguf import GGMLQuantizationType as T

    if dtype not in WEIGHT_TYPES:
        raise ConvertError(f"dtype={dtype!r} is not a GGUF weight type mixjax writes; use one of {', '.join(WEIGHT_TYPES)}")
    return {"float32": T.F32, "float16": T.F16, "bfloat16": T.BF16, "q8_0": T.Q8_0}[dtype]


def _file_type(qtype) -> int:
    from gguf import GGMLQuantizationType as T, LlamaFileType as F

    return {T.F32: F.ALL_F32, T.F16: F.MOSTLY_F16, T.BF16: F.MOSTLY_BF16, T.Q8_0: F.MOSTLY_Q8_0}[qtype]


def _permute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Rotate-half rows (i, i + Dh/2) → GGML's adjacent pairs per head; `convert.gguf._unpermute_rows` undoes it."""
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _rope_freqs(cfg: LlamaConfig) -> np.ndarray:
    """Llama-3 RoPE scaling as llama.cpp stores it: per frequency, the divisor of the unscaled inverse frequency."""
    import dataclasses

    from mixjax.model import rope_inv_freq

    s = cfg.rope_scaling
    if (s.low_freq_factor, s.high_freq_factor) != (1.0, 4.0):
        raise ConvertError(
            f"rope_scaling has low_freq_factor={s.low_freq_factor}, high_freq_factor={s.high_freq_factor}; a GGUF file "
            "keeps Llama-3 scaling as per-frequency divisors, which mixjax reads back only for Llama 3.1/3.2's 1 and 4. "
            "Export this model as a Hugging Face directory instead")
    unscaled = rope_inv_freq(dataclasses.replace(cfg, rope_scaling=None)).astype(np.float64)
    return (unscaled / rope_inv_freq(cfg).astype(np.float64)).astype(np.float32)


def _pre_name(pre_tokenizer: dict | None) -> str | None:
    """llama.cpp's `tokenizer.ggml.pre` for a byte-level BPE pre-tokenizer (tokenizers' JSON), None if unknown."""
    from convert.gguf_tokenizer import PRE_TOKENIZERS

    steps = (pre_tokenizer or {}).get("pretokenizers", [pre_tokenizer] if pre_tokenizer else [])
    if steps and all(step.get(k) == v for step in steps[-1:] for k, v in _GPT2_PRE.items()):
        head = steps[:-1]
        if not head:
            return "gpt2"
        if len(head) == 1 and all(head[0].get(k) == v for k, v in _DIGITS_PRE.items()):
            return "smollm"
    if (len(steps) == 2 and steps[0].get("type") == "Split" and steps[1].get("type") == "ByteLevel"
            and not steps[1].get("use_regex", True)):
        pattern = (steps[0].get("pattern") or {}).get("Regex")
        return {PRE_TOKENIZERS["llama-bpe"][0]: "llama-bpe", PRE_TOKENIZERS["qwen2"][0]: "qwen2"}.get(pattern)
    return None


def _other_end_ids(cfg: LlamaConfig, eos, tokens: list[str] | None = None) -> list[tuple[str, int]]:
    """The model's end-of-generation ids beside `eos` as llama.cpp's two other keys: `<|eom_id|>` as eom, the first
    other as eot (Llama 3's `<|eot_id|>`, Qwen2's `<|im_end|>`). llama.cpp stops at all three; GGUF has no key for
    a fourth."""
    others = [int(i) for i in cfg.eos_token_ids if eos is None or int(i) != int(eos)]
    text = (lambda i: tokens[i] if tokens is not None and 0 <= i < len(tokens) else "")  # noqa: E731
    eom = next((i for i in others if text(i) == "<|eom_id|>"), None)
    eot = next((i for i in others if i != eom), None)
    return [(method, i) for method, i in (("add_eot_token_id", eot), ("add_eom_token_id", eom)) if i is not None]


def _space_prefix(spec: dict) -> bool | None:
    """For a sentencepiece-style tokenizer (tokenizers' JSON: spaces replaced by "▁" in the normalizer, or a Metaspace
    pre-tokenizer that does not split), whether a "▁" is prepended; None for any other tokenizer."""
    from convert.gguf_tokenizer import SPACE

    norm, pre = spec.get("normalizer"), spec.get("pre_tokenizer")
    if norm and not pre:
        steps = norm.get("normalizers", [norm])
        prepend = [{"type": "Prepend", "prepend": SPACE}]
        replace = [{"type": "Replace", "pattern": {"String": " "}, "content": SPACE}]
        return True if steps == prepend + replace else False if steps == replace else None
    if pre and not norm and pre.get("type") == "Metaspace" and pre.get("replacement") == SPACE and not pre.get("split"):
        scheme = pre.get("prepend_scheme", "first" if pre.get("add_prefix_space", True) else "never")
        return scheme != "never"
    return None


def _sentencepiece_scores(vocab: dict[str, int], merges: list[str], n: int) -> list[float]:
    """A score per id for llama.cpp's `llama` vocabulary: −(rank of the first merge that makes the token), the tokens
    no merge makes below every merged one (single characters, bytes, specials: their scores join no merge)."""
    first: dict[str, int] = {}
    for rank, merge in enumerate(merges):
        first.setdefault(merge.replace(" ", "", 1), rank)
    scores = [-float(len(merges) + i) for i in range(n)]
    for text, i in vocab.items():
        if text in first:
            scores[i] = -float(first[text])
    return scores


def tokenizer_fields(tokenizer, cfg: LlamaConfig) -> list[tuple[str, object]]:
    """(GGUFWriter method, value) pairs that write `tokenizer` as llama.cpp's `gpt2` (byte-level BPE) or `llama`
    (sentencepiece-style BPE) vocabulary of cfg.vocab_size ids; ConvertError (with the alternatives) for any other.
    (gguf writes no empty array: a byte-level tokenizer without merges gets no merges key, which mixjax reads as none
    and llama.cpp refuses.)"""
    from gguf import TokenType

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ConvertError(f"{type(tokenizer).__name__} is not a fast (tokenizers) tokenizer; a GGUF vocabulary is "
                           "written from a tokenizer.json. Export without a tokenizer, or to a Hugging Face directory")
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    bpe = model.get("type") == "BPE"
    prefix = _space_prefix(spec) if bpe and model.get("byte_fallback") else None  # None: not sentencepiece-style
    pre = _pre_name(spec.get("pre_tokenizer")) if prefix is None and not model.get("byte_fallback") else None
    if not bpe or (prefix is None and pre is None):
        raise ConvertError(
            f"the tokenizer ({model.get('type')} model, normalizer {json.dumps(spec.get('normalizer'))[:80]}, "
            f"pre-tokenizer {json.dumps(spec.get('pre_tokenizer'))[:120]}) is neither a byte-level BPE that mixjax names "
            "for llama.cpp (GPT-2's, Llama 3's, Qwen2's or SmolLM2's split) nor a sentencepiece-style BPE (\"▁\" for "
            "spaces, byte fallback). Export without a tokenizer, export to a Hugging Face directory, or use llama.cpp's "
            "convert_hf_to_gguf.py")
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= cfg.vocab_size:
        raise ConvertError(f"the tokenizer has ids up to {max(vocab.values())}, beyond the model's vocab_size="
                           f"{cfg.vocab_size}: the tokenizer does not belong to this model")
    added = tokenizer.added_tokens_decoder  # {id: AddedToken}
    tokens = [f"[PAD{i}]" for i in range(cfg.vocab_size)]
    types = [int(TokenType.UNUSED)] * cfg.vocab_size
    def kind(text: str, i: int) -> TokenType:
        if prefix is not None and i == tokenizer.unk_token_id:
            return TokenType.UNKNOWN
        if prefix is not None and _BYTE_TOKEN.fullmatch(text):
            return TokenType.BYTE
        if i not in added:
            return TokenType.NORMAL
        return TokenType.CONTROL if added[i].special else TokenType.USER_DEFINED

    for text, i in vocab.items():
        tokens[i], types[i] = text, int(kind(text, i))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if eos is None and cfg.eos_token_ids:
        eos = cfg.eos_token_ids[0]
    probe = tokenizer.encode("a")
    if prefix is None:
        fields = [("add_tokenizer_model", "gpt2"), ("add_tokenizer_pre", pre), ("add_token_list", tokens),
                  ("add_token_types", types), ("add_token_merges", merges), ("add_add_space_prefix", False)]
    else:
        fields = [("add_tokenizer_model", "llama"), ("add_token_list", tokens),
                  ("add_token_scores", _sentencepiece_scores(vocab, merges, cfg.vocab_size)),
                  ("add_token_types", types), ("add_add_space_prefix", prefix)]
    fields.append(("add_add_bos_token", bos is not None and probe[:1] == [bos]))
    for method, i in (("add_bos_token_id", bos if bos is not None else cfg.bos_token_id), ("add_eos_token_id", eos),
                      ("add_unk_token_id", tokenizer.unk_token_id), ("add_pad_token_id", tokenizer.pad_token_id)):
        if i is not None:
            fields.append((method, int(i)))
    fields += _other_end_ids(cfg, eos, tokens)
    template = tokenizer.chat_template
    if isinstance(template, dict):  # several named templates: llama.cpp keeps the default one
        template = template.get("default")
    if template:
        fields.append(("add_chat_template", template))
    return fields


def _tensors(params, cfg: LlamaConfig, qtype):
    """(GGUF name, shape, numpy getter, GGML type) of every tensor, q/k rows permuted for `llama`, plus rope_freqs."""
    from gguf import GGMLQuantizationType as T

    from convert.hf import export_tensors

    permute = gguf_arch(cfg) in ("llama", "smollm3")
    out = []
    for name, shape, _, get in export_tensors(params, cfg, GGUF_NAMES):
        heads = (cfg.num_attention_heads if ".attn_q." in name else cfg.num_key_value_heads if ".attn_k." in name
                 else None)
        if permute and heads:
            get = (lambda g=get, h=heads: _permute_rows(np.asarray(g(), np.float32), h))
        kind = T.F32 if len(shape) == 1 else qtype
        if kind == T.Q8_0 and shape[-1] % _Q8_0_BLOCK:
            kind = T.F16  # llama.cpp's fallback for rows Q8_0's blocks do not tile
        out.append((name, tuple(shape), get, kind))
    if cfg.rope_scaling is not None and cfg.rope_scaling.rope_type == "llama3":
        freqs = _rope_freqs(cfg)
        out.append(("rope_freqs.weight", freqs.shape, lambda f=freqs: f, T.F32))
    return out


def _encode(name: str, value, kind) -> np.ndarray:
    """One tensor as the bytes GGUF stores for `kind`, after the NaN and float16-range checks."""
    import gguf
    from gguf import GGMLQuantizationType as T

    w = np.asarray(value, np.float32)
    if not np.all(np.isfinite(w)):
        raise ConvertError(f"{name} holds NaN or Inf: fix the model before exporting it")
    peak = float(np.max(np.abs(w))) if w.size else 0.0
    if kind in (T.F16, T.Q8_0) and peak > _F16_MAX * (127 if kind == T.Q8_0 else 1):
        raise ConvertError(f"{name} overflows float16 (|w| up to {peak:.3g}): export it as bfloat16 or float32")
    if kind in (T.F32, T.F16):
        return w.astype(np.float16 if kind == T.F16 else np.float32).view(np.uint8)
    return gguf.quants.quantize(w, kind)  # uint8 rows of blocks: BF16 and Q8_0


def save_gguf(path: str | os.PathLike, params, cfg: LlamaConfig, *, dtype: str = "float32", tokenizer=None,
              name: str | None = None, force: bool = False) -> Path:
    """Writes float params (stacked layers or a tuple of per-layer dicts) and cfg as one GGUF file that llama.cpp,
    transformers (`gguf_file=`) and `convert.load` read; with `tokenizer` (a Hugging Face byte-level BPE tokenizer)
    its vocabulary too. dtype: the 2-D weights' type, one of WEIGHT_TYPES. An existing file is replaced only with
    force=True. The params, config and tokenizer are checked before the first write; a tensor found non-finite
    or beyond float16's range while writing stops the export with nothing written."""
    import gguf
    from gguf import GGMLQuantizationType as T
    from gguf.quants import quant_shape_to_byte_shape

    target = Path(path).expanduser().absolute()
    if target.suffix != ".gguf":
        raise ConvertError(f"{target}: a GGUF file's name ends in .gguf")
    if target.is_dir():
        raise ConvertError(f"{target} is a directory; pass the path of the .gguf file to write")
    if target.exists() and not force:
        raise FileExistsError(f"{target} already exists; pass force=True (--force) to overwrite it")
    qtype = _ggml_type(dtype)
    arch = gguf_arch(cfg)
    if cfg.attention_bias and arch != "qwen2":
        raise ConvertError("attention_bias (q/k/v biases) is Qwen2's layout; llama.cpp's llama architecture has none")
    _check_gemma(cfg)  # (its norms are stored as 1 + w, as mixjax holds them)
    from convert.gguf import SMOLLM3_NOPE_STEP

    every_fourth = tuple(i for i in range(cfg.num_hidden_layers) if (i + 1) % SMOLLM3_NOPE_STEP == 0)
    if cfg.nope_layers and (arch != "smollm3" or cfg.nope_layers != every_fourth):
        raise ConvertError(f"nope_layers={cfg.nope_layers}: llama.cpp runs RoPE in every layer but SmolLM3's every "
                           f"{SMOLLM3_NOPE_STEP}th, and no GGUF key says otherwise; export this model as a Hugging Face "
                           "directory instead")
    eos = cfg.eos_token_ids[0] if cfg.eos_token_ids else None
    fields = tokenizer_fields(tokenizer, cfg) if tokenizer is not None else [
        (method, i) for method, i in (("add_bos_token_id", cfg.bos_token_id), ("add_eos_token_id", eos))
        if i is not None] + _other_end_ids(cfg, eos)
    tensors = _tensors(params, cfg, qtype)

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")  # created by the writer, as any new file
    writer = gguf.GGUFWriter(tmp, arch)
    try:
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(name or target.stem)
        writer.add_context_length(cfg.max_position_embeddings)
        writer.add_embedding_length(cfg.hidden_size)
        writer.add_block_count(cfg.num_hidden_layers)
        writer.add_feed_forward_length(cfg.intermediate_size)
        writer.add_head_count(cfg.num_attention_heads)
        writer.add_head_count_kv(cfg.num_key_value_heads)
        writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
        writer.add_rope_freq_base(cfg.rope_theta)
        writer.add_rope_dimension_count(cfg.head_dim)
        if cfg.head_dim * cfg.num_attention_heads != cfg.hidden_size:
            writer.add_key_length(cfg.head_dim)
            writer.add_value_length(cfg.head_dim)
        if cfg.rope_scaling is not None and cfg.rope_scaling.rope_type == "linear":
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(cfg.rope_scaling.factor)
        elif cfg.rope_scaling is not None:
            writer.add_rope_scaling_orig_ctx_len(cfg.rope_scaling.original_max_position_embeddings)
        if cfg.sliding_window:
            writer.add_sliding_window(cfg.sliding_window)
        if cfg.attn_logit_softcap is not None:
            writer.add_attn_logit_softcapping(cfg.attn_logit_softcap)
        if cfg.final_logit_softcap is not None:
            writer.add_final_logit_softcapping(cfg.final_logit_softcap)
        writer.add_vocab_size(cfg.vocab_size)
        writer.add_file_type(_file_type(qtype))
        if qtype == T.Q8_0:
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for method, value in fields:
            getattr(writer, method)(value)
        for tensor_name, shape, _, kind in tensors:  # every type as its bytes: [..., row bytes] uint8
            byte_shape = quant_shape_to_byte_shape(shape, kind)
            writer.add_tensor_info(tensor_name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)),
                                   raw_dtype=kind)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for tensor_name, _, get, kind in tensors:
            writer.write_tensor_data(_encode(tensor_name, get(), kind))
        writer.close()
        os.replace(tmp, target)
    finally:
        writer.close()  # a no-op once closed
        if tmp.exists():
            tmp.unlink()
    return target
