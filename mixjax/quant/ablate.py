"""`mixjax ablate STUDY`: one of MixLLM's design choices against its alternatives, through one quantize → perplexity
path on one calibration and evaluation set.

Each study is a list of `QuantConfig` overrides; its first row is MixLLM's choice. The salience scores are
computed once and shared by every row (they do not depend on how the 8-bit channels are then chosen or on the
activation format). Perplexity is measured through `as_fake_quant` (the kernels' codes and activation rounding in
float XLA ops), so a study runs the same on a CPU and a GPU. Adding a study is one entry in `STUDIES`.

`progressive` is the one study of another shape: two quantized models (W{bits}A8 and W{high_bits}A8) and
progressive precision switching during decoding. Each evaluation window is a prompt of `prompt` tokens followed
by the tokens "decoded" after it (teacher-forced). The prompt and the first n decoded tokens run on the high
precision model, and the rest on the low precision one, through one KV cache (`evaluate.phased_nll`).
Perplexity counts only the decoded tokens: all of them, and (`late_perplexity`) those after the latest switch
point, which every switching row decodes at low precision: what a high-precision start leaves behind in the
cache. Only accuracy is measured here; `mixjax generate --prefill-model PATH --switch-after N` generates so.

`prompt-scales` prices `mixjax generate --prefill-scales`: one quantization whose prompt runs with one activation
scale a token (in every linear, or in o_proj and gate/up only: "selective") while the decoded tokens keep MixLLM's
per-group scales, through one KV cache as in `progressive`. The differences are small, so each row also gives its
difference from MixLLM's row paired window by window, with its standard error.

`kv-cache` prices `generate --kv-int8` (MixLLM's Table 8, KV8): one quantization and the float model, each run
through a float and an int8 KV cache (every key and value quantized before attention reads it, as `generate`
stores them), every window in one phase (`evaluate.phased_nll`, one window at a time), so each int8 row gives its
difference from the float-cache row of the same weights, paired window by window.

`dequant` runs one quantization three ways (`Study.forms`): through the kernels' two-step dequantization (the
Pallas kernels on a GPU, their exact integer XLA reference elsewhere), with it turned off (`OneStepWeight`: the
weight and activations dequantized to bf16, one bf16 dot), and simulated as the other studies are
(`as_fake_quant`). Its evaluation times include compiling, and on a CPU they time XLA references: speed is
`benchmarks/bench_matmul.py`'s (`mixed` against `dequant_dot`) on a GPU.
"""

from __future__ import annotations

import dataclasses
import math
import time

from mixjax.model import LINEAR_NAMES
from mixjax.quant.activations import ActFormat
from mixjax.quant.api import QuantConfig


@dataclasses.dataclass(frozen=True)
class Study:
    title: str
    rows: tuple[tuple[str, dict], ...]  # (name, QuantConfig overrides); the first row is MixLLM's choice
    needs_mixed: bool  # only meaningful with 8-bit channels to choose: 4 < bits < 8
    progressive: bool = False  # rows built from the switch points instead (`ablate`'s high_bits, prompt, switch_after)
    forms: tuple[tuple[str, str], ...] = ()  # or rows that run one quantization (MixLLM's config) in these forms:
    # (name, "kernels" | "one_step" | "fake_quant"), the first MixLLM's
    prompt_linears: tuple[tuple[str, tuple[str, ...]], ...] = ()  # or rows of one quantization whose prompt takes
    # per-token activation scales in these linears: (name, linear names), the first MixLLM's (none)
    kv_caches: tuple[tuple[str, bool, str], ...] = ()  # or rows (name, quantized weights?, KV cache dtype), the
    # first MixLLM's: one quantization and the float model through KV caches of these dtypes


