"""The quantization part of `mixjax demo`: RTN W4A8 and MixLLM W4.4A8 perplexities beside fp."""

from __future__ import annotations

import time


def quantized_demo(params, cfg, tokenizer, windows, *, bits: float = 4.4, samples: int = 8, seq_len: int = 256,
                   out=None, implementation="auto", progress: bool = True, log=print):
    """Quantizes `params` (RTN W4A8, then MixLLM W{bits}A8 on `samples`×`seq_len` OpenWebText tokens),
    logs both perplexities on `windows`, saves the W{bits}A8 checkpoint to `out` (replacing the demo's
    previous one) and returns (the MixLLM qparams read back from `out`, results dict)."""
    from mixjax import data
    from mixjax.evaluate import perplexity
    from mixjax.quant.api import QuantConfig, quantize

    calib = data.calibration_batches(tokenizer, "owt", n_samples=samples, seq_len=seq_len, seed=0, batch_size=4)
    rtn = quantize(params, calib, cfg, config=QuantConfig(bits=4.0, gptq=False, clip=False))
    ppl_rtn = perplexity(rtn, cfg, windows, batch_size=2, implementation=implementation, progress=progress)
    log(f"RTN W4A8 perplexity: {ppl_rtn:.3f}")
    log(f"MixLLM W{bits:g}A8: salience + GPTQ + clipping on {samples}×{seq_len} calibration tokens "
        "(the paper uses 128×2048: --calib-samples 128 --calib-seq-len 2048)")
    t = time.perf_counter()
    qparams, report = quantize(params, calib, cfg, config=QuantConfig(bits=bits), return_report=True,
                               progress=progress)
    seconds = time.perf_counter() - t
    shares = ", ".join(f"{n.split('.')[1]} {100 * s:.0f}%" for n, s in report.share_by_type.items())
    log(f"quantized in {seconds:.0f} s; 8-bit channels per linear: {shares}")
    ppl = perplexity(qparams, cfg, windows, batch_size=2, implementation=implementation, progress=progress)
    log(f"MixLLM W{bits:g}A8 perplexity: {ppl:.3f}")
    if out is not None:
        qparams = _save_and_reload(out, qparams, cfg, tokenizer, QuantConfig(bits=bits))
        log(f"saved the W{bits:g}A8 checkpoint to {out} (`mixjax generate --model {out}` uses it); generating from it")
    return qparams, {"perplexity_rtn_w4a8": ppl_rtn, "perplexity_quantized": ppl, "quantize_seconds": seconds}


def _save_and_reload(out, qparams, cfg, tokenizer, config):
    import tempfile

    import convert
    from mixjax.quant.checkpoint import save_quantized

    with tempfile.TemporaryDirectory() as tok_dir:
        tokenizer.save_pretrained(tok_dir)
        save_quantized(out, qparams, cfg, config=config, files={"tokenizer": tok_dir}, force=True,
                       extra={"source": "mixjax demo"})
    return convert.load(out)[1]
