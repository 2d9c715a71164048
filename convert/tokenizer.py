"""Hugging Face tokenizers for every model source convert.load accepts."""

from __future__ import annotations

import logging
from pathlib import Path

from convert.layout import ConvertError, not_a_model

TOKENIZER_DIR = "tokenizer"  # inside a mixjax checkpoint: the files saved by `tokenizer.save_pretrained`
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")
_NO_TORCH_ADVICE = "PyTorch was not found"  # transformers logs this when imported without torch


class _DropNoTorchAdvice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(_NO_TORCH_ADVICE)


def quiet_no_torch_advice() -> None:
    """Drops the one line transformers logs at import when torch is absent ("PyTorch was not found. Models won't
    be available..."): mixjax uses transformers only for tokenizers, which need no torch, so the line would
    only alarm the user. Other transformers messages pass. Idempotent; call it before importing transformers."""
    logger = logging.getLogger("transformers")
    if not any(isinstance(f, _DropNoTorchAdvice) for f in logger.filters):
        logger.addFilter(_DropNoTorchAdvice())


def load_tokenizer(path: Path):
    """AutoTokenizer of a Hugging Face directory, of a .gguf file (its embedded vocabulary), or of a
    mixjax checkpoint (its `tokenizer/` folder)."""
    quiet_no_torch_advice()
    from transformers import AutoTokenizer

    from convert import orbax_io

    if path.is_file() and path.suffix == ".gguf":
        return _gguf_tokenizer(path)
    if path.is_dir() and orbax_io.is_checkpoint(path):
        path = path / TOKENIZER_DIR
        if not path.is_dir():
            raise ConvertError(
                f"{path.parent}: this mixjax checkpoint holds no tokenizer (saved without one); store the original "
                f"model's in it: convert.load_tokenizer(ORIGINAL).save_pretrained({str(path)!r}), ORIGINAL being the "
                "Hugging Face directory or .gguf file it was made from"
            )
    if path.is_dir():
        if not any((path / f).is_file() for f in _TOKENIZER_FILES):
            raise ConvertError(
                f"{path}: no tokenizer files ({', '.join(_TOKENIZER_FILES)}); save the tokenizer next to "
                "the weights or pass a .gguf file"
            )
        if (path / "tokenizer.model").is_file() and not (path / "tokenizer.json").is_file():
            return _sentencepiece_only(path)
        return AutoTokenizer.from_pretrained(str(path))
    raise not_a_model(path)


def _sentencepiece_only(path: Path):
    """A directory with a sentencepiece `tokenizer.model` and no `tokenizer.json`: transformers converts it, which
    needs the sentencepiece and protobuf packages; without them its error names another library (tiktoken)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (ImportError, ValueError, OSError) as e:
        raise ConvertError(
            f"{path}: its tokenizer is a sentencepiece tokenizer.model without a tokenizer.json, and transformers could "
            f"not convert it ({type(e).__name__}: {str(e)[:160]}); pip install sentencepiece protobuf, or save the "
            "tokenizer with a tokenizer.json (tokenizer.save_pretrained on a machine that has them)") from None


def tokenizer_kind(tokenizer) -> str:
    """What a loaded tokenizer is, for `mixjax info`: "byte-level BPE", "sentencepiece BPE" (byte fallback, "▁" for
    spaces), or the name of its `tokenizers` model (Unigram, WordPiece, ...)."""
    import json

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return type(tokenizer).__name__
    spec = backend.to_str()
    model = json.loads(spec).get("model") or {}
    if model.get("type") == "BPE" and model.get("byte_fallback"):
        return "sentencepiece BPE"
    if model.get("type") == "BPE" and '"ByteLevel"' in spec:
        return "byte-level BPE"
    return str(model.get("type") or "unknown")


GGUF_KINDS = {"gpt2": "byte-level BPE", "llama": "sentencepiece BPE"}  # `tokenizer.ggml.model` → tokenizer_kind's names


def _gguf_tokenizer(path: Path):
    """Byte-level and sentencepiece BPE vocabularies are built here (no torch); others go through transformers
    (needs torch)."""
    from transformers import AutoTokenizer

    from convert import gguf, gguf_tokenizer

    fields = gguf_tokenizer.read_tokenizer_fields(gguf._open(path))
    if gguf_tokenizer.can_build(fields):
        return gguf_tokenizer.build_tokenizer(fields, source=path)
    try:
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except ImportError as e:
        raise ConvertError(
            f"{path}: its {fields.get('tokenizer.ggml.model')!r} vocabulary is converted by transformers, which "
            f"needs torch here ({e}); pip install torch, or pass a Hugging Face directory with tokenizer files"
        ) from None
