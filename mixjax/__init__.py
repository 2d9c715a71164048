"""mixjax: MixLLM global mixed-precision quantization for Llama-family models in JAX."""

from mixjax.config import ConfigError, LlamaConfig, RopeScaling
from mixjax.linear import linear
from mixjax.model import LINEAR_NAMES, KVCache, forward, forward_step, init_cache, init_params
from mixjax.quant import FakeQuantWeight, QuantConfig, QuantReport, quantize
from mixjax.quant.api import salience
from mixjax.assets import embedded_model_path
from mixjax.data import calibration_batches, eval_windows
from mixjax.evaluate import evaluate_model, perplexity
from mixjax.parallel import data_mesh, model_mesh, shard_model, shard_weights
# `mixjax.generate` is the function
from mixjax.generate import GenerationStats, SamplingConfig, generate, generate_text
from pallas_kernels import MixedWeight, mixed_matmul, pack_mixed, pack_rtn

__all__ = [
    "ConfigError", "LlamaConfig", "RopeScaling", "linear",
    "LINEAR_NAMES", "KVCache", "forward", "forward_step", "init_cache", "init_params",
    "FakeQuantWeight", "QuantConfig", "QuantReport", "quantize", "salience",
    "embedded_model_path", "calibration_batches", "eval_windows", "evaluate_model", "perplexity",
    "data_mesh", "model_mesh", "shard_model", "shard_weights",
    "GenerationStats", "SamplingConfig", "generate", "generate_text",
    "MixedWeight", "mixed_matmul", "pack_mixed", "pack_rtn",
]
