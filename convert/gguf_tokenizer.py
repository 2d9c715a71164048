"""A Hugging Face fast tokenizer built from a GGUF file's vocabulary, without torch.

transformers' own GGUF tokenizer path imports torch, which mixjax does not need. Two vocabularies are built
here:

- byte-level BPE (`tokenizer.ggml.model == "gpt2"`: Llama 3, Qwen2, SmolLM2): the tokens, the merges, the
  token types (3 = control → special token), the bos/eos/pad ids, the chat template, and
  `tokenizer.ggml.pre`, the name of the pre-tokenizer split;
- sentencepiece BPE (`"llama"`: Llama 2, Mistral, TinyLlama): tokens with scores and no merges. llama.cpp's
  tokenizer joins the adjacent pair whose concatenation is the best-scoring token, which is a BPE whose
  merges are every two-piece split of every normal token, best score first (transformers' `generate_merges`);
  spaces become "▁", one is prepended unless `add_space_prefix` is false, and characters outside the
  vocabulary fall back to their `<0xXX>` byte tokens. Special tokens written in the text are matched, as
  Hugging Face tokenizers do (sentencepiece itself reads them as text).

Other GGUF vocabularies fall back to transformers, which then needs torch.
"""

from __future__ import annotations

from pathlib import Path

from gguf import TokenType  # llama.cpp's token types

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
SPACE = "\u2581"  # sentencepiece's visible space


def can_build(fields: dict) -> bool:
    model = fields.get("tokenizer.ggml.model")
    if model == "llama":  # not built here: a normalization this module does not apply (a charsmap, collapsed spaces)
        return (fields.get("tokenizer.ggml.scores") is not None and not fields.get("tokenizer.ggml.precompiled_charsmap")
                and not fields.get("tokenizer.ggml.remove_extra_whitespaces"))
    return model == "gpt2" and fields.get("tokenizer.ggml.pre", "default") in PRE_TOKENIZERS


def read_tokenizer_fields(reader) -> dict:
    return {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.")}


def _byte_level(fields: dict, vocab: dict[str, int]):
    """The byte-level BPE backend (its merges and pre-tokenizer from the GGUF) and its post-processing steps."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    merges = fields.get("tokenizer.ggml.merges") or []  # none: a vocabulary of single bytes (gguf writes no empty array)
    split, digits = PRE_TOKENIZERS[fields.get("tokenizer.ggml.pre", "default")]
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
    return backend, [processors.ByteLevel(trim_offsets=False)]


def _sentencepiece(fields: dict, tokens: list[str], vocab: dict[str, int], *, source):
    """The sentencepiece BPE backend: merges recovered from the scores, spaces as "▁", byte fallback."""
    from tokenizers import Tokenizer, decoders, models, normalizers

    try:
        from transformers.tokenization_utils_base import generate_merges
    except ImportError:
        raise ConvertError(f"{source}: building its sentencepiece vocabulary needs transformers>=5 "
                           "(generate_merges); pip install -U transformers, or pass a tokenizer directory") from None
    scores = fields["tokenizer.ggml.scores"]
    types = fields.get("tokenizer.ggml.token_type") or [TokenType.NORMAL] * len(tokens)
    if len(scores) != len(tokens) or len(types) != len(tokens):
        raise ConvertError(f"{source}: {len(tokens)} tokens but {len(scores)} scores and {len(types)} token types; "
                           "the GGUF's vocabulary is damaged: pass a tokenizer directory")
    normal = {t: i for i, (t, kind) in enumerate(zip(tokens, types)) if kind == TokenType.NORMAL}
    merges = generate_merges(normal, {t: scores[i] for t, i in normal.items()})
    unk = fields.get("tokenizer.ggml.unknown_token_id")
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, fuse_unk=True,
                                   unk_token=tokens[unk] if unk is not None and 0 <= unk < len(tokens) else None))
    prefix = fields.get("tokenizer.ggml.add_space_prefix", True)  # llama.cpp's default for this vocabulary
    backend.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE)] * bool(prefix)
                                              + [normalizers.Replace(" ", SPACE)])
    backend.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
                                        + [decoders.Strip(" ", 1, 0)] * bool(prefix))
    return backend, []


def build_tokenizer(fields: dict, *, source: Path):
    """A `PreTrainedTokenizerFast` equal to the GGUF's byte-level or sentencepiece BPE tokenizer."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    tokens = fields.get("tokenizer.ggml.tokens")
    if not tokens:
        raise ConvertError(f"{source}: the GGUF has no tokenizer.ggml.tokens; pass a tokenizer directory")
    vocab = {tok: i for i, tok in enumerate(tokens)}
    spm = fields.get("tokenizer.ggml.model") == "llama"
    backend, post = _sentencepiece(fields, tokens, vocab, source=source) if spm else _byte_level(fields, vocab)

    def special(key):
        i = fields.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    eos = special("eos")
    bos = special("bos") if fields.get("tokenizer.ggml.add_bos_token", spm) else None  # llama.cpp's defaults
    eos_end = eos if fields.get("tokenizer.ggml.add_eos_token") else None
    if bos is not None or eos_end is not None:
        head, tail = [t for t in (bos,) if t is not None], [t for t in (eos_end,) if t is not None]
        post.append(processors.TemplateProcessing(
            single=" ".join(head + ["$A"] + tail), pair=" ".join(head + ["$A"] + tail + head + ["$B"] + tail),
            special_tokens=[(t, vocab[t]) for t in dict.fromkeys(head + tail)]))
    if post:
        backend.post_processor = processors.Sequence(post)
    named = {special("bos"), eos, special("unknown"), special("padding")}
    types = fields.get("tokenizer.ggml.token_type") or []
    specials = [tokens[i] for i, t in enumerate(types) if t == TokenType.CONTROL and tokens[i] not in named]
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=special("bos"), eos_token=eos, unk_token=special("unknown"),
        pad_token=special("padding"), additional_special_tokens=specials,
        chat_template=fields.get("tokenizer.chat_template"),
    )
    user = [tokens[i] for i, t in enumerate(types) if t == TokenType.USER_DEFINED]
    if user:  # added tokens that are not special: matched whole before BPE, kept when decoding
        tokenizer.add_tokens(user)
    return tokenizer