STUDIES: dict[str, Study] = {
    "salience": Study(
        "global vs local salience: the 8-bit channels ranked over all layers at once, or within each linear",
        (("global (MixLLM)", {}), ("local: the bit budget met within each (layer, linear)", {"local": True})),
        needs_mixed=True),
    "activations": Study(
        "activation quantization: int8, dynamic per (token, group of 128), per token, or static per group (the "
        "calibration maximum, or that maximum clipped for the least squared error)",
        (("dynamic, per token and group of 128 (MixLLM)", {}),
         ("dynamic, per token", {"act": ActFormat(granularity="token")}),
         ("static, per group of 128 (calibrated maximum)", {"act": ActFormat(static=True)}),
         ("static, per group of 128 (calibrated maximum clipped for the least squared error)",
          {"act": ActFormat(static=True, static_calib="mse")})),
        needs_mixed=False),
    "progressive": Study(
        "progressive precision switching during decoding: the prompt and the first decoded tokens at higher "
        "precision, the rest at MixLLM's", (), needs_mixed=False, progressive=True),
    "prompt-scales": Study(
        "the prompt's activation scales (`generate --prefill-scales`): one a token in the prompt's GEMMs, MixLLM's "
        "one a (token, group of 128) for the decoded tokens", (), needs_mixed=False,
        prompt_linears=(("per (token, group of 128) throughout (MixLLM; --prefill-scales group)", ()),
                        ("per token for the prompt (--prefill-scales token)", LINEAR_NAMES),
                        ("per token for the prompt in o_proj and gate/up (--prefill-scales selective)",
                         ("self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj")))),
    "kv-cache": Study(
        "the KV cache in int8 (`generate --kv-int8`, MixLLM's KV8): keys and values quantized per (token, head) "
        "as they are stored, before attention reads them", (), needs_mixed=False,
        kv_caches=(("float KV cache (MixLLM's evaluation)", True, "float32"),
                   ("int8 KV cache (--kv-int8)", True, "int8"),
                   ("float weights, int8 KV cache", False, "int8"))),
    "dequant": Study(
        "two-step dequantization on or off: the integer product of each group first and its scales after, or the "
        "weight and activations dequantized to bf16 and one bf16 dot", (), needs_mixed=False,
        forms=(("two-step (MixLLM): (W_q − z)·x_q in integers a group, then × s_w·s_a", "kernels"),
               ("one-step: W and x dequantized to bf16, one bf16 dot (f32 accumulation)", "one_step"),
               ("simulated: dequantized W in f32, fake-quantized x (the other studies' form)", "fake_quant"))),
}


def check_study(study: str, bits: float, *, high_bits: float = 8.0, prompt: int = 128, seq_len: int | None = None,
                switch_after: tuple[int, ...] = (32, 128)) -> Study:
    """The study named `study`, or a ValueError naming the choices / the bits it needs (and, for `progressive`,
    the switch points an evaluation window of `seq_len` tokens can hold)."""
    if study not in STUDIES:
        raise ValueError(f"unknown study {study!r}; choose one of {', '.join(STUDIES)}")
    spec = STUDIES[study]
    if not 4.0 <= bits <= 8.0:
        raise ValueError(f"--bits {bits:g} must lie in [4, 8]")
    if spec.needs_mixed and not 4.0 < bits < 8.0:
        raise ValueError(f"the {study} study compares ways of choosing the 8-bit channels, and --bits {bits:g} leaves "
                         "none to choose (all 4-bit or all 8-bit): use --bits between 4 and 8, e.g. 4.4")
    if spec.prompt_linears and seq_len is not None and not 1 <= prompt < seq_len:
        raise ValueError(f"--prompt-len {prompt} must lie in [1, --eval-seq-len {seq_len}): the prompt is part of each "
                         "evaluation window, and the tokens after it are scored")
    if spec.progressive:
        if not bits < high_bits <= 8.0:
            raise ValueError(f"--high-bits {high_bits:g} must lie in (--bits {bits:g}, 8]: the model decoding "
                             "starts on")
        if seq_len is not None and not 1 <= prompt < seq_len:
            raise ValueError(f"--prompt-len {prompt} must lie in [1, --eval-seq-len {seq_len}): tokens are decoded "
                             "after the prompt, inside each evaluation window")
        if any(n < 1 for n in switch_after):
            raise ValueError(f"--switch-after {','.join(map(str, switch_after))}: each switch point must be "
                             "≥ 1 token")
        if seq_len is not None and any(prompt + n >= seq_len for n in switch_after):
            raise ValueError(f"--switch-after {','.join(map(str, switch_after))} with --prompt-len {prompt}: a switch "
                             f"point must fall inside the evaluation window of {seq_len} tokens")
    return spec


