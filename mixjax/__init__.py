"""mixjax: MixLLM global mixed-precision quantization for Llama-family models in JAX."""

from mixjax.config import ConfigError, LlamaConfig, RopeScaling
from mixjax.linear import linear
from mixjax.model import LINEAR_NAMES, KVCache, forward, forward_step, init_cache, init_params
from mixjax.quant import FakeQuantWeight, QuantConfig, QuantReport, quantize, salience

__all__ = [
    "ConfigError", "LlamaConfig", "RopeScaling", "linear",
    "LINEAR_NAMES", "KVCache", "forward", "forward_step", "init_cache", "init_params",
    "FakeQuantWeight", "QuantConfig", "QuantReport", "quantize", "salience",
]
