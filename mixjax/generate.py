"""Jitted text generation with a KV cache: one prefill call, then a `lax.while_loop` of decode steps.

Prefill runs every prompt of the batch in one `forward_step`: prompts are right-padded to the longest
and `num_valid` holds their true lengths, so each row continues from its own position; the LM head runs
only at each row's last prompt token (`logits_at="last"`). Decoding then
feeds one token per row per iteration of a `lax.while_loop` (no Python loop per token), stopping when
every row has produced an end-of-sequence token or `max_new_tokens` tokens. The whole of prefill and
decode is a single compiled function.

Sampling: temperature 0 is greedy (argmax); otherwise logits / temperature, optionally restricted to
the `top_k` most likely tokens and to the smallest set whose probability reaches `top_p`, then a
categorical draw with a key derived from `seed` and the step number (deterministic per seed).

Host round trips: a streaming callback stalls the device while the host runs it, and one a step cost a W4.4A8
request on an H100 10 % (session 52). On an accelerator the decode loop therefore runs in chunks of `sync_every`
steps (8 by default), each a loop of known trip count, and looks at the host once a chunk: to stop when every row is
done, and to stream the chunk's tokens (streaming then costs 4 %; unstreamed, chunks cost nothing). Steps run after
every row is done cost time, never output (up to `sync_every` - 1 of them); the last steps before `max_new_tokens`
that do not fill a chunk run one at a time, so no step runs past it.

Streaming: `on_token(tokens)` is called on the host, in order, with the int32 [B] tokens of each step
(-1 for rows that have already finished), fed by an ordered `jax.debug.callback`, the first token at once after
the prompt. The program carries a stream id rather than the callback itself, so calls with other callbacks (each
`generate_text` makes its own) reuse it.
"""

from __future__ import annotations

import contextlib

import dataclasses
import functools
import itertools
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mixjax import model
from mixjax.config import LlamaConfig
from mixjax.linear import Implementation
from mixjax.parallel import (DATA_AXIS, check_mesh, check_params_for_mesh, is_model_mesh, local_config, replicate,
                             tensor_parallel_jit)