def ablate(params, cfg, calib_batches, windows, *, study: str, bits: float = 4.4, batch_size: int = 4,
           eval_batch_size: int = 4, high_bits: float = 8.0, prompt: int = 128,
           switch_after: tuple[int, ...] = (32, 128), progress: bool = False, log=print, mesh=None) -> dict:
    """Quantizes float `params` once per row of `STUDIES[study]` and measures each row's perplexity on `windows`
    (`progressive`: two models, and each row a switch point; perplexity of the tokens after `prompt`).

    Returns {"study", "title", "bits", "fp", "salience_seconds", "rows": [{"name", "config", "perplexity",
    "delta", "int8_share", "seconds"}]}; "delta" is the perplexity increase over the float model.
    mesh: a "data" mesh (`mixjax.data_mesh()`) splits calibration and evaluation samples over its devices."""
    from mixjax.evaluate import perplexity, phased_nll
    from mixjax.quant.api import quantize, salience
    from mixjax.quant.fakequant import as_fake_quant

    T = int(windows.shape[1])
    spec = check_study(study, bits, high_bits=high_bits, prompt=prompt, seq_len=T, switch_after=switch_after)
    calib_batches = list(calib_batches)
    late = max(switch_after, default=0)  # progressive: perplexity also of the tokens decoded after this many
    if spec.progressive:
        nll = phased_nll([(params, T)], cfg, windows, prompt=prompt, batch_size=eval_batch_size, progress=progress,
                         mesh=mesh)
        fp, fp_late = math.exp(nll.mean()), math.exp(nll[late:].mean())
        log(f"float model: perplexity {fp:.3f} on the {T - prompt} tokens after each {prompt}-token prompt, "
            f"{fp_late:.3f} on the last {T - prompt - late}")
    elif spec.kv_caches:
        fp_windows = _window_nll([(params, T)], cfg, windows, prompt=1, cache_dtype="float32", mesh=mesh)
        fp = math.exp(fp_windows.mean())
        log(f"float model: perplexity {fp:.3f} (through a float KV cache)")
    elif spec.prompt_linears:
        fp = math.exp(phased_nll([(params, T)], cfg, windows, prompt=prompt, batch_size=eval_batch_size,
                                 progress=progress, mesh=mesh).mean())
        log(f"float model: perplexity {fp:.3f} on the {T - prompt} tokens after each {prompt}-token prompt")
    else:
        fp = perplexity(params, cfg, windows, batch_size=eval_batch_size, progress=progress, mesh=mesh)
        log(f"float model: perplexity {fp:.3f}")
    scores, salience_seconds = None, 0.0
    if any(4.0 < b < 8.0 for b in ((bits, high_bits) if spec.progressive else (bits,))):
        t = time.perf_counter()
        scores = salience(params, calib_batches, cfg, config=QuantConfig(bits=bits, batch_size=batch_size),
                          progress=progress, mesh=mesh)
        salience_seconds = time.perf_counter() - t
        log(f"salience: {salience_seconds:.0f} s (shared by the rows)")
    result = {"study": study, "title": spec.title, "bits": bits, "fp": fp, "salience_seconds": salience_seconds}
    if spec.progressive:
        return {**result, "high_bits": high_bits, "prompt": prompt, "late_from": prompt + late, "fp_late": fp_late,
                "rows": _progressive_rows(params, cfg, calib_batches, windows, scores, bits=bits, high_bits=high_bits,
                                          prompt=prompt, switch_after=switch_after, fp=fp, fp_late=fp_late,
                                          batch_size=batch_size, eval_batch_size=eval_batch_size, progress=progress,
                                          log=log, mesh=mesh)}
    if spec.prompt_linears:
        return {**result, "prompt": prompt, "rows": _prompt_scale_rows(
            params, cfg, calib_batches, windows, scores, spec.prompt_linears, bits=bits, prompt=prompt, fp=fp,
            batch_size=batch_size, progress=progress, log=log, mesh=mesh)}
    if spec.kv_caches:
        return {**result, "paired": "kv", "rows": _kv_rows(
            params, cfg, calib_batches, windows, scores, spec.kv_caches, fp_windows, bits=bits, fp=fp,
            batch_size=batch_size, progress=progress, log=log, mesh=mesh)}
    if spec.forms:
        return {**result, "timed": "evaluation", "rows": _form_rows(params, cfg, calib_batches, windows, scores, spec.forms, bits=bits,
                                             fp=fp, batch_size=batch_size, eval_batch_size=eval_batch_size,
                                             progress=progress, log=log, mesh=mesh)}
    rows = []
    for name, overrides in spec.rows:
        config = QuantConfig(bits=bits, batch_size=batch_size, **overrides)
        t = time.perf_counter()
        qparams, report = quantize(params, calib_batches, cfg, config=config, scores=scores, return_report=True,
                                   progress=progress, mesh=mesh)
        seconds = time.perf_counter() - t
        ppl = perplexity(as_fake_quant(qparams), cfg, windows, batch_size=eval_batch_size, progress=progress,
                         mesh=mesh)
        rows.append({"name": name, "config": describe(config), "perplexity": ppl, "delta": ppl - fp,
                     "int8_share": report.num_int8_channels / max(report.num_channels, 1), "seconds": seconds})
        log(f"{name}: perplexity {ppl:.3f} ({seconds:.0f} s)")
    return {**result, "rows": rows}


