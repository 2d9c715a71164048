"""MixLLM on the real embedded model (SmolLM2-135M), kept cheap: short calibration and evaluation slices."""

import pytest

from mixjax import data
from mixjax.evaluate import perplexity
from mixjax.quant import QuantConfig, as_fake_quant, quantize
from mixjax.quant.api import salience

pytestmark = pytest.mark.slow


def test_w44a8_beats_w4a8_on_embedded_model(embedded_mixjax):
    cfg, params, tokenizer = embedded_mixjax
    calib = data.calibration_batches(tokenizer, "owt", n_samples=4, seq_len=128, seed=0, batch_size=4)
    windows = data.eval_windows(tokenizer, "wikipedia", 256, 1024)  # [4, 256]
    # RTN for both, so the comparison isolates the salience-driven 8-bit channels.
    w4 = QuantConfig(bits=4.0, gptq=False, clip=False)
    w44 = QuantConfig(bits=4.4, gptq=False, clip=False)
    scores = salience(params, calib, cfg, config=w44)
    ppl = {}
    for name, config in (("w4", w4), ("w44", w44)):
        qp, report = quantize(params, calib, cfg, config=config, scores=scores, return_report=True)
        ppl[name] = perplexity(as_fake_quant(qp), cfg, windows, batch_size=4)
    fp = perplexity(params, cfg, windows, batch_size=4)
    assert fp < ppl["w44"] < ppl["w4"]
    assert 4.39 < report.bits_achieved <= 4.4
    # the 8-bit channels concentrate in v_proj and down_proj, as in the paper
    share = report.share_by_type
    assert share["self_attn.v_proj"] > 0.1 and share["self_attn.v_proj"] > share["mlp.gate_proj"]
