"""Shared test fixtures, and the `isolated` marker.

- `@pytest.mark.isolated`: the test runs in its own `pytest` subprocess, at most `ISOLATED_TIMEOUT_S`
  seconds an attempt, up to `ISOLATED_ATTEMPTS` attempts. For the Mosaic GPU kernels in interpret mode
  on CPU: the interpreter runs the kernel's warpgroups as threads whose barrier waits block inside XLA
  host callbacks, and on a 2-core machine a run deadlocks now and then (the full decode path: about one
  call in four, jax 0.10.2, session 8: no CPU progress, for ever) — a hang the test itself cannot time out. A
  failing assertion fails at once (no retry); only a run that never finishes is retried.
  The cause (session 34, from a faulthandler dump of a hung run): XLA:CPU runs the simulated threads' programs
  and their host callbacks on its client thread pool, sized by the core count; two callbacks blocked in the
  interpreter's barrier waits take both threads of a 2-core machine and the programs that would release them
  never start. The child therefore gets `PJRT_NPROC` (XLA's override of that size) of at least 8: on this
  2-core machine `test_short_prompt_in_column_tiles_within_bound` hung in 5 of 22 runs without it and in none
  of 30 with it (16 of them two at a time). The retry stays as a net.

- CPU-only machines compile the tests' programs at LLVM's lowest optimization level
  (`--xla_backend_optimization_level=0` added to `XLA_FLAGS`, which subprocesses inherit): the suite is mostly
  XLA compiling small programs, and this cut a run by ≈ 25–30 % (session 41, 2 cores: three kernel files 276 →
  198 s, `test_quant.py` 138 → 103 s; the execution-bound `test_quant_embedded.py` 54 → 58 s). The HLO passes
  are the same; the machine code may differ from -O3's in the last bits (one test compared a two-window batch
  with one-window programs and saw an activation code flip), so a test that needs bit equality compares
  programs of the same shapes. A machine with an NVIDIA driver keeps XLA's default, as does an `XLA_FLAGS` that
  already sets the level.

- `embedded_model_path` (session): path of the embedded SmolLM2-135M-Instruct GGUF.
- `make_tiny_hf` (function): builds a tiny random Hugging Face causal LM, saves it with
  `save_pretrained` into a fresh temp dir, returns (directory, torch model in eval mode).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

CPU_TEST_XLA_FLAG = "--xla_backend_optimization_level=0"


def _cpu_only_machine() -> bool:
    return not (os.path.exists("/dev/nvidiactl") or os.path.exists("/proc/driver/nvidia"))


if _cpu_only_machine() and "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {CPU_TEST_XLA_FLAG}".strip()

ISOLATED_TIMEOUT_S = 90  # an isolated test takes ≤ 20 s on 2 cores, jax's import included
ISOLATED_ATTEMPTS = 6  # without `PJRT_NPROC` a run hung ≈ 1 time in 4 (sessions 8, 34): 6 in a row ≈ 2e-4
_CHILD = "MIXJAX_ISOLATED_CHILD"


def _child_env() -> dict:
    """The isolated child's environment: the marker, and XLA:CPU's client thread pool no smaller than 8 (the
    interpreter's blocked callbacks must not take every thread; a larger value set by the user stays)."""
    given = os.environ.get("PJRT_NPROC", "")
    nproc = max(8, os.cpu_count() or 1, int(given) if given.isdigit() else 0)
    return {**os.environ, _CHILD: "1", "PJRT_NPROC": str(nproc)}


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem):
    if pyfuncitem.get_closest_marker("isolated") is None or os.environ.get(_CHILD):
        return None
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=", pyfuncitem.nodeid]
    hung = []
    for attempt in range(1, ISOLATED_ATTEMPTS + 1):
        try:
            run = subprocess.run(cmd, cwd=pyfuncitem.config.rootpath, env=_child_env(),
                                 capture_output=True, text=True, timeout=ISOLATED_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            hung.append(attempt)
            continue
        tail = run.stdout.strip().splitlines()[-1:] or [""]
        if run.returncode == 0 and " passed" in tail[0]:
            return True
        if run.returncode == 0 and " skipped" in tail[0]:
            pytest.skip(f"skipped in its subprocess: {tail[0]}")
        pytest.fail(f"{pyfuncitem.nodeid} failed in its subprocess (exit {run.returncode}):\n"
                    f"{run.stdout[-6000:]}\n{run.stderr[-3000:]}", pytrace=False)
    pytest.fail(f"{pyfuncitem.nodeid}: no result in {ISOLATED_ATTEMPTS} attempts of {ISOLATED_TIMEOUT_S} s "
                f"(hung in attempts {hung})", pytrace=False)


MAX_MAPPINGS = 20000  # memory mappings of this process past which a finished test module's programs are freed


def _mappings() -> int:
    try:
        with open("/proc/self/maps", "rb") as f:
            return sum(1 for _ in f)
    except OSError:  # not Linux: no limit to watch
        return 0


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs():
    """Every program XLA compiles for the CPU keeps its own memory mappings, and jax's caches keep the
    programs alive. The whole suite in one process reached Linux's default limit of 65530 mappings
    (`vm.max_map_count`; session 14: about 5000 more every minute). Past that, the next compilation's
    mmap fails and XLA's compiler crashes with a segfault (twice in local full runs, in different tests).
    When a module finishes with more than `MAX_MAPPINGS`, the caches are cleared so those programs can go.
    Later modules then recompile what they share with earlier ones; below the threshold nothing is
    cleared."""
    yield
    if _mappings() > MAX_MAPPINGS:
        import gc

        import jax

        jax.clear_caches()
        gc.collect()


@pytest.fixture(scope="session")
def embedded_model_path():
    from mixjax.assets import embedded_model_path as _embedded_model_path

    return _embedded_model_path()


TINY = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)