def _form_rows(params, cfg, calib_batches, windows, scores, forms, *, bits, fp, batch_size, eval_batch_size, progress,
               log, mesh) -> list[dict]:
    """One quantization with MixLLM's config, its perplexity in each form (`Study.forms`)."""
    from mixjax.evaluate import perplexity
    from mixjax.quant.api import quantize
    from mixjax.quant.fakequant import as_fake_quant, as_one_step

    config = QuantConfig(bits=bits, batch_size=batch_size)
    t = time.perf_counter()
    qparams, report = quantize(params, calib_batches, cfg, config=config, scores=scores, return_report=True,
                               progress=progress, mesh=mesh)
    log(f"W{bits:g}A8 quantized in {time.perf_counter() - t:.0f} s")
    as_form = {"kernels": lambda p: p, "one_step": as_one_step, "fake_quant": as_fake_quant}
    rows = []
    for name, form in forms:
        t = time.perf_counter()
        ppl = perplexity(as_form[form](qparams), cfg, windows, batch_size=eval_batch_size, progress=progress,
                         mesh=mesh)
        rows.append({"name": name, "config": f"{describe(config)}; {form.replace('_', ' ')}", "perplexity": ppl,
                     "delta": ppl - fp, "int8_share": report.num_int8_channels / max(report.num_channels, 1),
                     "seconds": time.perf_counter() - t})
        log(f"{name}: perplexity {ppl:.3f} ({rows[-1]['seconds']:.0f} s)")
    return rows


def with_token_scales(group: dict, token: dict, names: tuple[str, ...]) -> dict:
    """`group`'s params (fake-quantized, per-group activation scales) with the linears `names` of every layer taken
    from `token` (the same weights, per-token activation scales)."""
    from mixjax.quant.salience import linear_weight, with_weights

    layers = tuple(with_weights(g, {n: linear_weight(t, n) for n in names})
                   for g, t in zip(group["layers"], token["layers"]))
    return {**group, "layers": layers}


def _prompt_scale_rows(params, cfg, calib_batches, windows, scores, prompt_linears, *, bits, prompt, fp, batch_size,
                       progress, log, mesh) -> list[dict]:
    """One quantization (MixLLM's config); per row, the prompt with per-token activation scales in the named linears
    and every decoded token per group, one window at a time (for the paired differences)."""
    from mixjax.quant.api import quantize
    from mixjax.quant.fakequant import as_fake_quant

    config = QuantConfig(bits=bits, batch_size=batch_size)
    t = time.perf_counter()
    qparams = quantize(params, calib_batches, cfg, config=config, scores=scores, progress=progress, mesh=mesh)
    log(f"W{bits:g}A8 quantized in {time.perf_counter() - t:.0f} s")
    group, token = as_fake_quant(qparams), as_fake_quant(qparams, act=ActFormat(granularity="token"))
    T = int(windows.shape[1])
    rows, base = [], None
    for name, names in prompt_linears:
        t = time.perf_counter()
        phases = [(with_token_scales(group, token, names), prompt), (group, T)] if names else [(group, T)]
        per_window = _window_nll(phases, cfg, windows, prompt=prompt, mesh=mesh)
        ppl = math.exp(per_window.mean())
        where = f"prompt per token in {len(names)} of {len(LINEAR_NAMES)} linears"
        row = {"name": name, "config": f"{describe(config)}; {where}",
               "perplexity": ppl, "delta": ppl - fp, "int8_share": None, "seconds": time.perf_counter() - t}
        if base is None:
            base = per_window
        elif len(windows) > 1:
            row["paired"] = _paired(per_window, base)
        rows.append(row)
        log(f"{name}: perplexity {ppl:.3f} ({rows[-1]['seconds']:.0f} s)")
    return rows


def _window_nll(phases, cfg, windows, *, prompt, mesh, cache_dtype="float32"):
    """Each window's mean NLL after `prompt`, one window at a time (for paired differences): float64 [windows]."""
    import numpy as np

    from mixjax.evaluate import phased_nll

    return np.array([phased_nll(phases, cfg, windows[i:i + 1], prompt=prompt, batch_size=1, mesh=mesh,
                                cache_dtype=cache_dtype).mean() for i in range(len(windows))])


