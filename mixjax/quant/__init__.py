"""MixLLM quantizer: salience, global 8-bit channel allocation, GPTQ/clipping, activation fake-quant.

The salience *function* is `mixjax.salience` (`mixjax.quant.api.salience`); `mixjax.quant.salience` is its module.
"""

from mixjax.quant.activations import ActFormat, fake_quant_act
from mixjax.quant.allocate import allocate, average_bits
from mixjax.quant.api import QuantConfig, quantize
from mixjax.quant.fakequant import FakeQuantWeight, OneStepWeight, as_fake_quant, as_one_step, dequantize_params
from mixjax.quant.gptq import gptq_quantize
from mixjax.quant.report import QuantReport
from mixjax.quant.rtn import QuantizedRows, WeightFormat, dequantize_rows, quantize_rows
from mixjax.quant.salience import ProbeWeight, compute_salience

__all__ = [
    "ActFormat",
    "FakeQuantWeight",
    "OneStepWeight",
    "ProbeWeight",
    "QuantConfig",
    "QuantReport",
    "QuantizedRows",
    "WeightFormat",
    "allocate",
    "as_fake_quant",
    "as_one_step",
    "average_bits",
    "compute_salience",
    "dequantize_params",
    "dequantize_rows",
    "fake_quant_act",
    "gptq_quantize",
    "quantize",
    "quantize_rows",
]
