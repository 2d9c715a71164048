"""The `mixjax` command line: results equal transformers on a tiny saved model, user errors exit with
status 2 and one message (no traceback), and failed commands write nothing."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

from mixjax import cli

VOCAB = 260
EOS = 256


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A tiny random Llama with a byte-level tokenizer, saved as a Hugging Face directory."""
    torch = pytest.importorskip("torch")
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<eos>"] = EOS
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>")

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=96,
                                      eos_token_id=EOS, bos_token_id=None, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5 * torch.randn_like(p))  # decisive logits: greedy ties are impossible
    model.eval()
    directory = tmp_path_factory.mktemp("tiny_cli_model")
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory, model, tokenizer


@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    """Runs in an empty working directory with an empty cache; returns a snapshot function."""
    work, cache = tmp_path / "work", tmp_path / "cache"
    work.mkdir()
    cache.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("MIXJAX_CACHE", str(cache))

    def snapshot():
        return sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))

    return snapshot


def _text(tmp_path, n_words=400, seed=0):
    rng = np.random.default_rng(seed)
    words = ["the", "model", "river", "quiet", "stone", "light", "over", "and", "a", "north"]
    path = tmp_path / "corpus.txt"
    path.write_text(" ".join(rng.choice(words, n_words)))
    return path


def test_eval_prints_transformers_perplexity(tiny_model, tmp_path, capsys):
    import torch

    from mixjax import data

    directory, model, tokenizer = tiny_model
    corpus = _text(tmp_path)
    assert cli.main(["eval", "--model", str(directory), "--data", str(corpus), "--seq-len", "32",
                     "--max-tokens", "96", "--batch-size", "2", "--quiet"]) == 0
    printed = float(capsys.readouterr().out.strip())
    windows = data.eval_windows(tokenizer, corpus, 32, 96)  # [3, 32]
    with torch.no_grad():
        ids = torch.tensor(windows, dtype=torch.long)
        loss = model(input_ids=ids, labels=ids).loss.item()
    assert printed == pytest.approx(math.exp(loss), rel=1e-3)  # printed with 4 decimals


def test_generate_streams_transformers_greedy_text(tiny_model, capsys):
    import torch

    directory, model, tokenizer = tiny_model
    prompt = "the quiet river"
    assert cli.main(["generate", "--model", str(directory), "--prompt", prompt, "--max-new-tokens", "12"]) == 0
    out = capsys.readouterr().out
    ids = tokenizer(prompt)["input_ids"]
    with torch.no_grad():
        ref = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=EOS,
                             pad_token_id=EOS)
    assert out == tokenizer.decode(ref[0, len(ids):], skip_special_tokens=True) + "\n"
    # progressive precision with the same model on both sides changes nothing
    assert cli.main(["generate", "--model", str(directory), "--prompt", prompt, "--max-new-tokens", "12",
                     "--prefill-model", str(directory), "--switch-after", "4"]) == 0
    assert capsys.readouterr().out == out


def test_generate_stats_time_the_call_and_a_cached_call_compiles_nothing(tiny_model, capsys):
    import convert
    import mixjax
    from mixjax.generate import generate_text

    directory, _, tokenizer = tiny_model
    prompt = "the stone over"
    assert cli.main(["generate", "--model", str(directory), "--prompt", prompt, "--max-new-tokens", "9"]) == 0
    plain = capsys.readouterr()
    assert cli.main(["generate", "--model", str(directory), "--prompt", prompt, "--max-new-tokens", "9",
                     "--stats"]) == 0
    timed = capsys.readouterr()
    assert timed.out == plain.out and plain.err == ""  # the text unchanged, the line on stderr
    n_prompt = len(tokenizer(prompt)["input_ids"])
    assert timed.err.startswith(f"{n_prompt} prompt tokens, ")
    assert "compiling 0.000 s" in timed.err  # the first call compiled the program; streaming reuses it
    pieces = []  # the tokens handed to the host 4 at a time: the same text, all of it streamed
    assert generate_text(model_path=str(directory), prompt=prompt, max_new_tokens=9, on_text=pieces.append,
                         sync_every=4) == plain.out[:-1]
    assert "".join(pieces) == plain.out[:-1]
    got = []
    text = generate_text(model_path=str(directory), prompt=prompt, max_new_tokens=9, on_stats=got.append,
                         on_text=lambda piece: None)
    (stats,) = got
    assert text == plain.out[:-1]
    cfg, params = convert.load(directory)
    (new,) = mixjax.generate(params, cfg, [tokenizer(prompt)["input_ids"]], max_new_tokens=9)
    assert stats.prompt_tokens == n_prompt and stats.new_tokens == len(new)
    assert stats.compile_seconds == 0.0 and 0 <= stats.first_token_seconds < stats.seconds
    assert stats.decode_tokens_per_second > 0
    got.clear()  # another length of the output buffer: a new program, whose compiling is counted apart
    generate_text(model_path=str(directory), prompt=prompt, max_new_tokens=7, on_stats=got.append)
    assert got[0].compile_seconds > 0 and got[0].first_token_seconds < got[0].seconds - got[0].compile_seconds