def _paired(per_window, base) -> dict:
    """A row's difference from the `base` row, window by window, in perplexity units (± its standard error)."""
    d = per_window - base
    scale = math.exp(base.mean())
    return {"delta": scale * d.mean(), "stderr": scale * d.std(ddof=1) / math.sqrt(len(d)),
            "worse": int((d > 0).sum()), "windows": len(d)}


def _kv_rows(params, cfg, calib_batches, windows, scores, kv_caches, fp_windows, *, bits, fp, batch_size, progress,
             log, mesh) -> list[dict]:
    """One quantization (MixLLM's config) and the float model through the KV caches of `kv_caches`, every
    window in one phase and alone; an int8 row's pair is the float-cache run of the same weights."""
    from mixjax.quant.api import quantize
    from mixjax.quant.fakequant import as_fake_quant

    config = QuantConfig(bits=bits, batch_size=batch_size)
    t = time.perf_counter()
    qparams = as_fake_quant(quantize(params, calib_batches, cfg, config=config, scores=scores, progress=progress,
                                     mesh=mesh))
    log(f"W{bits:g}A8 quantized in {time.perf_counter() - t:.0f} s")
    T = int(windows.shape[1])
    runs = {(False, "float32"): fp_windows}  # (quantized weights?, cache dtype) → each window's mean NLL
    rows = []
    for name, quantized, cache in kv_caches:
        t = time.perf_counter()
        if (quantized, cache) not in runs:
            runs[quantized, cache] = _window_nll([(qparams if quantized else params, T)], cfg, windows, prompt=1,
                                                 cache_dtype=cache, mesh=mesh)
        ppl = math.exp(runs[quantized, cache].mean())
        weights = describe(config) if quantized else "float weights"
        row = {"name": name, "config": f"{weights}; {cache} KV cache", "perplexity": ppl, "delta": ppl - fp,
               "int8_share": None, "seconds": time.perf_counter() - t}
        base = runs.get((quantized, "float32"))
        if cache != "float32" and base is not None and len(windows) > 1:
            row["paired"] = _paired(runs[quantized, cache], base)
        rows.append(row)
        log(f"{name}: perplexity {ppl:.3f} ({rows[-1]['seconds']:.0f} s)")
    return rows


def _progressive_rows(params, cfg, calib_batches, windows, scores, *, bits, high_bits, prompt, switch_after, fp,
                      fp_late, batch_size, eval_batch_size, progress, log, mesh) -> list[dict]:
    from mixjax.evaluate import phased_nll
    from mixjax.quant.api import quantize
    from mixjax.quant.fakequant import as_fake_quant

    models = {}
    for b in (bits, high_bits):
        t = time.perf_counter()
        config = QuantConfig(bits=b, batch_size=batch_size)
        models[b] = (as_fake_quant(quantize(params, calib_batches, cfg, config=config, scores=scores,
                                            progress=progress, mesh=mesh)), describe(config))
        log(f"W{b:g}A8 quantized in {time.perf_counter() - t:.0f} s")
    (lo, lo_desc), (hi, hi_desc) = models[bits], models[high_bits]
    T = int(windows.shape[1])
    plans = [(f"W{bits:g}A8 throughout (MixLLM)", lo_desc, [(lo, T)]),
             (f"prompt at W{high_bits:g}A8, every decoded token at W{bits:g}A8", "switch after 0 decoded tokens",
              [(hi, prompt), (lo, T)])]
    plans += [(f"prompt and the first {n} decoded tokens at W{high_bits:g}A8, then W{bits:g}A8",
               f"switch after {n} decoded tokens", [(hi, prompt + n), (lo, T)]) for n in sorted(switch_after)]
    plans.append((f"W{high_bits:g}A8 throughout", hi_desc, [(hi, T)]))
    late = max(switch_after, default=0)
    rows = []
    for name, desc, phases in plans:
        t = time.perf_counter()
        nll = phased_nll(phases, cfg, windows, prompt=prompt, batch_size=eval_batch_size, progress=progress,
                         mesh=mesh)
        ppl, ppl_late = math.exp(nll.mean()), math.exp(nll[late:].mean())
        rows.append({"name": name, "config": desc, "perplexity": ppl, "delta": ppl - fp, "late_perplexity": ppl_late,
                     "late_delta": ppl_late - fp_late, "int8_share": None, "seconds": time.perf_counter() - t})
        log(f"{name}: perplexity {ppl:.3f} ({ppl_late:.3f} after decoded token {late})")
    return rows