PAD = -1  # placeholder in the output buffer for rows that have finished
_STREAMS: dict[int, Callable[[np.ndarray], None]] = {}  # stream id → the on_token of a `generate` call in flight
_STREAM_IDS = itertools.count()
SYNC_EVERY_GPU = 8  # decode steps between host round trips on an accelerator (1 on the CPU)
STREAM_ORDERED = True  # the streaming callback as an ordered effect (its token threads the program)


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How the next token is picked from the logits (static: a new config compiles anew)."""

    temperature: float = 0.0  # 0 → greedy
    top_k: int = 0  # 0 → no top-k restriction
    top_p: float = 1.0  # 1 → no nucleus restriction

    def __post_init__(self):
        if not self.temperature >= 0:
            raise ValueError(f"temperature={self.temperature} must be ≥ 0 (0 means greedy)")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k={self.top_k!r} must be an integer ≥ 0 (0 disables top-k)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must lie in (0, 1] (1 disables nucleus sampling)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplerState:
    """The carry of the decode loop.

    step:   int32 scalar, the number of tokens generated so far (the output column written next).
    last:   int32 [B], the token each row feeds into the next decode step.
    done:   bool [B], rows that have emitted an end-of-sequence token.
    tokens: int32 [B, max_new_tokens], generated tokens; PAD after a row is done.
    cache:  the KV cache (`mixjax.model.KVCache`), prompts plus generated tokens.
    key:    PRNG key of the run; step s samples row b with `fold_in(fold_in(key, s), b)`.
    """

    step: jax.Array
    last: jax.Array
    done: jax.Array
    tokens: jax.Array
    cache: model.KVCache
    key: jax.Array


def generate(
    params,
    cfg: LlamaConfig,
    prompt_tokens: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_token_ids: Sequence[int] | None = None,
    seed: int = 0,
    implementation: Implementation = "auto",
    on_token: Callable[[np.ndarray], None] | None = None,
    sync_every: int | None = None,
    cache_dtype=None,
    prefill_params=None,
    switch_after: int = 0,
    mesh: Mesh | None = None,
) -> list[list[int]]:
    """Continues each prompt; returns the new tokens of each row (ending with its EOS token, if any).

    prompt_tokens: one list of token ids per prompt; lengths may differ (one batch, right-padded).
    temperature / top_k / top_p: see `SamplingConfig`; seed: the PRNG seed of sampling.
    eos_token_ids: defaults to `cfg.eos_token_ids`; pass () to never stop early.
    on_token: called on the host, in order, with each step's int32 [B] tokens (PAD = -1 for finished rows).
    sync_every: decode steps the device runs between looking at the host, to stop at EOS and to stream (the first
      token always goes at once); None → `SYNC_EVERY_GPU` (8) on an accelerator, 1 on the CPU. 8 steps of
      Llama-3-8B W4.4A8 on an H100 take about 22 ms, too short to see.
    cache_dtype: defaults to the dtype of the embedding table; jnp.int8 stores keys/values as int8 with a
      scale per (row, head, position) (half the cache memory of bf16; see `mixjax.model.KVCache`).
    prefill_params / switch_after: progressive precision. A second parameter set of the same model (e.g. its
      W8A8 quantization beside W4.4A8 `params`) runs the prompt and the first `switch_after` decoded tokens;
      `params` runs the rest, reading the cache the first one wrote. Both are resident. In `mixjax ablate
      progressive` a W8A8 prompt kept 0.78× of W4.4A8's perplexity increase on the later tokens.
    mesh: a one-axis "data" mesh (`mixjax.data_mesh()`): the prompts are split over its devices, each holding
      the whole model and decoding its rows (`shard_map`); the same tokens as one device (sampled ones too:
      each row draws from its own key). No streaming. Or a "model" mesh (`mixjax.model_mesh()`) with params
      (and prefill_params) from `mixjax.shard_model` on it: tensor parallel.
    Speed: quantized params from `model.fuse_projections(params)` (one kernel call for q/k/v and for gate/up; on a
    GPU it also stores the codes in the order the Pallas decode kernels read fastest, `model.TILED_CODES`: H100,
    Llama-3-8B shape, +12 % tokens/s at 8 prompts, +6 % at 32, −2.5 % at 1; `tile=False` keeps the stored order).
    Raises ValueError before any compilation for empty prompts, ids outside the vocabulary, or
    prompt + max_new_tokens beyond `cfg.max_position_embeddings`.
    """
    sampling = SamplingConfig(float(temperature), int(top_k), float(top_p))
    _check_phases(params, prefill_params, switch_after)
    if prefill_params is not None and _stacked(params) != _stacked(prefill_params):
        params, prefill_params = model.unstack_layers(params), model.unstack_layers(prefill_params)  # one cache form
    if sampling.top_k > cfg.vocab_size:
        raise ValueError(f"top_k={top_k} exceeds vocab_size={cfg.vocab_size}; use 0 to disable top-k")
    prompts, lengths = _pad_prompts(prompt_tokens, cfg, max_new_tokens)  # [B, P], [B]
    eos = tuple(cfg.eos_token_ids if eos_token_ids is None else (int(e) for e in eos_token_ids))
    dtype = jnp.dtype(cache_dtype or params["norm"].dtype)
    check_mesh(mesh, tensor_parallel=True)
    check_params_for_mesh(params, mesh)
    check_params_for_mesh(prefill_params, mesh, "prefill_params")
    if mesh is not None and on_token is not None:
        raise ValueError("streaming (on_token) needs one device: each device decodes its own rows; drop on_token "
                         "or the mesh")
    every = _sync_every(sync_every)
    static = dict(cfg=cfg, max_new_tokens=int(max_new_tokens), sampling=sampling, eos=eos,
                  implementation=implementation, cache_dtype=dtype,
                  switch_after=int(switch_after) if prefill_params is not None else 0, sync_every=every)
    n = len(prompts)
    if mesh is None:
        stream = None if on_token is None else next(_STREAM_IDS)
        if stream is not None:
            _STREAMS[stream] = on_token
        try:
            out, steps = jax.device_get(_generate_jit(
                params, jnp.asarray(prompts), jnp.asarray(lengths), jax.random.key(seed),
                None if stream is None else jnp.int32(stream), prefill_params=prefill_params, **static))
        finally:
            if stream is not None:
                jax.effects_barrier()  # every chunk's callback has run
                del _STREAMS[stream]
    elif is_model_mesh(mesh):  # params from shard_model: every device runs every row on its slice of the model
        out, steps = _generate_tensor_parallel(mesh, tuple(sorted(static.items())))(
            params, prefill_params, jnp.asarray(prompts), jnp.asarray(lengths), jax.random.key(seed))
    else:  # rows split over the devices (padded with copies of row 0), the params replicated
        pad = -n % mesh.size
        prompts, lengths = np.concatenate([prompts, prompts[:1].repeat(pad, 0)]), np.concatenate(
            [lengths, lengths[:1].repeat(pad, 0)])
        rows = NamedSharding(mesh, PartitionSpec(DATA_AXIS))
        params, prefill_params = replicate((params, prefill_params), mesh)
        out, steps = _generate_split(mesh, tuple(sorted(static.items())))(
            params, prefill_params, jax.device_put(prompts, rows), jax.device_put(lengths, rows),
            jax.random.key(seed))
    out = np.asarray(out)[:n, : int(steps)]  # [B, steps]
    return [[int(t) for t in row if t != PAD] for row in out]


def _sync_every(sync_every) -> int:
    """The decode steps between host round trips: sync_every, or its default for this machine."""
    if sync_every is None:
        return 1 if jax.default_backend() == "cpu" else SYNC_EVERY_GPU
    if isinstance(sync_every, bool) or not isinstance(sync_every, (int, np.integer)) or sync_every < 1:
        raise ValueError(f"sync_every={sync_every!r} must be a positive integer (decode steps between host round "
                         "trips; 1 checks for EOS and streams after every token)")
    return int(sync_every)


def _pad_prompts(prompt_tokens, cfg: LlamaConfig, max_new_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """Validates the request and right-pads the prompts → int32 [B, P], lengths int32 [B]."""
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be a positive integer")
    if isinstance(prompt_tokens, (str, bytes)) or not len(prompt_tokens):
        raise ValueError("prompt_tokens must be a non-empty list of token-id lists (one per prompt)")
    rows = [np.asarray(p, dtype=np.int64).reshape(-1) for p in prompt_tokens]
    for i, row in enumerate(rows):
        if row.size == 0:
            raise ValueError(f"prompt {i} is empty; every prompt needs at least one token")
        if row.min() < 0 or row.max() >= cfg.vocab_size:
            raise ValueError(f"prompt {i} holds token ids outside [0, vocab_size={cfg.vocab_size})")
        if row.size + max_new_tokens > cfg.max_position_embeddings:
            raise ValueError(
                f"prompt {i} has {row.size} tokens; with max_new_tokens={max_new_tokens} that is "
                f"{row.size + max_new_tokens} positions, more than the model context "
                f"max_position_embeddings={cfg.max_position_embeddings}; shorten the prompt or max_new_tokens"
            )
    lengths = np.array([r.size for r in rows], np.int32)
    width = _bucket(int(lengths.max()))
    padded = np.zeros((len(rows), width), np.int32)
    for i, row in enumerate(rows):
        padded[i, : row.size] = row
    return padded, lengths


def _bucket(n: int) -> int:
    """Prompt width rounded up to a multiple of 16, so nearby prompt lengths share one compilation."""
    return -(-n // 16) * 16


def _stacked(params) -> bool:
    return not isinstance(params["layers"], (tuple, list))


def _check_phases(params, prefill_params, switch_after) -> None:
    """prefill_params must be a parameter set of the same model; switch_after a count of decoded tokens."""
    if not isinstance(switch_after, (int, np.integer)) or switch_after < 0:
        raise ValueError(f"switch_after={switch_after!r} must be an integer ≥ 0 (decoded tokens run by prefill_params)")
    if prefill_params is None:
        if switch_after:
            raise ValueError(f"switch_after={switch_after} needs prefill_params, the model that runs those tokens")
        return

    def outline(p):
        layers = p["layers"]
        n = len(layers) if isinstance(layers, (tuple, list)) else jax.tree.leaves(layers)[0].shape[0]
        return n, tuple(np.shape(p["norm"])), tuple(p["embed_tokens"].shape)

    if outline(prefill_params) != outline(params):
        raise ValueError(f"prefill_params (layers, norm, embedding shapes {outline(prefill_params)}) are not the "
                         f"same model as params ({outline(params)}): quantize one float model twice")


@functools.partial(
    jax.jit,
    static_argnames=("cfg", "max_new_tokens", "sampling", "eos", "implementation", "cache_dtype", "switch_after",
                     "sync_every"),
)
def _generate_jit(params, prompts, lengths, key, stream=None, *, cfg, max_new_tokens, sampling, eos, implementation,
                  cache_dtype, prefill_params=None, switch_after=0, sync_every=1):
    """prompts [B, P] right-padded, lengths [B] → (tokens [B, max_new_tokens], steps taken). With prefill_params,
    those run the prompt and the first `switch_after` decoded tokens, in a loop of their own. stream: None, or an
    int32 id in `_STREAMS` whose callback gets the tokens; sync_every: decode steps between host round trips."""
    return _generate_body(params, prefill_params, prompts, lengths, key, 0, cfg=cfg, max_new_tokens=max_new_tokens,
                          sampling=sampling, eos=eos, implementation=implementation, cache_dtype=cache_dtype,
                          stream=stream, switch_after=switch_after, sync_every=sync_every)


@functools.lru_cache(maxsize=16)
def _generate_split(mesh: Mesh, static: tuple):
    """`_generate_jit` with the rows split over the mesh: each device runs its rows' prefill and decode loop (its
    own trip count); the steps taken are the most over the devices."""
    def local(params, prefill_params, prompts, lengths, key):  # prompts [B / devices, P]
        row0 = jax.lax.axis_index(DATA_AXIS) * prompts.shape[0]
        tokens, steps = _generate_body(params, prefill_params, prompts, lengths, key, row0, stream=None,
                                       **dict(static))
        return tokens, jax.lax.pmax(steps, DATA_AXIS)

    rows, same = PartitionSpec(DATA_AXIS), PartitionSpec()
    return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(same, same, rows, rows, same), out_specs=(rows, same),
                                 check_vma=False))


@functools.lru_cache(maxsize=16)
def _generate_tensor_parallel(mesh: Mesh, static: tuple):
    """`_generate_jit` on `shard_model` params: each device runs its heads and MLP features of every row (the
    o_proj and down_proj outputs psum'd, so every device samples the same tokens)."""
    static = {**dict(static), "cfg": local_config(dict(static)["cfg"], mesh.size)}

    def body(params, prefill_params, prompts, lengths, key):
        return _generate_body(params, prefill_params, prompts, lengths, key, 0, stream=None, **static)

    return tensor_parallel_jit(body, mesh, 2)


def _generate_body(params, prefill_params, prompts, lengths, key, row0, *, cfg, max_new_tokens, sampling, eos,
                   implementation, cache_dtype, stream, switch_after, sync_every=1):
    first = params if prefill_params is None else prefill_params
    emit = functools.partial(_emit, sampling=sampling, eos=eos, row0=row0)
    state = _prefill(first, prompts, lengths, key, cfg=cfg, max_new_tokens=max_new_tokens, emit=emit,
                     implementation=implementation, cache_dtype=cache_dtype)
    if stream is not None:
        _send(stream, state, 0, 1)  # the first token at once
    loop = functools.partial(_decode_loop, cfg=cfg, emit=emit, implementation=implementation, stream=stream,
                             every=sync_every)
    if switch_after:  # step s feeds the token emitted at s - 1: steps 1 … switch_after feed the first decoded ones
        state = loop(first, state, max_new_tokens=min(max_new_tokens, switch_after + 1))
    state = loop(params, state, max_new_tokens=max_new_tokens)
    return state.tokens, state.step


def _prefill(params, prompts, lengths, key, *, cfg, max_new_tokens, emit, implementation, cache_dtype) -> SamplerState:
    """One forward_step over the padded prompts (LM head only at each row's last token), first token sampled."""
    B, P = prompts.shape
    stacked = _stacked(params)  # the cache takes the layers' form
    cache = model.init_cache(cfg, B, model.cache_length(P + max_new_tokens, cache_dtype), cache_dtype, stacked=stacked)
    logits, cache = model.forward_step(params, prompts, cfg, cache, num_valid=lengths, logits_at="last",
                                       implementation=implementation)  # [B, 1, V]
    state = SamplerState(
        step=jnp.int32(0), last=jnp.zeros((B,), jnp.int32), done=jnp.zeros((B,), bool),
        tokens=jnp.full((B, max_new_tokens), PAD, jnp.int32), cache=cache, key=key,
    )
    return emit(state, logits[:, 0])


def _decode_loop(params, state: SamplerState, *, cfg, max_new_tokens, emit, implementation, stream=None,
                 every=1) -> SamplerState:
    """One-token decode steps until max_new_tokens or every row is done: chunks of `every` steps (a loop of known trip
    count each), the host asked whether to go on (and, streamed, handed the tokens) after each, then the steps that
    do not fill a chunk one at a time. every 1: one `lax.while_loop` of single steps."""

    def step(s: SamplerState):
        logits, cache = model.forward_step(params, s.last[:, None], cfg, s.cache,
                                           implementation=implementation)  # [B, 1, V]
        return emit(dataclasses.replace(s, cache=cache), logits[:, 0])

    def sent(run, width):  # run, then stream the steps it took
        def body(s: SamplerState):
            start = s.step
            s = run(s)
            if stream is not None:
                _send(stream, s, start, width)
            return s
        return body

    def left(s: SamplerState, steps: int):  # `steps` more fit before max_new_tokens, and some row is not done
        return (s.step + steps <= max_new_tokens) & ~jnp.all(s.done)

    if every > 1:
        def chunk(s: SamplerState):
            return jax.lax.fori_loop(0, every, lambda _, s: step(s), s)

        state = jax.lax.while_loop(lambda s: left(s, every), sent(chunk, every), state)
    if every == 1:
        return jax.lax.while_loop(lambda s: left(s, 1), sent(step, 1), state)
    rest = functools.partial(jax.lax.while_loop, lambda s: left(s, 1), step)  # fewer than `every` steps are left
    return sent(rest, every - 1)(state)


def _send(stream, s: SamplerState, start, width: int) -> None:
    """Hands the tokens of steps [start, s.step) — at most `width` of them — to the host callback of `stream`."""
    width = min(width, s.tokens.shape[1])
    first = jnp.clip(start, 0, s.tokens.shape[1] - width)  # the slice may not run past the buffer's end
    cols = jax.lax.dynamic_slice_in_dim(s.tokens, first, width, axis=1)  # [B, width]
    head = jnp.stack([stream, start - first, s.step - first, cols.shape[0]]).astype(jnp.int32)
    # one operand: each costs the host an array of its own (on the CPU ≈ 25 µs, against ≈ 40 for the callback)
    jax.debug.callback(_deliver, jnp.concatenate([head, cols.reshape(-1)]), ordered=STREAM_ORDERED)


def _emit(s: SamplerState, logits, *, sampling: SamplingConfig, eos: tuple[int, ...], row0=0) -> SamplerState:
    """Samples one token per row from logits [B, V] and records it (PAD for finished rows). Row b of the batch
    (global row row0 + b) draws with key fold_in(fold_in(key, step), row0 + b)."""
    step_key = jax.random.fold_in(s.key, s.step)
    rows = row0 + jnp.arange(logits.shape[0])
    keys = step_key if sampling.greedy else jax.vmap(lambda r: jax.random.fold_in(step_key, r))(rows)  # [B]
    token = sample(logits, keys, sampling)  # [B]
    token = jnp.where(s.done, PAD, token)
    done = s.done | jnp.isin(token, jnp.asarray(eos, jnp.int32)) if eos else s.done
    return dataclasses.replace(
        s,
        step=s.step + 1,
        last=jnp.maximum(token, 0),  # finished rows keep feeding a valid id; their output is ignored
        done=done,
        tokens=s.tokens.at[:, s.step].set(token),
    )


def _deliver(packed) -> None:
    """The host side of the streaming callback. packed: int32 [stream id, begin, end, B, then cols [B, width]
    row-major]. Hands columns [begin, end) of cols, one step's tokens each, in order to the on_token of call `stream`,
    up to the first step with no row left (run past the end)."""
    packed = np.asarray(packed)
    stream, begin, end, rows = (int(v) for v in packed[:4])
    on_token, cols = _STREAMS[stream], packed[4:].reshape(rows, -1)
    for j in range(begin, end):
        if (cols[:, j] == PAD).all():
            return
        on_token(cols[:, j])


def sample(logits: jax.Array, key: jax.Array, sampling: SamplingConfig) -> jax.Array:
    """logits [B, V] → int32 [B] next tokens; key: one PRNG key, or one a row ([B])."""
    logits = logits.astype(jnp.float32)
    if sampling.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / sampling.temperature
    neg = jnp.finfo(jnp.float32).min
    if sampling.top_k:
        kth = jax.lax.top_k(logits, sampling.top_k)[0][:, -1:]  # [B, 1]
        logits = jnp.where(logits < kth, neg, logits)
    if sampling.top_p < 1:
        logits = _top_p_mask(logits, sampling.top_p, neg)
    if key.ndim > (0 if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key) else 1):  # a key a row
        return jax.vmap(lambda k, l: jax.random.categorical(k, l))(key, logits).astype(jnp.int32)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def _top_p_mask(logits: jax.Array, top_p: float, neg) -> jax.Array:
    """Keeps the most likely tokens whose probabilities first reach top_p (at least one)."""
    order = jnp.argsort(-logits, axis=-1)  # [B, V]
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # probability mass ranked above each token
    keep_sorted = before < top_p  # [B, V]; the top token always has before == 0
    keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
    return jnp.where(keep, logits, neg)


