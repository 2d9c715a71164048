"""The GPU decode path lowers for CUDA on a machine without one: a quantized model's decode step with every
Pallas option of the model on (fused decode attention, norms and SwiGLU emitting int8 codes) traced and
lowered with `lowering_platforms=("cuda",)`, which builds every Pallas-Triton kernel's IR. Interpret mode
runs the kernels' arithmetic; this catches what only the GPU path does (shapes, dispatch, Triton lowering)."""

from __future__ import annotations

import collections
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk
import pallas_kernels.api as api
from mixjax import model
from mixjax.config import LlamaConfig


CFG = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                  num_attention_heads=8, num_key_value_heads=2, head_dim=32, rope_theta=10000.0)


def _quantized_params(cfg: LlamaConfig = CFG):
    """A small W4.4A8 model (10 % 8-bit rows, RTN), per-layer and fused: the decode step's inference form."""
    params = model.unstack_layers(model.init_params(cfg, jax.random.key(0), jnp.bfloat16))
    rng = np.random.default_rng(0)
    for layer in params["layers"]:
        for group in ("self_attn", "mlp"):
            for p in layer[group].values():
                p["weight"] = pk.pack_rtn(np.asarray(p["weight"], np.float32), rng.random(p["weight"].shape[0]) < 0.1)
    return model.fuse_projections(params)


@pytest.mark.parametrize("batch, chunk_groups, in_gemv, defer_rms", [
    (1, 2, "never", "auto"), (4, 2, "never", "auto"), (1, 2, "never", "never"), (4, None, "never", "auto"),
    (1, 2, "auto", "auto")])
def test_quantized_decode_step_lowers_for_cuda(monkeypatch, batch, chunk_groups, in_gemv, defer_rms):
    params = _quantized_params()
    monkeypatch.setattr(api, "_check_backend", lambda *a, **k: None)  # lowering only: nothing runs
    for name, value in (("ATTENTION", "auto"), ("NORM_QUANT", "auto"), ("NORM_QUANT_CHUNK_GROUPS", chunk_groups),
                        ("SWIGLU_QUANT", "auto"), ("NORM_IN_GEMV", in_gemv), ("NORM_DEFER_RMS", defer_rms)):
        monkeypatch.setattr(model, name, value)
    cache = model.init_cache(CFG, batch, 64, jnp.bfloat16)
    step = jax.jit(lambda p, t, c: model.forward_step(p, t, CFG, c, implementation="pallas"))
    text = step.trace(params, jnp.zeros((batch, 1), jnp.int32), cache).lower(lowering_platforms=("cuda",)).as_text()
    kernels = collections.Counter(re.findall(r'name = "([a-z_0-9]+)"', text))
    assert kernels["attend_new_tokens"] and kernels["silu_mul_quant"]
    # the norms before q/k/v and gate/up (the head here is float: its norm is XLA's): with NORM_DEFER_RMS each
    # is one launch of codes of w·s (the attention and SwiGLU kernels apply the row's rsqrt); otherwise the
    # two-launch form, or one program a row without chunks
    # (a jitted kernel called twice with the same shapes appears once in the text: count kinds, not calls)
    deferred = chunk_groups is not None and in_gemv == "never" and defer_rms == "auto"
    assert bool(kernels["rms_norm_codes"]) == deferred
    assert bool(kernels["residual_sumsq"]) == (chunk_groups is not None and not deferred)
    assert bool(kernels["rms_norm_quant"]) == (chunk_groups is None)
    # the linears run on the codes: only o_proj (fed by attention) quantizes its own input, beyond the GEMV
    assert kernels["mixed_gemv" if batch == 1 else "mixed_gemm_int"] >= 2 * 4
    assert kernels["quantize_activations"] == (0 if batch == 1 else 1)
    # NORM_IN_GEMV: the GEMVs after the norms normalize their own groups, no second norm launch is left
    assert bool(kernels["norm_quant_chunks"]) == (chunk_groups is not None and not deferred and in_gemv == "never")