def describe(c: QuantConfig) -> str:
    a = c.act
    scales = "per token" if a.granularity == "token" else f"g{a.group_size}"
    static = (" static MSE-clipped" if a.static_calib == "mse" else " static") if a.static else ""
    acts = "A16" if a.bits is None else f"A{a.bits} {scales}{static}"
    weights = "GPTQ + clip" if c.gptq and c.clip else "GPTQ" if c.gptq else "clip" if c.clip else "RTN"
    chosen = f", {c.salience} {'local' if c.local else 'global'}" if 4.0 < c.bits < 8.0 else ""
    return f"W{c.bits:g} ({weights}), {acts}{chosen}"


def to_markdown(result: dict) -> str:
    """The study as a table: each row's perplexity, its increase over float and that increase against the first
    (MixLLM's) row's."""
    base = result["rows"][0]["delta"]
    if "late_from" in result:
        return _progressive_markdown(result)
    if "prompt" in result or result.get("paired") == "kv":
        return _paired_markdown(result)
    lines = [f"{result['title']} (W{result['bits']:g}); float model perplexity {result['fp']:.3f}", "",
             "| row | configuration | perplexity | increase over float | × MixLLM's increase | 8-bit channels | "
             f"{result.get('timed', 'quantization')} (s) |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['name']} | {r['config']} | {r['perplexity']:.3f} | {r['delta']:+.3f} | "
              f"{_ratio(r['delta'], base):.2f} | {100 * r['int8_share']:.1f} % | {r['seconds']:.0f} |"
              for r in result["rows"]]
    return _with_salience_time(lines, result)


def _ratio(delta: float, base: float) -> float:
    """An increase over float against the first row's (nan where that one is not an increase)."""
    return delta / base if base > 0 else float("nan")


def _with_salience_time(lines: list[str], result: dict) -> str:
    if result["salience_seconds"]:
        lines += ["", f"Salience computed once in {result['salience_seconds']:.0f} s and shared by the rows."]
    return "\n".join(lines)


def _paired_markdown(result: dict) -> str:
    rows, base = result["rows"], result["rows"][0]["delta"]
    if "prompt" in result:
        what = (f"Perplexity of the tokens after each {result['prompt']}-token prompt (float model {result['fp']:.3f}); "
                "the paired column is each row's difference from MixLLM's")
        scored = "perplexity, decoded tokens"
    else:
        what = (f"Perplexity (float model {result['fp']:.3f}, float KV cache); the paired column is each int8 row's "
                "difference from the float-cache run of the same weights")
        scored = "perplexity"
    lines = [f"{result['title']} (W{result['bits']:g}). {what}, window by window, ± its standard error.", "",
             f"| row | configuration | {scored} | × MixLLM's increase | paired difference | windows worse | "
             "evaluation (s) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        pair = r.get("paired")
        diff = "—" if pair is None else f"{pair['delta']:+.3f} ± {pair['stderr']:.3f}"
        worse = "—" if pair is None else f"{pair['worse']} of {pair['windows']}"
        lines.append(f"| {r['name']} | {r['config']} | {r['perplexity']:.3f} | {_ratio(r['delta'], base):.2f} | "
                     f"{diff} | {worse} | {r['seconds']:.0f} |")
    return _with_salience_time(lines, result)


def _progressive_markdown(result: dict) -> str:
    rows, (base, base_late) = result["rows"], (result["rows"][0]["delta"], result["rows"][0]["late_delta"])
    late = result["late_from"] - result["prompt"]
    lines = [f"{result['title']} (W{result['bits']:g}). Perplexity of the tokens after each {result['prompt']}-token "
             f"prompt (float model {result['fp']:.3f}), and of those after decoded token {late} (float model "
             f"{result['fp_late']:.3f}), which every switching row decodes at W{result['bits']:g}A8.", "",
             "| row | configuration | perplexity, decoded tokens | × MixLLM's increase | after token "
             f"{late} | × MixLLM's increase | evaluation (s) |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['name']} | {r['config']} | {r['perplexity']:.3f} | {_ratio(r['delta'], base):.2f} | "
              f"{r['late_perplexity']:.3f} | {_ratio(r['late_delta'], base_late):.2f} | {r['seconds']:.0f} |"
              for r in rows]
    return _with_salience_time(lines, result)