@pytest.mark.parametrize(
    "argv, match",
    [
        (["eval", "--model", "{tmp}/no-such-model"], "no-such-model' does not exist"),
        (["generate", "--model", "{tmp}/no-such-model", "--prompt", "hi"], "no-such-model' does not exist"),
        (["eval", "--model", "{model}", "--data", "{tmp}/empty.txt"], "empty.txt' holds no text"),
        (["eval", "--model", "{model}", "--data", "{tmp}/missing.jsonl"], "neither a known name"),
        (["eval", "--model", "{model}", "--data", "{tmp}/empty.txt", "--seq-len", "4096"], "holds no text"),
        (["generate", "--model", "{model}", "--prompt", "   "], "prompt is empty"),
        (["generate", "--model", "{model}", "--prompt", "{long}"], "max_position_embeddings=96"),
        (["generate", "--model", "{model}", "--prompt", "hi", "--max-new-tokens", "200"], "max_position_embeddings"),
        (["generate", "--model", "{model}", "--prompt", "hi", "--top-p", "1.5"], "top_p=1.5"),
        (["generate", "--model", "{model}", "--prompt", "hi", "--chat"], "no chat template"),
        (["eval", "--model", "{tmp}/not-a-model.txt"], "not-a-model.txt: "),
        (["generate", "--model", "{model}", "--prompt", "hi", "--switch-after", "3"], "needs --prefill-model"),
        (["generate", "--model", "{model}", "--prompt", "hi", "--prefill-model", "{model}", "--int8-prefill"],
         "pick one"),
        (["generate", "--model", "{model}", "--prompt", "hi", "--prefill-model", "{tmp}/no-such-model"],
         "no-such-model' does not exist"),
    ],
)
def test_user_errors_exit_2_with_one_message_and_write_nothing(tiny_model, sandbox, tmp_path, capsys, argv, match):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "not-a-model.txt").write_text("hello")
    fill = {"tmp": str(tmp_path), "model": str(tiny_model[0]), "long": "word " * 100}
    before = sandbox()
    assert cli.main([a.format(**fill) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"mixjax {argv[0]}: error: ") and match in err
    assert "Traceback" not in err and err.count("\n") == 1
    assert sandbox() == before


@pytest.mark.parametrize(
    "argv",
    [["eval", "--seq-len", "0"], ["eval", "--max-tokens", "-5"], ["generate"], ["frobnicate"], []],
)
def test_bad_arguments_exit_2_before_loading(argv, sandbox, capsys):
    before = sandbox()
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 2
    assert "usage: mixjax" in capsys.readouterr().err
    assert sandbox() == before


def test_later_commands_register_in_one_line():
    names = [r.__name__ for r in cli.COMMANDS]
    assert names[:3] == ["_register_demo", "_register_eval", "_register_generate"]
    parser = cli.build_parser()
    commands = set(parser._subparsers._group_actions[0].choices)
    assert {"demo", "eval", "generate"} <= commands and len(commands) == len(names)


@pytest.mark.slow
def test_demo_runs_on_embedded_model(embedded_model_path, capsys, monkeypatch):
    monkeypatch.setenv("MIXJAX_MODEL", str(embedded_model_path))
    assert cli.main(["demo", "--seq-len", "128", "--max-tokens", "256", "--max-new-tokens", "12",
                     "--calib-samples", "0"]) == 0  # quantization: tests/test_quant*.py
    out = capsys.readouterr().out
    ppl = float(out.split("Wikipedia passages: ")[1].split()[0])
    assert 5 < ppl < 80
    assert "Paris" in out
    assert os.fspath(embedded_model_path) in out


def test_readme_commands_and_ci_agree():
    root = os.path.join(os.path.dirname(__file__), "..")
    readme = open(os.path.join(root, "README.md")).read()
    ci = open(os.path.join(root, ".ci", "run")).read()
    test_command = 'pip install -e ".[test]" && pytest -q -n 2 --dist loadfile'  # two workers, a file each
    assert f"\n{test_command}\n" in readme and f"\n{test_command}\n" in ci
    assert "pytest-xdist" in open(os.path.join(root, "pyproject.toml")).read()  # what `-n` needs
    assert "\npip install -e . && mixjax demo\n" in readme


def _tree_bytes(directory):
    """{relative path: bytes} of every file under a directory."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_convert_writes_a_reproducible_quantized_checkpoint(tiny_model, tmp_path, capsys, monkeypatch):
    """`mixjax convert SRC OUT` → a quantized Orbax checkpoint that eval and generate load directly; a re-run
    writes the same bytes; an existing OUT survives a run without --force; an interrupted save leaves nothing."""
    import convert
    from convert import orbax_io
    from pallas_kernels import MixedWeight

    directory = tiny_model[0]
    corpus = _text(tmp_path, n_words=3000)
    opts = ["--bits", "4.4", "--data", str(corpus), "--samples", "4", "--seq-len", "32", "--batch-size", "2",
            "--quiet"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert cli.main(["convert", str(directory), str(a), *opts]) == 0
    assert cli.main(["convert", str(directory), str(b), *opts, "--shard-weights"]) == 0  # one device: plain path
    # Orbax's container files differ between saves (temp paths, random ids); the metadata, with its digest
    # of every array, the tokenizer and the restored arrays are identical.
    files_a = _tree_bytes(a)
    same = [n for n in files_a if not n.startswith("params/")]
    assert "mixjax.json" in same and any(n.startswith("tokenizer/") for n in same)
    assert {n: files_a[n] for n in same} == {n: _tree_bytes(b)[n] for n in same}
    (_, qa), (_, qb) = convert.load(a), convert.load(b)
    assert isinstance(qa["layers"][0]["self_attn"]["v_proj"]["weight"], MixedWeight)
    assert orbax_io.params_digest(qa) == orbax_io.params_digest(qb)
    capsys.readouterr()

    ppl = {}
    for name, model in (("fp", directory), ("quantized", a)):
        assert cli.main(["eval", "--model", str(model), "--data", str(corpus), "--seq-len", "32",
                         "--max-tokens", "256", "--quiet"]) == 0
        ppl[name] = float(capsys.readouterr().out.split()[-1])
    assert abs(math.log(ppl["quantized"] / ppl["fp"])) < 0.2  # measured 0.035 (this random model's fp ppl is huge)
    # --shard-weights splits float weights only: a quantized checkpoint is refused by name; a float model on one
    # device runs the plain path (the split itself: tests/test_parallel.py)
    assert cli.main(["eval", "--model", str(a), "--shard-weights", "--quiet"]) == 2
    assert "drop --shard-weights" in capsys.readouterr().err
    assert cli.main(["eval", "--model", str(directory), "--data", str(corpus), "--seq-len", "32", "--max-tokens", "256",
                     "--shard-weights", "--quiet"]) == 0
    assert float(capsys.readouterr().out.split()[-1]) == pytest.approx(ppl["fp"], rel=1e-6)
    assert cli.main(["generate", "--model", str(a), "--prompt", "the river", "--max-new-tokens", "4",
                     "--kv-int8", "--quiet"]) == 0
    capsys.readouterr()
    # the int8 prefill matrices need the Hopper GEMM: refused by name on this CPU, and for a float model
    assert cli.main(["generate", "--model", str(a), "--prompt", "the river", "--int8-prefill", "--quiet"]) == 2
    assert "drop the option" in capsys.readouterr().err
    assert cli.main(["generate", "--model", str(directory), "--prompt", "the river", "--int8-prefill",
                     "--quiet"]) == 2
    assert "needs a quantized model" in capsys.readouterr().err
    # --prefill-scales: on this CPU the prompt keeps per-group scales, so token / selective are refused by name (group
    # passes); where the Hopper GEMM runs (has_wgmma faked) the mode holds while the generation is traced, then the
    # module's setting is back; a float model is refused by name
    import importlib

    from pallas_kernels import api, mgpu

    assert cli.main(["generate", "--model", str(a), "--prompt", "the river", "--max-new-tokens", "2",
                     "--prefill-scales", "token", "--quiet"]) == 2
    assert "keep MixLLM's per-group scales" in capsys.readouterr().err and mgpu.PREFILL_ACT_SCALE == "group"
    assert cli.main(["generate", "--model", str(a), "--prompt", "the river", "--max-new-tokens", "2",
                     "--prefill-scales", "group", "--quiet"]) == 0
    capsys.readouterr()
    monkeypatch.setattr(api, "has_wgmma", lambda device=None: True)

    generate_module = importlib.import_module("mixjax.generate")  # (mixjax.generate is also the function)

    seen = []
    real = generate_module.generate

    def spy(*args, **kwargs):
        seen.append(mgpu.PREFILL_ACT_SCALE)
        return real(*args, **kwargs)

    monkeypatch.setattr(generate_module, "generate", spy)
    assert cli.main(["generate", "--model", str(a), "--prompt", "the river", "--max-new-tokens", "2",
                     "--prefill-scales", "selective", "--quiet"]) == 0
    assert seen == ["selective"] and mgpu.PREFILL_ACT_SCALE == "group"
    assert cli.main(["generate", "--model", str(directory), "--prompt", "the river", "--prefill-scales", "token",
                     "--quiet"]) == 2
    assert "prefill_scales (--prefill-scales) needs a quantized model" in capsys.readouterr().err
    assert mgpu.PREFILL_ACT_SCALE == "group"

    assert cli.main(["convert", str(directory), str(a), *opts]) == 2
    assert "--force" in capsys.readouterr().err and _tree_bytes(a) == files_a
    # a quantized checkpoint as the source: refused before loading, naming the float model it was made from
    assert cli.main(["convert", str(a), str(tmp_path / "again"), *opts]) == 2
    err = capsys.readouterr().err
    assert "already a quantized mixjax checkpoint" in err and str(directory) in err
    assert not (tmp_path / "again").exists()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(orbax_io, "_replace", interrupted)
    c = tmp_path / "c"
    assert cli.main(["convert", str(directory), str(c), *opts]) == 130
    assert not c.exists() and not list(tmp_path.glob(".c.tmp-*"))
    # the device out of memory mid-run: one line naming it and the options that lower the need, nothing written;
    # any other runtime error keeps its traceback
    import jax

    from mixjax.quant import pipeline

    def out_of_memory(*args, **kwargs):
        raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 68719476736 "
                                         "bytes.\nBufferAssignment OOM Debugging.")

    monkeypatch.setattr(pipeline, "quantize", out_of_memory)
    assert cli.main(["convert", str(directory), str(c), *opts]) == 1
    err = capsys.readouterr().err
    assert "ran out of memory (RESOURCE_EXHAUSTED: Out of memory while trying to allocate 68719476736 bytes.)" in err
    assert "--batch-size" in err and "--shard-weights" in err and "Debugging" not in err
    assert not c.exists() and not list(tmp_path.glob(".c.tmp-*"))
    monkeypatch.setattr(pipeline, "quantize", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main(["convert", str(directory), str(c), *opts])

    meta = json.loads((a / "mixjax.json").read_text())
    (a / "mixjax.json").write_text(json.dumps({**meta, "params_sha256": "0" * 64}))
    with pytest.raises(ValueError, match="digest"):
        convert.load(a)
    # the quantization record edited out of the metadata: named, with the fix, from the CLI too
    extra = {k: v for k, v in meta["extra"].items() if k != "quantization"}
    (a / "mixjax.json").write_text(json.dumps({**meta, "extra": extra}))
    assert cli.main(["generate", "--model", str(a), "--prompt", "the river", "--quiet"]) == 2
    assert "extra.quantization: missing or edited out?); re-create the checkpoint" in capsys.readouterr().err


def test_demo_quantizes_saves_and_generates_from_the_checkpoint(tiny_model, tmp_path, capsys):
    import convert
    from pallas_kernels import MixedWeight

    out = tmp_path / "demo-ckpt"
    assert cli.main(["demo", "--model", str(tiny_model[0]), "--seq-len", "32", "--max-tokens", "256",
                     "--max-new-tokens", "4", "--calib-samples", "2", "--calib-seq-len", "32",
                     "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "RTN W4A8 perplexity" in printed and "MixLLM W4.4A8 perplexity" in printed
    assert f"saved the W4.4A8 checkpoint to {out}" in printed
    _, qparams = convert.load(out)
    assert isinstance(qparams["layers"][0]["mlp"]["down_proj"]["weight"], MixedWeight)


def test_ablate_prints_the_study_and_writes_json(tiny_model, tmp_path, capsys):
    """`mixjax ablate salience`: the global row is exactly `quantize` with MixLLM's config (same data, same
    perplexity path), the local row chooses the same number of 8-bit channels elsewhere, and --out holds the table's
    numbers; an existing --out is kept without --force."""
    import convert
    from mixjax import data
    from mixjax.evaluate import perplexity
    from mixjax.quant import QuantConfig, as_fake_quant, quantize

    directory = tiny_model[0]
    corpus = _text(tmp_path, n_words=3000)
    out = tmp_path / "salience.json"
    opts = ["--model", str(directory), "--data", str(corpus), "--eval-data", str(corpus), "--samples", "4",
            "--seq-len", "32", "--eval-seq-len", "32", "--eval-tokens", "256", "--batch-size", "2", "--quiet"]
    assert cli.main(["ablate", "salience", *opts, "--out", str(out)]) == 0
    table = capsys.readouterr().out
    result = json.loads(out.read_text())
    global_, local = result["rows"]
    assert global_["name"].startswith("global") and local["name"].startswith("local")
    assert f"| {global_['perplexity']:.3f} |" in table and f"| {local['perplexity']:.3f} |" in table

    tok = convert.load_tokenizer(directory)
    cfg, params = convert.load(directory)
    calib = data.calibration_batches(tok, str(corpus), n_samples=4, seq_len=32, seed=0, batch_size=2)
    windows = data.eval_windows(tok, str(corpus), 32, 256)
    assert result["fp"] == pytest.approx(perplexity(params, cfg, windows, batch_size=2), rel=1e-6)
    qp = quantize(params, calib, cfg, config=QuantConfig(bits=4.4, batch_size=2))
    assert global_["perplexity"] == pytest.approx(perplexity(as_fake_quant(qp), cfg, windows, batch_size=2), rel=1e-6)
    assert 0 < global_["int8_share"] < 0.5 and local["perplexity"] != global_["perplexity"]

    before = out.read_bytes()
    assert cli.main(["ablate", "salience", *opts, "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err and out.read_bytes() == before

    # the activations study's first row is the same configuration as the global row: the same perplexity
    acts = tmp_path / "activations.json"
    assert cli.main(["ablate", "activations", *opts, "--out", str(acts)]) == 0
    rows = json.loads(acts.read_text())["rows"]
    assert [r["config"].split(", ")[1] for r in rows] == ["A8 g128", "A8 per token", "A8 g128 static",
                                                          "A8 g128 static MSE-clipped"]
    assert rows[0]["perplexity"] == pytest.approx(global_["perplexity"], rel=1e-6)
    # K ≤ 128 in this model: one group a row, so per token is per group; static scales differ
    assert rows[1]["perplexity"] == pytest.approx(rows[0]["perplexity"], rel=1e-6)
    assert rows[2]["perplexity"] != pytest.approx(rows[0]["perplexity"], rel=1e-3)

    # progressive: the prompt (8 tokens) and 4 decoded tokens at W8A8, then W4.4A8; the low-precision row is the
    # W4.4A8 model above on the tokens after the prompt
    from mixjax.evaluate import phased_nll, phased_perplexity

    prog = tmp_path / "progressive.json"
    assert cli.main(["ablate", "progressive", *opts, "--prompt-len", "8", "--switch-after", "4", "--out",
                     str(prog)]) == 0
    result = json.loads(prog.read_text())
    names = [r["name"] for r in result["rows"]]
    assert names == ["W4.4A8 throughout (MixLLM)", "prompt at W8A8, every decoded token at W4.4A8",
                     "prompt and the first 4 decoded tokens at W8A8, then W4.4A8", "W8A8 throughout"]
    nll = phased_nll([(as_fake_quant(qp), 32)], cfg, windows, prompt=8, batch_size=2)
    assert result["rows"][0]["perplexity"] == pytest.approx(math.exp(nll.mean()), rel=1e-6)
    assert result["late_from"] == 12 and result["rows"][0]["late_perplexity"] == pytest.approx(
        math.exp(nll[4:].mean()), rel=1e-6)
    assert result["fp"] == pytest.approx(phased_perplexity([(params, 32)], cfg, windows, prompt=8), rel=1e-6)
    assert len({round(r["perplexity"], 6) for r in result["rows"]}) == 4

    # prompt-scales: with K ≤ 128 a row is one group, so per-token prompt scales are MixLLM's and every row (and
    # its paired difference) equals the first; the first is the W4.4A8 model above on the tokens after the prompt
    scales = tmp_path / "prompt-scales.json"
    assert cli.main(["ablate", "prompt-scales", *opts, "--prompt-len", "8", "--out", str(scales)]) == 0
    assert "| paired difference |" in capsys.readouterr().out
    first, token, selective = json.loads(scales.read_text())["rows"]
    # the study runs one window at a time (for its paired differences): so does the expected value here. A batch of
    # two is other programs, whose last-bit differences can flip an activation code (XLA:CPU at -O0: 2e-4 apart)
    per_window = [phased_nll([(as_fake_quant(qp), 32)], cfg, windows[i:i + 1], prompt=8, batch_size=1).mean()
                  for i in range(len(windows))]
    assert first["perplexity"] == pytest.approx(math.exp(np.mean(per_window)), rel=1e-6) and "paired" not in first
    for row in (token, selective):
        assert row["perplexity"] == pytest.approx(first["perplexity"], rel=1e-6)
        assert abs(row["paired"]["delta"]) < 1e-6 * first["perplexity"] and row["paired"]["windows"] == len(windows)

    # kv-cache: the W4.4A8 model above through a float KV cache (every position after the first, as `perplexity`
    # scores), then through an int8 one (paired with it), and the float model through an int8 one
    kv = tmp_path / "kv-cache.json"
    assert cli.main(["ablate", "kv-cache", *opts, "--out", str(kv)]) == 0
    assert "float-cache run of the same weights" in capsys.readouterr().out
    study = json.loads(kv.read_text())
    first, int8, float_int8 = study["rows"]
    assert study["fp"] == pytest.approx(perplexity(params, cfg, windows, batch_size=2), rel=1e-5)
    assert first["perplexity"] == pytest.approx(global_["perplexity"], rel=1e-5) and "paired" not in first
    assert int8["perplexity"] != first["perplexity"] and float_int8["perplexity"] != study["fp"]
    assert int8["paired"]["windows"] == float_int8["paired"]["windows"] == len(windows)

    # dequant: one quantization (the one above) through the kernels' two-step path (their XLA reference here),
    # with it off (bf16 dequantized W and x, one bf16 dot), and simulated (the other studies' rows)
    from mixjax.quant.fakequant import as_one_step

    deq = tmp_path / "dequant.json"
    assert cli.main(["ablate", "dequant", *opts, "--out", str(deq)]) == 0
    assert "| evaluation (s) |" in capsys.readouterr().out
    two, one, sim = json.loads(deq.read_text())["rows"]
    assert two["perplexity"] == pytest.approx(perplexity(qp, cfg, windows, batch_size=2), rel=1e-6)
    assert one["perplexity"] == pytest.approx(perplexity(as_one_step(qp), cfg, windows, batch_size=2), rel=1e-6)
    assert sim["perplexity"] == pytest.approx(global_["perplexity"], rel=1e-6)
    # the integer product and the f32 simulation differ by f32 summation order only; bf16 rounds more
    assert two["perplexity"] == pytest.approx(sim["perplexity"], rel=1e-4)
    assert 1e-6 < abs(one["perplexity"] / two["perplexity"] - 1) < 0.1  # (this random model: ≈ 3 %)

    # static MSE-clipped scales on the kernels: `convert --act-scales static-mse` with the study's calibration gives
    # the activations study's last row (simulated) to f32 summation order
    from mixjax.quant.checkpoint import load_quantized
    from pallas_kernels import StaticMixedWeight

    quantized = tmp_path / "q"
    assert cli.main(["convert", str(directory), str(quantized), "--data", str(corpus), "--samples", "4",
                     "--seq-len", "32", "--batch-size", "2", "--act-scales", "static-mse", "--quiet"]) == 0
    capsys.readouterr()
    _, static_qp, static_config = load_quantized(quantized)
    assert static_config.act.static and static_config.act.static_calib == "mse"
    assert isinstance(static_qp["layers"][0]["mlp"]["down_proj"]["weight"], StaticMixedWeight)
    assert perplexity(static_qp, cfg, windows, batch_size=2) == pytest.approx(rows[3]["perplexity"], rel=1e-4)
    assert cli.main(["ablate", "salience", *opts, "--model", str(quantized)]) == 2
    err = capsys.readouterr().err
    assert "already a quantized mixjax checkpoint" in err and str(directory) in err


@pytest.mark.parametrize("argv, match", [
    (["ablate", "salience", "--bits", "4"], "leaves none to choose"),
    (["ablate", "activations", "--bits", "9"], "must lie in [4, 8]"),
    (["ablate", "salience", "--samples", "0"], "--samples must be a positive integer"),
    (["ablate", "salience", "--out", "{tmp}/no-dir/x.json"], "does not exist"),
    (["ablate", "salience", "--model", "{tmp}/no-such-model"], "no-such-model' does not exist"),
    (["ablate", "progressive", "--high-bits", "4.4"], "--high-bits 4.4 must lie in (--bits 4.4, 8]"),
    (["ablate", "progressive", "--prompt-len", "512"], "--prompt-len 512 must lie in [1, --eval-seq-len 512)"),
    (["ablate", "progressive", "--switch-after", "32,400"], "a switch point must fall inside"),
    (["ablate", "progressive", "--switch-after", "a,b"], "comma-separated integers"),
    (["ablate", "prompt-scales", "--prompt-len", "0"], "--prompt-len 0 must lie in [1, --eval-seq-len 512)"),
])
def test_ablate_refuses_bad_input_before_any_work(argv, match, sandbox, tmp_path, capsys):
    before = sandbox()
    assert cli.main([a.format(tmp=tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mixjax ablate: error: ") and match in err and err.count("\n") == 1
    assert sandbox() == before


def test_export_writes_a_directory_transformers_loads(tiny_model, tmp_path, capsys):
    """`mixjax export SRC OUT`: a float model as a Hugging Face directory with its tokenizer, whose transformers
    logits are the source's; `--dequantize` writes a quantized checkpoint's weights (transformers then computes
    what mixjax computes on `dequantize_params`); the wrong flag for the source, or an existing OUT without
    --force, is refused and leaves OUT as it was."""
    import jax
    import jax.numpy as jnp
    import torch
    import transformers

    import convert
    from mixjax.model import forward
    from mixjax.quant import dequantize_params

    directory, model, _ = tiny_model
    out = tmp_path / "hf"
    assert cli.main(["export", str(directory), str(out)]) == 0
    assert f"wrote {out}: LlamaForCausalLM, float32 weights in 1 safetensors file, tokenizer" in capsys.readouterr().out
    exported = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokens = torch.from_numpy(np.random.default_rng(0).integers(0, VOCAB, (2, 9)))
    with torch.no_grad():
        assert torch.equal(exported(tokens).logits, model(tokens).logits)
    assert transformers.AutoTokenizer.from_pretrained(out).encode("the river") == \
        transformers.AutoTokenizer.from_pretrained(directory).encode("the river")

    corpus = _text(tmp_path, n_words=3000)
    quantized = tmp_path / "q"
    assert cli.main(["convert", str(directory), str(quantized), "--data", str(corpus), "--samples", "2",
                     "--seq-len", "32", "--quiet"]) == 0
    deq = tmp_path / "deq"
    assert cli.main(["export", str(quantized), str(deq), "--quiet"]) == 2
    assert "pass --dequantize" in capsys.readouterr().err and not deq.exists()
    assert cli.main(["export", str(quantized), str(deq), "--dequantize", "--dtype", "bfloat16", "--quiet"]) == 0
    cfg, qparams = convert.load(quantized)
    want = forward(jax.tree.map(lambda a: a.astype(jnp.bfloat16).astype(jnp.float32), dequantize_params(qparams)),
                   tokens.numpy(), cfg, implementation="xla")
    got = transformers.AutoModelForCausalLM.from_pretrained(deq, dtype=torch.float32).eval()
    with torch.no_grad():
        np.testing.assert_allclose(got(tokens).logits.numpy(), np.asarray(want), rtol=0,
                                   atol=1e-4 * float(np.abs(np.asarray(want)).max()))

    before = sorted((p.name, p.stat().st_mtime_ns) for p in out.iterdir())
    assert cli.main(["export", str(directory), str(out), "--quiet"]) == 2
    assert "--force" in capsys.readouterr().err
    assert cli.main(["export", str(directory), str(tmp_path / "x"), "--dequantize", "--quiet"]) == 2
    assert "drop --dequantize" in capsys.readouterr().err and not (tmp_path / "x").exists()
    assert sorted((p.name, p.stat().st_mtime_ns) for p in out.iterdir()) == before


def test_export_to_gguf_and_back(tiny_model, tmp_path, capsys):
    """`mixjax export SRC OUT.gguf --dtype q8_0`: a GGUF with the tokenizer's vocabulary, on which transformers' GGUF
    loader computes mixjax's logits (and the source's greedy tokens) and from which mixjax builds a tokenizer that encodes
    alike; that file exports back to a Hugging Face directory; q8_0 for a directory is refused before any write."""
    import torch
    import transformers

    import convert
    from mixjax.model import forward

    directory, model, tokenizer = tiny_model
    out = tmp_path / "tiny.gguf"
    assert cli.main(["export", str(directory), str(out), "--dtype", "q8_0"]) == 0
    assert f"wrote {out}: GGUF (llama), q8_0 weights" in capsys.readouterr().out
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name, dtype=torch.float32).eval()
    tokens = torch.from_numpy(np.random.default_rng(1).integers(0, VOCAB, (2, 9)))
    with torch.no_grad():
        got, source = loaded(tokens).logits.numpy(), model(tokens).logits.numpy()
    cfg, params = convert.load(out)
    ours = np.asarray(forward(params, tokens.numpy().astype(np.int32), cfg, implementation="xla"))
    assert np.abs(got - ours).max() < 1e-4 * np.abs(ours).max()  # the same Q8_0 weights, read by each side
    assert 0 < np.abs(got - source).max() and np.array_equal(got.argmax(-1), source.argmax(-1))
    assert convert.load_tokenizer(out).encode("the river, 42") == tokenizer.encode("the river, 42")
    back = tmp_path / "back"
    assert cli.main(["export", str(out), str(back), "--quiet"]) == 0
    assert convert.load(back)[0] == convert.load(out)[0]
    assert cli.main(["export", str(directory), str(tmp_path / "d"), "--dtype", "q8_0", "--quiet"]) == 2
    assert "q8_0 is a GGUF type" in capsys.readouterr().err and not (tmp_path / "d").exists()


def test_info_describes_each_source_without_loading_it(tiny_model, tmp_path, capsys):
    """`mixjax info PATH`: a Hugging Face directory, the GGUF exported from it and a quantized checkpoint of it, each
    with the model's parameter count (transformers' own), how its tensors are stored, and the tokenizer; for the
    quantized checkpoint the bits its 8-bit channels reach, the bytes its arrays take (equal to what loading it gives)
    and the perplexities `convert --eval-tokens` recorded (equal to an independent evaluation); a path that is no
    model is a user error."""
    import jax

    import convert
    from mixjax import data
    from mixjax.config import LlamaConfig
    from mixjax.evaluate import perplexity

    directory, model, tokenizer = tiny_model
    n_params = sum(p.numel() for p in model.parameters())
    assert cli.main(["info", str(directory)]) == 0
    text = capsys.readouterr().out
    assert f"{directory}: Hugging Face directory" in text and "stored as: safetensors F32 × 21" in text
    assert f"parameters: {n_params / 1e3:.1f} k" in text and f"tokenizer: {len(tokenizer)} tokens (byte-level BPE)" in text

    gguf_file = tmp_path / "m.gguf"
    assert cli.main(["export", str(directory), str(gguf_file), "--dtype", "q8_0", "--quiet"]) == 0
    assert cli.main(["info", str(gguf_file), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "GGUF file" and info["parameters"] == n_params
    assert info["storage"] == {"GGML Q8_0": 16, "GGML F32": 5} and info["tokenizer"]["tokens"] == VOCAB
    assert info["tokenizer"]["kind"] == "byte-level BPE"

    quantized, corpus = tmp_path / "q", _text(tmp_path, n_words=3000)
    assert cli.main(["convert", str(directory), str(quantized), "--data", str(corpus), "--samples", "2",
                     "--seq-len", "32", "--eval-tokens", "200", "--eval-data", str(corpus)]) == 0
    assert "perplexity on 2×96 tokens of" in capsys.readouterr().out  # the context (96) caps the windows
    assert cli.main(["info", str(quantized)]) == 0
    assert "perplexity on 2×96 tokens of" in capsys.readouterr().out
    assert cli.main(["info", str(quantized), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    q = info["quantization"]
    assert info["format"] == "quantized mixjax checkpoint"
    info_cfg = LlamaConfig.from_dict(info["config"])
    assert info_cfg == convert.load(directory)[0]
    assert q["average_bits"] == pytest.approx(4.4, abs=0.05) and q["kernel_format"]
    assert info["provenance"]["source"] == str(directory) and info["provenance"]["calibration"]["samples"] == 2
    assert set(q["int8_share"]) == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
    _, qparams = convert.load(quantized)
    assert q["weight_bytes"] == sum(leaf.nbytes for leaf in jax.tree.leaves(qparams))
    windows = data.eval_windows(tokenizer, corpus, seq_len=96, max_tokens=200)
    evaluation = info["provenance"]["evaluation"]
    assert evaluation["float"] == pytest.approx(perplexity(convert.load(directory)[1], info_cfg, windows), rel=1e-5)
    assert evaluation["quantized"] == pytest.approx(perplexity(qparams, info_cfg, windows), rel=1e-5)
    assert evaluation["quantized"] != pytest.approx(evaluation["float"], rel=1e-4)
    assert cli.main(["info", str(tmp_path / "nothing")]) == 2
    assert "no such file or directory" in capsys.readouterr().err


def test_info_names_gemma3_features(make_tiny_hf, capsys):
    """`mixjax info` on a Gemma 3 directory: transformers' parameter count (its sandwich and head norms included) and
    each of Gemma's departures from a Llama."""
    directory, model = make_tiny_hf("gemma3_text", head_dim=32, num_hidden_layers=7, sliding_window=4,
                                    query_pre_attn_scalar=48)
    assert cli.main(["info", str(directory)]) == 0
    text = capsys.readouterr().out
    assert f"parameters: {sum(p.numel() for p in model.parameters()) / 1e3:.1f} k" in text
    for feature in ("gemma3_text, 7 layers", "q/k head norms", "sliding window 4 on 6 layers (rope θ 10000 there)",
                    "GeGLU", "embeddings × 8", "norms on the attention and MLP outputs", "attention scores × 48^-1/2"):
        assert feature in text, (feature, text)