@pytest.mark.parametrize("weights_first", [False, True])
def test_pdl_instructions_reach_every_decode_kernel(monkeypatch, weights_first):
    """With `pallas_kernels.pdl.ENABLED` every Pallas kernel of the b1 decode step waits (griddepcontrol.wait)
    before reading its inputs, and the small kernels between the GEMVs trigger their dependents; off, none
    of it is emitted."""
    from pallas_kernels import pdl

    params = _quantized_params()
    monkeypatch.setattr(api, "_check_backend", lambda *a, **k: None)
    cache = model.init_cache(CFG, 1, 64, jnp.bfloat16)

    def kernels_with(op):
        jax.clear_caches()  # the kernels are traced again with the flag as it is now
        step = jax.jit(lambda p, t, c: model.forward_step(p, t, CFG, c, implementation="pallas"))
        text = step.trace(params, jnp.zeros((1, 1), jnp.int32), cache).lower(lowering_platforms=("cuda",)).as_text()
        calls = re.split(r"(?=__gpu\$xla\.gpu\.triton)", text)[1:]
        names = [m.group(1) if (m := re.search(r'name = "([a-z_0-9]+)"', c)) else "?" for c in calls]
        return names, [op in c for c in calls]

    names, _ = kernels_with("griddepcontrol")
    assert len(names) >= 10 and not any(kernels_with("griddepcontrol")[1])
    monkeypatch.setattr(pdl, "ENABLED", True)
    monkeypatch.setattr(pdl, "WEIGHTS_FIRST", weights_first)
    names, waits = kernels_with("griddepcontrol.wait")
    assert all(waits), [n for n, w in zip(names, waits) if not w]
    _, triggers = kernels_with("griddepcontrol.launch_dependents")
    triggered = {n for n, t in zip(names, triggers) if t}
    assert {"attend_new_tokens", "silu_mul_quant", "rms_norm_codes"} <= triggered
    assert "mixed_gemv" not in triggered  # its dependents (the small kernels) have nothing to start on
    jax.clear_caches()


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="on a GPU host the lowered module carries the Mosaic GPU "
                    "kernels compiled, not as text; CPU hosts check it")
@pytest.mark.parametrize("act_scale", ["group", "token", "selective"])
def test_quantized_prefill_lowers_for_cuda(monkeypatch, act_scale):
    """A Hopper prefill (as if wgmma were there: 256 prompt tokens, the Mosaic GPU GEMMs) lowers for CUDA with
    the producers' codes: the norms' one-program-a-row kernel and SwiGLU in its blocked form (`PREFILL_ACT_SCALE`
    "group"), or their row forms with the one-pass row quantization of o_proj's input ("token", whose Triton
    kernels are built here before any GPU compiles them), or for gate/up and o_proj only ("selective"), every
    linear a wgmma GEMM."""
    from pallas_kernels import mgpu

    params = _quantized_params()
    monkeypatch.setattr(api, "_check_backend", lambda *a, **k: None)  # lowering only: nothing runs
    monkeypatch.setattr(api, "has_wgmma", lambda: True)
    monkeypatch.setattr(mgpu, "PREFILL_ACT_SCALE", act_scale)
    jax.clear_caches()  # the module flags are read while tracing
    cache = model.init_cache(CFG, 1, api.MGPU_MIN_M, jnp.bfloat16)
    step = jax.jit(lambda p, t, c: model.forward_step(p, t, CFG, c, logits_at="last", implementation="pallas"))
    text = step.trace(params, jnp.zeros((1, api.MGPU_MIN_M), jnp.int32), cache).lower(
        lowering_platforms=("cuda",)).as_text()
    kernels = collections.Counter(re.findall(r'name = "([a-z_0-9]+)"', text))
    token, per_row = act_scale == "token", act_scale != "group"  # every producer per row / some
    assert bool(kernels["rms_norm_quant"]) == (not token) and bool(kernels["rms_norm_quant_rows"]) == per_row
    assert bool(kernels["silu_mul_quant"]) == (not token) and bool(kernels["silu_mul_quant_rows"]) == token
    assert bool(kernels["quantize_rows"]) == per_row and bool(kernels["quantize_activations"]) == (not per_row)
    assert "wgmma" in text
    jax.clear_caches()