@pytest.fixture
def make_tiny_hf(tmp_path_factory):
    """make_tiny_hf(arch="llama"|"qwen2"|"qwen3"|"smollm3"|"phi3"|"granite"|"mistral"|"gemma"|"gemma2"|"gemma3_text",
    save_kwargs=None,
    **config_overrides) -> (dir, model).

    save_kwargs go to `save_pretrained`, except `bin=True`: weights written as pytorch_model.bin with
    torch.save instead (transformers 5 always writes safetensors). Every parameter (norms and biases included) is perturbed randomly so parity tests see them all.
    """
    import torch
    import transformers

    classes = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
        "smollm3": (transformers.SmolLM3Config, transformers.SmolLM3ForCausalLM),
        "phi3": (transformers.Phi3Config, transformers.Phi3ForCausalLM),
        "granite": (transformers.GraniteConfig, transformers.GraniteForCausalLM),
        "gemma": (transformers.GemmaConfig, transformers.GemmaForCausalLM),
        "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM),
        "gemma3_text": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM),
    }

    def make(arch="llama", save_kwargs=None, seed=0, **overrides):
        config_cls, model_cls = classes[arch]
        if arch in ("smollm3", "phi3", "gemma", "gemma2", "gemma3_text"):  # special-token ids past the tiny vocabulary
            overrides = {"pad_token_id": None, "bos_token_id": None, "eos_token_id": None, **overrides}
        torch.manual_seed(seed)
        model = model_cls(config_cls(**{**TINY, **overrides}))
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * torch.randn_like(p))
        model.eval()
        directory = tmp_path_factory.mktemp(f"hf_{arch}")
        save_kwargs = dict(save_kwargs or {})
        as_bin = save_kwargs.pop("bin", False)
        model.save_pretrained(directory, **save_kwargs)
        if as_bin:
            for f in directory.glob("*.safetensors*"):
                f.unlink()
            torch.save(model.state_dict(), directory / "pytorch_model.bin")
        return directory, model

    return make


@pytest.fixture(scope="session")
def embedded_hf_model(embedded_model_path):
    """transformers' float32 model of the embedded GGUF (the real-model reference), loaded once."""
    torch = pytest.importorskip("torch")
    import transformers

    path = embedded_model_path
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def embedded_mixjax(embedded_model_path):
    """(cfg, float32 params, tokenizer) of the embedded model through mixjax's loaders, loaded once."""
    import jax.numpy as jnp

    import convert

    cfg, params = convert.load(embedded_model_path, dtype=jnp.float32)
    return cfg, params, convert.load_tokenizer(embedded_model_path)