def encode_prompt(tokenizer, prompt: str, *, chat: bool = False) -> list[int]:
    """Token ids of `prompt`; with `chat`, wrapped in the tokenizer's chat template as a user turn."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("the prompt is empty; pass some text with --prompt")
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("this model's tokenizer has no chat template; drop --chat")
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        return list(tokenizer.encode(text, add_special_tokens=False))
    return list(tokenizer.encode(prompt))


@dataclasses.dataclass(frozen=True)
class GenerationStats:
    """How long one `generate_text` call took (its `on_stats`, the CLI's `generate --stats`). Loading the model is
    not included; the clock runs from the `generate` call to its return.

    compile_seconds: tracing, lowering and compiling inside the call (jax.monitoring's compile events), 0 when every
      program came from jax's cache (a second call with the same shapes and settings).
    first_token_seconds: from the call to the first new token reaching the host, less compile_seconds: the prompt's
      prefill and the first sample. None where tokens are not streamed (a model split over several devices)."""

    prompt_tokens: int
    new_tokens: int
    seconds: float
    compile_seconds: float
    first_token_seconds: float | None
    device: str

    @property
    def decode_tokens_per_second(self) -> float | None:
        """The new tokens after the first, per second after the first one arrived (None: fewer than two, or not
        streamed)."""
        if self.first_token_seconds is None or self.new_tokens < 2:
            return None
        rest = self.seconds - self.compile_seconds - self.first_token_seconds
        return (self.new_tokens - 1) / rest if rest > 0 else None

    def summary(self) -> str:
        head = (f"{self.prompt_tokens} prompt tokens, {self.new_tokens} new tokens in {self.seconds:.3f} s on "
                f"{self.device}: compiling {self.compile_seconds:.3f} s")
        if self.first_token_seconds is None:
            return head + " (tokens not streamed: no time to the first token)"
        rate = self.decode_tokens_per_second
        return (head + f", first token {self.first_token_seconds:.3f} s"
                + ("" if rate is None else f", then {self.new_tokens - 1} tokens at {rate:.1f} tokens/s"))


class _Stopwatch:
    """Times one `generate` call for `GenerationStats`: the compile events inside it and when the first token
    arrives (wrapping the call's `on_token`)."""

    def __init__(self, on_token: Callable[[np.ndarray], None] | None):
        self.inner, self.first, self.compile_s = on_token, None, 0.0

    def __call__(self, tokens: np.ndarray) -> None:
        if self.first is None:
            self.first = time.perf_counter()
        if self.inner is not None:
            self.inner(tokens)

    def _compiled(self, event: str, duration: float, **_) -> None:
        if event.startswith("/jax/core/compile/"):  # tracing, lowering to MLIR, the backend's compile
            self.compile_s += duration

    def __enter__(self) -> "_Stopwatch":
        jax.monitoring.register_event_duration_secs_listener(self._compiled)
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.end = time.perf_counter()
        jax.monitoring.unregister_event_duration_listener(self._compiled)

    def stats(self, prompt_tokens: int, new_tokens: int, streamed: bool) -> GenerationStats:
        first = None if not streamed or self.first is None else max(0.0, self.first - self.start - self.compile_s)
        dev = jax.devices()[0]
        return GenerationStats(prompt_tokens, new_tokens, self.end - self.start, self.compile_s, first,
                               f"{dev.device_kind} ({dev.platform})")


class TextStream:
    """Turns the token stream of row 0 into text pieces: `on_token` for `generate`, `on_text` for output."""

    def __init__(self, tokenizer, on_text: Callable[[str], None]):
        self.tokenizer, self.on_text = tokenizer, on_text
        self.ids: list[int] = []
        self.emitted = ""

    def __call__(self, tokens: np.ndarray) -> None:
        if tokens[0] == PAD:
            return
        self.ids.append(int(tokens[0]))
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the next token
            return
        self._emit(text)

    def flush(self) -> None:
        """Emits whatever is still held back (a trailing incomplete character at the end)."""
        self._emit(self.tokenizer.decode(self.ids, skip_special_tokens=True))

    def _emit(self, text: str) -> None:
        if len(text) > len(self.emitted):
            self.on_text(text[len(self.emitted):])
        self.emitted = text


def generate_text(*, model_path=None, prompt: str, chat: bool = False, max_new_tokens: int = 64,
                  temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                  dtype=jnp.float32, implementation: Implementation = "auto",
                  on_text: Callable[[str], None] | None = None, cache_dtype=None, int8_prefill: bool = False,
                  prefill_model_path=None, switch_after: int = 0, tensor_parallel: int | None = 1,
                  prefill_scales: str | None = None, on_stats: Callable[[GenerationStats], None] | None = None,
                  sync_every: int | None = None) -> str:
    """Loads a model (default: the embedded one) and continues `prompt`; returns the new text.

    on_text: called with each new piece of text as it is generated (streaming).
    on_stats: called once at the end with the call's `GenerationStats` (compile time, time to the first token,
      decode tokens/s; the CLI's `--stats`). It streams the tokens to time the first one, as `on_text` does.
    sync_every: see `generate` (the CLI's `--sync-every`): on_text gets the text of that many tokens at a time.
    cache_dtype: see `generate` (jnp.int8: int8 KV cache, the CLI's `--kv-int8`).
    int8_prefill: a quantized model on a Hopper GPU also holds its weights as int8 for the prompt's GEMMs
      (`model.int8_prefill`, the CLI's `--int8-prefill`): one more byte a weight for a shorter time to the
      first token. Raises ValueError for a float model or where the Hopper prefill GEMM does not run.
    prefill_model_path / switch_after: a second checkpoint of the same model (e.g. W8A8 beside W4.4A8) that runs
      the prompt and the first `switch_after` decoded tokens (`generate(prefill_params=...)`).
    tensor_parallel: local devices the model is split over (`mixjax.shard_model`; None: all). With more than
      one, the text arrives in one piece at the end (no streaming).
    prefill_scales: the prompt's int8 activation scales in a quantized model's prefill GEMMs
      (`pallas_kernels.mgpu.PREFILL_ACT_SCALE`, the CLI's `--prefill-scales`): "group" (MixLLM's), "token" or
      "selective" (one scale a row in o_proj and gate/up); None keeps the module's setting. Decoding keeps
      per-group scales. Programs are compiled anew for the call (`mgpu.prefill_act_scale`).
    """
    import convert
    from mixjax import assets
    from mixjax.parallel import MODEL_AXIS, check_tensor_parallel, mesh_or_none, shard_model

    SamplingConfig(float(temperature), int(top_k), float(top_p))  # validates before any loading
    _sync_every(sync_every)
    if prefill_scales is not None:
        from pallas_kernels import mgpu

        if prefill_scales not in mgpu.PREFILL_ACT_SCALES:
            raise ValueError(f"--prefill-scales {prefill_scales!r}; expected one of {mgpu.PREFILL_ACT_SCALES}")
    mesh = mesh_or_none(tensor_parallel, MODEL_AXIS)
    if mesh is not None and int8_prefill:
        raise ValueError("--int8-prefill is not built for a model split over several devices: drop one of them")
    if prefill_model_path is None and switch_after:
        raise ValueError(f"--switch-after {switch_after} needs --prefill-model, the model that runs those tokens")
    if prefill_model_path is not None and int8_prefill:
        raise ValueError("--int8-prefill and --prefill-model both choose the weights the prompt runs on: pick one")
    path = assets.resolve_model_path(model_path)
    first_path = None if prefill_model_path is None else assets.resolve_model_path(prefill_model_path)
    tokenizer = convert.load_tokenizer(path)
    ids = encode_prompt(tokenizer, prompt, chat=chat)
    cfg, params = convert.load(path, dtype=dtype)
    if mesh is not None:
        check_tensor_parallel(cfg, mesh.size)
    # q/k/v and gate/up as one matmul each: fewer decode launches (shard_model fuses each device's own); one
    # sequence keeps the stored row-major codes, which its one-row GEMV reads 2.5 % faster than the tiled order
    # batched decoding wants (`model.TILED_CODES`; H100, session 38)
    place = functools.partial(model.fuse_projections, tile=False) if mesh is None else \
        (lambda p: shard_model(p, cfg, mesh))
    params = place(params)
    prefill_params = None
    if first_path is not None:
        first_cfg, prefill_params = convert.load(first_path, dtype=dtype)
        if first_cfg != cfg:
            raise ValueError(f"--prefill-model {first_path} is another model than --model {path} (their configs "
                             "differ): quantize the same float model twice, e.g. --bits 8 and --bits 4.4")
        prefill_params = place(prefill_params)
    if int8_prefill:
        _check_int8_prefill(params, implementation)
        params = model.int8_prefill(params)
    scales = contextlib.nullcontext()
    if prefill_scales is not None:
        from pallas_kernels import mgpu

        _check_prefill_scales(params, implementation, prefill_scales)
        scales = mgpu.prefill_act_scale(prefill_scales)
    _pad_prompts([ids], cfg, max_new_tokens)  # context check before compiling
    eos = set(cfg.eos_token_ids)
    if getattr(tokenizer, "eos_token_id", None) is not None:
        eos.add(int(tokenizer.eos_token_id))
    stream = TextStream(tokenizer, on_text) if on_text is not None and mesh is None else None
    watch = _Stopwatch(stream)
    on_token = watch if on_stats is not None and mesh is None else stream
    with scales, watch:
        (new,) = generate(params, cfg, [ids], max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                          top_p=top_p, eos_token_ids=sorted(eos), seed=seed, implementation=implementation,
                          on_token=on_token, sync_every=sync_every, cache_dtype=cache_dtype,
                          prefill_params=prefill_params, switch_after=switch_after, mesh=mesh)
    text = tokenizer.decode(new, skip_special_tokens=True)
    if stream is not None:
        stream.flush()
    elif on_text is not None:
        on_text(text)
    if on_stats is not None:
        on_stats(watch.stats(len(ids), len(new), streamed=on_token is watch))
    return text


def _check_quantized(params, what: str) -> None:
    """A ValueError unless some decoder linear is a `MixedWeight` (the kernels' format)."""
    from pallas_kernels import MixedWeight

    if not any(isinstance(leaf, MixedWeight) for leaf in
               jax.tree.leaves(params["layers"], is_leaf=lambda x: isinstance(x, MixedWeight))):
        raise ValueError(f"{what} needs a quantized model (`mixjax convert SRC OUT --bits 4.4`); this one has "
                         "float linears")


def _check_prefill_scales(params, implementation: Implementation, mode: str) -> None:
    """Per-token prompt scales are an option of the Hopper prefill GEMM: elsewhere every prompt keeps MixLLM's
    per-group scales, so "token" or "selective" would change nothing, and is refused rather than ignored."""
    from pallas_kernels.api import has_wgmma

    _check_quantized(params, "prefill_scales (--prefill-scales)")
    if mode != "group" and (implementation == "xla" or not has_wgmma()):
        where = "implementation='xla'" if implementation == "xla" else f"a {jax.devices()[0].platform} device"
        raise ValueError(f"prefill_scales={mode!r} (--prefill-scales) sets the activation scales of a Hopper GPU's (sm_90) "
                         f"prefill GEMM; with {where} prompts keep MixLLM's per-group scales and the option would "
                         "change nothing: drop it (their accuracy on any device: `mixjax ablate prompt-scales`)")


def _check_int8_prefill(params, implementation: Implementation) -> None:
    """The int8 prefill matrices help only a quantized model whose prompts run the Hopper wgmma GEMM."""
    from pallas_kernels.api import has_wgmma

    _check_quantized(params, "int8_prefill (--int8-prefill)")
    if implementation == "xla" or not has_wgmma():
        where = "implementation='xla'" if implementation == "xla" else f"a {jax.devices()[0].platform} device"
        raise ValueError(f"int8_prefill (--int8-prefill) speeds up the prefill GEMM of a Hopper GPU (sm_90); with "
                         f"{where} it would only hold a second copy of the weights: drop the option")
