"""`mixjax ablate STUDY`: one of MixLLM's design choices against its alternatives, through one quantize → perplexity
path on one calibration and evaluation set.

Each study is a list of `QuantConfig` overrides; its first row is MixLLM's choice. The salience scores are
computed once and shared by every row (they do not depend on how the 8-bit channels are then chosen or on the
activation format). Perplexity is measured through `as_fake_quant` (the kernels' codes and activation rounding in
float XLA ops), so a study runs the same on a CPU and a GPU. Adding a study is one entry in `STUDIES`.
"""

from __future__ import annotations

import dataclasses
import time

from mixjax.quant.activations import ActFormat
from mixjax.quant.api import QuantConfig


@dataclasses.dataclass(frozen=True)
class Study:
    title: str
    rows: tuple[tuple[str, dict], ...]  # (name, QuantConfig overrides); the first row is MixLLM's choice
    needs_mixed: bool  # only meaningful with 8-bit channels to choose: 4 < bits < 8


STUDIES: dict[str, Study] = {
    "salience": Study(
        "global vs local salience: the 8-bit channels ranked over all layers at once, or within each linear",
        (("global (MixLLM)", {}), ("local: the bit budget met within each (layer, linear)", {"local": True})),
        needs_mixed=True),
    "activations": Study(
        "activation quantization: int8, dynamic per (token, group of 128), per token, or static per group",
        (("dynamic, per token and group of 128 (MixLLM)", {}),
         ("dynamic, per token", {"act": ActFormat(granularity="token")}),
         ("static, per group of 128 (calibrated maximum)", {"act": ActFormat(static=True)})),
        needs_mixed=False),
}


def check_study(study: str, bits: float) -> Study:
    """The study named `study`, or a ValueError naming the choices / the bits it needs."""
    if study not in STUDIES:
        raise ValueError(f"unknown study {study!r}; choose one of {', '.join(STUDIES)}")
    spec = STUDIES[study]
    if not 4.0 <= bits <= 8.0:
        raise ValueError(f"--bits {bits:g} must lie in [4, 8]")
    if spec.needs_mixed and not 4.0 < bits < 8.0:
        raise ValueError(f"the {study} study compares ways of choosing the 8-bit channels, and --bits {bits:g} leaves "
                         "none to choose (all 4-bit or all 8-bit): use --bits between 4 and 8, e.g. 4.4")
    return spec


def ablate(params, cfg, calib_batches, windows, *, study: str, bits: float = 4.4, batch_size: int = 4,
           eval_batch_size: int = 4, progress: bool = False, log=print) -> dict:
    """Quantizes float `params` once per row of `STUDIES[study]` and measures each row's perplexity on `windows`.

    Returns {"study", "title", "bits", "fp", "salience_seconds", "rows": [{"name", "config", "perplexity",
    "delta", "int8_share", "seconds"}]}; "delta" is the perplexity increase over the float model."""
    from mixjax.evaluate import perplexity
    from mixjax.quant.api import quantize, salience
    from mixjax.quant.fakequant import as_fake_quant

    spec = check_study(study, bits)
    calib_batches = list(calib_batches)
    fp = perplexity(params, cfg, windows, batch_size=eval_batch_size, progress=progress)
    log(f"float model: perplexity {fp:.3f}")
    scores, salience_seconds = None, 0.0
    if 4.0 < bits < 8.0:
        t = time.perf_counter()
        scores = salience(params, calib_batches, cfg, config=QuantConfig(bits=bits, batch_size=batch_size),
                          progress=progress)
        salience_seconds = time.perf_counter() - t
        log(f"salience: {salience_seconds:.0f} s (shared by the rows)")
    rows = []
    for name, overrides in spec.rows:
        config = QuantConfig(bits=bits, batch_size=batch_size, **overrides)
        t = time.perf_counter()
        qparams, report = quantize(params, calib_batches, cfg, config=config, scores=scores, return_report=True,
                                   progress=progress)
        seconds = time.perf_counter() - t
        ppl = perplexity(as_fake_quant(qparams), cfg, windows, batch_size=eval_batch_size, progress=progress)
        rows.append({"name": name, "config": describe(config), "perplexity": ppl, "delta": ppl - fp,
                     "int8_share": report.num_int8_channels / max(report.num_channels, 1), "seconds": seconds})
        log(f"{name}: perplexity {ppl:.3f} ({seconds:.0f} s)")
    return {"study": study, "title": spec.title, "bits": bits, "fp": fp, "salience_seconds": salience_seconds,
            "rows": rows}


def describe(c: QuantConfig) -> str:
    a = c.act
    acts = ("A16" if a.bits is None else
            f"A{a.bits} {'per token' if a.granularity == 'token' else f'g{a.group_size}'}{' static' if a.static else ''}")
    weights = "GPTQ + clip" if c.gptq and c.clip else "GPTQ" if c.gptq else "clip" if c.clip else "RTN"
    chosen = f", {c.salience} {'local' if c.local else 'global'}" if 4.0 < c.bits < 8.0 else ""
    return f"W{c.bits:g} ({weights}), {acts}{chosen}"


def to_markdown(result: dict) -> str:
    """The study as a table: each row's perplexity, its increase over float and that increase against the first
    (MixLLM's) row's."""
    base = result["rows"][0]["delta"]
    lines = [f"{result['title']} (W{result['bits']:g}); float model perplexity {result['fp']:.3f}", "",
             "| row | configuration | perplexity | increase over float | × MixLLM's increase | 8-bit channels | "
             "quantization (s) |",
             "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        ratio = r["delta"] / base if base > 0 else float("nan")
        lines.append(f"| {r['name']} | {r['config']} | {r['perplexity']:.3f} | {r['delta']:+.3f} | {ratio:.2f} | "
                     f"{100 * r['int8_share']:.1f} % | {r['seconds']:.0f} |")
    if result["salience_seconds"]:
        lines += ["", f"Salience computed once in {result['salience_seconds']:.0f} s and shared by the rows."]
    return "\n".join(lines)