@pytest.mark.parametrize("arch", ["gemma3", "gemma2"])
def test_gemma_decode_step_lowers_for_cuda(monkeypatch, arch):
    """Gemma 3 on the GPU path: heads of 256 in the fused attention (a window on layer 0, none on layer 1), GeGLU's
    tanh in the SwiGLU kernel, and the post-attention norm taking o_proj's partials with the sandwich norm's weight
    (one program a row); Gemma 2: the same with soft-capped scores and another scale in the attention kernel — every
    kernel's Triton IR builds."""
    import dataclasses

    gemma = dict(mlp_act="gelu_tanh", embed_scale=16.0, sandwich_norms=True, sliding_window=16, global_layers=(1,),
                 head_dim=256)
    cfg = dataclasses.replace(CFG, model_type="gemma3_text", qk_norm=True, rope_local_theta=1e4,
                              query_pre_attn_scalar=168.0, **gemma) if arch == "gemma3" else \
        dataclasses.replace(CFG, model_type="gemma2", attn_logit_softcap=50.0, query_pre_attn_scalar=144.0, **gemma)
    params = _quantized_params(cfg)
    monkeypatch.setattr(api, "_check_backend", lambda *a, **k: None)  # lowering only: nothing runs
    windows = []
    real = model.attend_new_tokens_pallas
    monkeypatch.setattr(model, "attend_new_tokens_pallas",
                        lambda *a, **k: windows.append(k["sliding_window"]) or real(*a, **k))
    cache = model.init_cache(cfg, 2, 64, jnp.bfloat16)
    step = jax.jit(lambda p, t, c: model.forward_step(p, t, cfg, c, implementation="pallas"))
    text = step.trace(params, jnp.zeros((2, 1), jnp.int32), cache).lower(lowering_platforms=("cuda",)).as_text()
    kernels = collections.Counter(re.findall(r'name = "([a-z_0-9]+)"', text))
    assert kernels["attend_new_tokens"] and kernels["silu_mul_quant"] and kernels["rms_norm_quant"]
    assert windows == [16, None]


@pytest.mark.parametrize("wide", [False, True])
def test_gemma_attention_codes_lower_for_cuda(monkeypatch, wide):
    """Gemma 3's b32 step (heads of 256, one split): with `attention.WIDE_HEAD_CODES` the fused attention's epilogue
    quantizes o_proj's input in two groups a head and no `quantize_activations` launch is left for o_proj; without
    it XLA's merge path is kept and o_proj quantizes its own input. Every kernel's Triton IR builds either way."""
    import dataclasses

    from pallas_kernels import attention

    monkeypatch.setattr(attention, "WIDE_HEAD_CODES", wide)
    cfg = dataclasses.replace(CFG, model_type="gemma3_text", qk_norm=True, rope_local_theta=1e4, mlp_act="gelu_tanh",
                              embed_scale=16.0, sandwich_norms=True, sliding_window=16, global_layers=(1,),
                              head_dim=256)
    params = _quantized_params(cfg)
    monkeypatch.setattr(api, "_check_backend", lambda *a, **k: None)  # lowering only: nothing runs
    codes = []
    real = model.attend_new_tokens_pallas
    monkeypatch.setattr(model, "attend_new_tokens_pallas", lambda *a, **k: codes.append(k["codes"]) or real(*a, **k))
    batch = 32  # × 2 KV heads: the 64 programs of one split (`attention.CODES_ONE_SPLIT`)
    cache = model.init_cache(cfg, batch, 64, jnp.bfloat16)
    step = jax.jit(lambda p, t, c: model.forward_step(p, t, cfg, c, implementation="pallas"))
    text = step.trace(params, jnp.zeros((batch, 1), jnp.int32), cache).lower(lowering_platforms=("cuda",)).as_text()
    kernels = collections.Counter(re.findall(r'name = "([a-z_0-9]+)"', text))
    assert codes == [wide] * 2 and kernels["attend_new_tokens"] == 2
    assert bool(kernels["quantize_activations"]) == (not wide)
