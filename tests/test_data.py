"""mixjax.data: text sources, deterministic evaluation windows, seeded calibration windows, bad data."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mixjax import data
from mixjax.data import DataError


class ByteTokenizer:
    """One token per UTF-8 byte: makes expected token streams easy to write down."""

    def encode(self, text, add_special_tokens=True):
        return list(text.encode("utf-8"))


TOK = ByteTokenizer()


def _words(seed, n):
    rng = np.random.default_rng(seed)
    return " ".join("".join(chr(97 + c) for c in rng.integers(0, 26, rng.integers(1, 8))) for _ in range(n))


@pytest.fixture
def jsonl(tmp_path):
    docs = [_words(i, 40) for i in range(5)]
    path = tmp_path / "docs.jsonl"
    rows = [{"text": docs[0]}, {"0": docs[1], "1": "ignored"}, docs[2], {"text": docs[3]}, {"text": docs[4]}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    return path, docs


def test_eval_windows_are_the_joined_stream_cut_in_order(jsonl):
    path, docs = jsonl
    stream = np.frombuffer("\n\n".join(docs).encode(), np.uint8).astype(np.int32)
    w = data.eval_windows(TOK, path, seq_len=64)
    assert w.dtype == np.int32 and w.shape == (len(stream) // 64, 64)
    np.testing.assert_array_equal(w.reshape(-1), stream[: w.size])
    np.testing.assert_array_equal(data.eval_windows(TOK, path, seq_len=64), w)  # deterministic
    capped = data.eval_windows(TOK, path, seq_len=64, max_tokens=200)
    assert capped.shape == (3, 64)
    np.testing.assert_array_equal(capped, w[:3])


def test_text_file_is_one_document(tmp_path):
    text = _words(7, 200)
    path = tmp_path / "book.txt"
    path.write_text(text)
    w = data.eval_windows(TOK, path, seq_len=100)
    np.testing.assert_array_equal(w.reshape(-1), np.frombuffer(text.encode(), np.uint8)[: w.size])


def test_calibration_batches_are_seeded_windows_of_the_stream(jsonl):
    path, docs = jsonl
    stream = np.frombuffer("\n\n".join(docs).encode(), np.uint8).astype(np.int32)
    batches = data.calibration_batches(TOK, path, n_samples=10, seq_len=32, seed=3, batch_size=4)
    assert [b.shape for b in batches] == [(4, 32), (4, 32), (2, 32)]
    assert all(b.dtype == np.int32 for b in batches)
    text = stream.tobytes()
    for row in np.concatenate(batches):
        assert row.tobytes() in text  # a contiguous window of the token stream
    again = data.calibration_batches(TOK, path, n_samples=10, seq_len=32, seed=3, batch_size=4)
    other = data.calibration_batches(TOK, path, n_samples=10, seq_len=32, seed=4, batch_size=4)
    np.testing.assert_array_equal(np.concatenate(again), np.concatenate(batches))
    assert not np.array_equal(np.concatenate(other), np.concatenate(batches))


@pytest.mark.parametrize(
    "content, match",
    [
        ("", "no text"),
        ("   \n\n  \n", "no text"),
        ("short", "fewer than seq_len"),
    ],
)
def test_empty_or_short_text_is_refused(tmp_path, content, match):
    path = tmp_path / "small.txt"
    path.write_text(content)
    with pytest.raises(DataError, match=match) as err:
        data.eval_windows(TOK, path, seq_len=64)
    assert "small.txt" in str(err.value)
    with pytest.raises(DataError, match=match):
        data.calibration_batches(TOK, path, n_samples=2, seq_len=64, seed=0, batch_size=1)


@pytest.mark.parametrize(
    "lines, match",
    [
        (['{"text": "ok"}', "{not json"], r"bad.jsonl:2: not valid JSON"),
        (['{"title": "no text field"}'], r"bad.jsonl:1: expected a string"),
        (['{"text": 5}'], r"bad.jsonl:1: expected a string"),
    ],
)
def test_malformed_jsonl_names_file_and_line(tmp_path, lines, match):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines))
    with pytest.raises(DataError, match=match):
        data.eval_windows(TOK, path, seq_len=4)


def test_bad_sources_and_arguments(tmp_path, jsonl):
    path, _ = jsonl
    with pytest.raises(DataError, match="neither a known name"):
        data.eval_windows(TOK, tmp_path / "missing.txt", seq_len=8)
    with pytest.raises(DataError, match="directory"):
        data.eval_windows(TOK, tmp_path, seq_len=8)
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9 " * 100)
    with pytest.raises(DataError, match="UTF-8"):
        data.eval_windows(TOK, tmp_path / "latin1.txt", seq_len=8)
    with pytest.raises(DataError, match="seq_len=0"):
        data.eval_windows(TOK, path, seq_len=0)
    with pytest.raises(DataError, match="max_tokens=10 is below seq_len=64"):
        data.eval_windows(TOK, path, seq_len=64, max_tokens=10)
    with pytest.raises(DataError, match="batch_size=0"):
        data.calibration_batches(TOK, path, n_samples=4, seq_len=8, seed=0, batch_size=0)


def test_online_source_without_network_gives_clear_error(monkeypatch):
    datasets = pytest.importorskip("datasets")

    def offline(*a, **k):
        raise ConnectionError("Couldn't reach 'wikitext' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    for name in ("wikitext2", "c4"):
        with pytest.raises(DataError, match=f"could not load '{name}'.*Offline, use --data wikipedia"):
            data.eval_windows(TOK, name, seq_len=8)


def test_default_corpora_are_real_disjoint_and_nonempty():
    wiki = data.load_documents("wikipedia")
    owt = data.load_documents("owt", split="calibration")
    assert len(wiki) == 1000 and len(owt) == 1000
    assert sum(len(d.split()) for d in wiki) > 80_000
    assert not set(wiki) & set(owt)
    assert data.DEFAULT_EVAL_SOURCE == "wikipedia" and data.DEFAULT_CALIBRATION_SOURCE == "owt"
