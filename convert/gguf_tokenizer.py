"""A Hugging Face fast tokenizer built from a GGUF file's vocabulary, without torch.

transformers' own GGUF tokenizer path imports torch, which mixjax does not need. GGUF files of byte-level
BPE models (`tokenizer.ggml.model == "gpt2"`: Llama 3, Qwen2, SmolLM2) carry everything a `tokenizers`
BPE model needs: the tokens, the merges, the token types (3 = control → special token), the bos/eos/pad
ids, the chat template, and `tokenizer.ggml.pre`, the name of the pre-tokenizer split. Other GGUF
vocabularies (sentencepiece `llama`) fall back to transformers, which then needs torch.
"""

from __future__ import annotations

from pathlib import Path

from convert.layout import ConvertError

# The pre-tokenizer split of each `tokenizer.ggml.pre` value we build (llama.cpp's names); None = GPT-2's.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZERS = {
    "default": (None, False),
    "gpt2": (None, False),
    "smollm": (None, True),  # every digit on its own, then GPT-2's split (as llama.cpp and SmolLM2's own
    # tokenizer.json do; transformers' GGUF conversion drops the digit split)
    "llama3": (_LLAMA3_SPLIT, False),
    "llama-bpe": (_LLAMA3_SPLIT, False),
    "qwen2": (_QWEN2_SPLIT, False),
}
CONTROL, USER_DEFINED = 3, 4  # llama.cpp's token types


def can_build(fields: dict) -> bool:
    return fields.get("tokenizer.ggml.model") == "gpt2" and fields.get("tokenizer.ggml.pre", "default") in PRE_TOKENIZERS


def read_tokenizer_fields(reader) -> dict:
    return {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.")}


def build_tokenizer(fields: dict, *, source: Path):
    """A `PreTrainedTokenizerFast` equal to the GGUF's byte-level BPE tokenizer."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tokens = fields.get("tokenizer.ggml.tokens")
    merges = fields.get("tokenizer.ggml.merges") or []  # none: a vocabulary of single bytes (gguf writes no empty array)
    if not tokens:
        raise ConvertError(f"{source}: the GGUF has no tokenizer.ggml.tokens; pass a tokenizer directory")
    split, digits = PRE_TOKENIZERS[fields.get("tokenizer.ggml.pre", "default")]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges],
                                   fuse_unk=False, byte_fallback=False))
    steps = [pre_tokenizers.Digits(individual_digits=True)] if digits else []
    if split is None:
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True))
    else:
        steps += [pre_tokenizers.Split(Regex(split), behavior="isolated"),
                  pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    backend.pre_tokenizer = pre_tokenizers.Sequence(steps)
    backend.decoder = decoders.ByteLevel()

    def special(key):
        i = fields.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    bos = special("bos")
    post = [processors.ByteLevel(trim_offsets=False)]
    if fields.get("tokenizer.ggml.add_bos_token") and bos is not None:
        post.append(processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                  special_tokens=[(bos, vocab[bos])]))
    backend.post_processor = processors.Sequence(post)
    named = {bos, special("eos"), special("unknown"), special("padding")}
    types = fields.get("tokenizer.ggml.token_type") or []
    specials = [tokens[i] for i, t in enumerate(types) if t == CONTROL and tokens[i] not in named]
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=bos, eos_token=special("eos"), unk_token=special("unknown"),
        pad_token=special("padding"), additional_special_tokens=specials,
        chat_template=fields.get("tokenizer.chat_template"),
    )
    user = [tokens[i] for i, t in enumerate(types) if t == USER_DEFINED]
    if user:  # added tokens that are not special: matched whole before BPE, kept when decoding
        tokenizer.add_tokens(user)
    return tokenizer
