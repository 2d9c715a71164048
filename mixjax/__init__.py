"""mixjax: MixLLM global mixed-precision quantization for Llama-family models in JAX."""

from mixjax.config import ConfigError, LlamaConfig, RopeScaling
from mixjax.linear import linear

__all__ = ["ConfigError", "LlamaConfig", "RopeScaling", "linear"]
