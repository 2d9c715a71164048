"""Saving and loading quantized params through `convert.save_checkpoint` / `convert.restore_checkpoint`.

A quantized checkpoint is an ordinary mixjax checkpoint (Orbax params + mixjax.json) whose
`extra["quantization"]` records what is needed to rebuild the abstract tree for restoring:

    {"config": QuantConfig as a dict, "dtype": float dtype of the unquantized leaves,
     "n8": {linear name: [8-bit channel count of each layer]}, "a_groups": {linear name: G or 0},
     "linear_form": "mixed" | "static_mixed" | "fake_quant",
     "head_n8": {"embed_tokens": 0 or V, "lm_head": 0 or V}}   # head_n8 only when config.head_bits is set

`MixedWeight` array shapes follow from (N, K, n8) and the format's alignment. A `MixedWeight` is stored as its
seven arrays (`_StoredMixedWeight`), whatever runtime-only fields it holds (the int8 prefill matrix is never
written), so the stored tree is the same for checkpoints of every version; a `StaticMixedWeight` (static
activation scales on the kernels) holds one and its [G] calibrated maxima; `FakeQuantWeight`s hold
a float [N, K] weight and, for static activation scales, a [G] calibrated max. "linear_form" names which of the
three the decoder linears are; checkpoints written before it existed (session 30) hold `FakeQuantWeight`s for
every static or non-kernel configuration and `MixedWeight`s otherwise. A quantized embedding table /
LM head is one more `MixedWeight` of shape (V, D) ("lm_head" absent when tied). Checkpoints written before
head_bits existed have no such key in their config and load with float heads (head_bits=None).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import jax
import jax.numpy as jnp

from mixjax import model
from mixjax.config import LlamaConfig
from mixjax.quant.activations import ActFormat
from mixjax.quant.api import HEAD_NAMES, QuantConfig
from mixjax.quant.fakequant import FakeQuantWeight
from mixjax.quant.rtn import WeightFormat
from mixjax.quant.salience import linear_weight, with_weights


def config_to_dict(config: QuantConfig) -> dict:
    return dataclasses.asdict(config)


def config_from_dict(d: dict) -> QuantConfig:
    d = dict(d)
    d["weight"] = WeightFormat(**d["weight"])
    d["act"] = ActFormat(**d["act"])
    return QuantConfig(**d)


def quantization_metadata(qparams, config: QuantConfig) -> dict:
    """The `extra["quantization"]` record of quantized params (layers: a tuple of dicts)."""
    layers = qparams["layers"]
    n8, a_groups = {}, {}
    for name in model.LINEAR_NAMES:
        ws = [linear_weight(layer, name) for layer in layers]
        n8[name] = [int(getattr(w, "n8", 0)) for w in ws]
        absmax = getattr(ws[0], "a_absmax", None)
        a_groups[name] = 0 if absmax is None else int(absmax.shape[0])
    meta = {"config": config_to_dict(config), "dtype": str(jnp.dtype(qparams["norm"].dtype)), "n8": n8,
            "a_groups": a_groups, "linear_form": _linear_form(linear_weight(layers[0], model.LINEAR_NAMES[0]))}
    if config.head_bits is not None:
        meta["head_n8"] = {name: int(qparams[name].n8) for name in HEAD_NAMES if name in qparams}
    return meta


def _linear_form(w) -> str:
    from pallas_kernels import MixedWeight, StaticMixedWeight

    for form, kind in (("mixed", MixedWeight), ("static_mixed", StaticMixedWeight), ("fake_quant", FakeQuantWeight)):
        if isinstance(w, kind):
            return form
    raise TypeError(f"save_quantized: a decoder linear is a {type(w).__name__}; expected MixedWeight, "
                    "StaticMixedWeight or FakeQuantWeight (the output of mixjax.quantize)")


def stored_linear_form(q: dict) -> str:
    """The decoder linears' form a checkpoint's `extra["quantization"]` records (see the module docstring)."""
    form = q.get("linear_form")
    if form is None:  # written before session 30: static scales were simulated
        config = config_from_dict(q["config"])
        return "mixed" if config.kernel_compatible and not config.act.static else "fake_quant"
    if form not in ("mixed", "static_mixed", "fake_quant"):
        raise ValueError(f"quantized checkpoint: unknown linear_form {form!r}; it was written by a newer mixjax "
                         "(upgrade mixjax)")
    return form


def save_quantized(directory: str | os.PathLike, qparams, cfg: LlamaConfig, *, config: QuantConfig,
                   files=None, force: bool = False, extra: dict | None = None) -> Path:
    """Writes quantized params + cfg + quantization metadata atomically (see `convert.save_checkpoint`)."""
    import convert

    meta = {"quantization": quantization_metadata(qparams, config), **(extra or {})}
    # Orbax cannot store zero-size arrays (e.g. the 8-bit part of an all-4-bit linear): store None there.
    stored = jax.tree.map(lambda a: None if a.size == 0 else a, _to_stored(qparams))
    return convert.save_checkpoint(directory, stored, cfg, extra_metadata=meta, files=files, force=force)


@dataclasses.dataclass(frozen=True)
class _StoredMixedWeight:
    """A `MixedWeight` as checkpoints hold it: its seven arrays under their names, without the runtime-only
    int8 prefill matrix, so that the stored tree is the one every mixjax version wrote and reads."""

    q8: object
    scale8: object
    q4: object
    scale4: object
    zero4: object
    channel: object
    row_of_channel: object
    n: int
    k: int
    n8: int


_STORED_ARRAYS = ["q8", "scale8", "q4", "scale4", "zero4", "channel", "row_of_channel"]
jax.tree_util.register_dataclass(_StoredMixedWeight, data_fields=_STORED_ARRAYS, meta_fields=["n", "k", "n8"])


def _recast(tree, src: type, dst: type):
    """Every `src` node of tree (MixedWeight or _StoredMixedWeight) as a `dst` with the same seven arrays."""
    def convert(x):
        if not isinstance(x, src):
            return x
        if getattr(x, "tiled", False):  # runtime (tile, group) order of the codes → the stored row-major one
            x = x.untiled()
        return dst(*(getattr(x, f) for f in _STORED_ARRAYS), n=x.n, k=x.k, n8=x.n8)

    return jax.tree.map(convert, tree, is_leaf=lambda x: isinstance(x, src))


def _to_stored(tree):
    from pallas_kernels import MixedWeight

    return _recast(tree, MixedWeight, _StoredMixedWeight)


def _from_stored(tree):
    from pallas_kernels import MixedWeight

    return _recast(tree, _StoredMixedWeight, MixedWeight)


def is_quantized_checkpoint(directory: str | os.PathLike) -> bool:
    from convert import orbax_io

    p = Path(directory)
    return p.is_dir() and orbax_io.is_checkpoint(p) and "quantization" in orbax_io.read_metadata(p).get("extra", {})


def load_quantized(directory: str | os.PathLike) -> tuple[LlamaConfig, dict, QuantConfig]:
    """Reads a checkpoint written by `save_quantized` → (cfg, qparams, QuantConfig)."""
    import convert
    from convert import orbax_io

    meta = orbax_io.read_metadata(Path(directory).expanduser())
    q = meta.get("extra", {}).get("quantization")
    if q is None:
        raise ValueError(f"{directory}: not a quantized mixjax checkpoint (no extra.quantization in mixjax.json)")
    cfg = LlamaConfig.from_dict(meta["config"])
    config = config_from_dict(q["config"])
    abstract = _to_stored(abstract_quantized_params(cfg, config, q["dtype"], q["n8"], q["a_groups"], q.get("head_n8"),
                                                    form=stored_linear_form(q)))
    stored = jax.tree.map(lambda s: None if s.size == 0 else s, abstract)
    _, qparams = convert.restore_checkpoint(directory, abstract_params=stored)
    return cfg, _from_stored(_refill_empty(qparams, abstract)), config


def _refill_empty(tree, abstract):
    """Puts back the zero-size arrays that were stored as None."""
    is_none = lambda x: x is None  # noqa: E731
    leaves, treedef = jax.tree.flatten(tree, is_leaf=is_none)
    full = jax.tree.leaves(abstract, is_leaf=is_none)
    if len(leaves) != len(full):
        raise ValueError("quantized checkpoint does not match its metadata; re-create it")
    filled = [jnp.zeros(a.shape, a.dtype) if (x is None and a is not None) else x for x, a in zip(leaves, full)]
    return jax.tree.unflatten(treedef, filled)


def abstract_quantized_params(cfg: LlamaConfig, config: QuantConfig, dtype: str, n8: dict, a_groups: dict,
                              head_n8: dict | None = None, *, form: str | None = None):
    """The tree of ShapeDtypeStructs (MixedWeight/StaticMixedWeight/FakeQuantWeight leaves included) of quantized
    params; form: the decoder linears' (`stored_linear_form`; None: what `quantize` makes of `config` today)."""
    from convert.orbax_io import abstract_float_params
    from pallas_kernels import StaticMixedWeight

    if form is None:
        form = "fake_quant" if not config.kernel_compatible else "static_mixed" if config.act.static else "mixed"

    tree = abstract_float_params(cfg, dtype, "tuple")
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    sds = lambda shape, dt: jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dt), sharding=sharding)  # noqa: E731
    layers = []
    for i, layer in enumerate(tree["layers"]):
        new = {}
        for name in model.LINEAR_NAMES:
            n, k = linear_weight(layer, name).shape
            if form == "mixed":
                new[name] = _abstract_mixed(n, k, n8[name][i], sds)
            elif form == "static_mixed":
                new[name] = StaticMixedWeight(_abstract_mixed(n, k, n8[name][i], sds),
                                              sds((a_groups[name],), "float32"))
            else:
                g = a_groups.get(name, 0)
                new[name] = FakeQuantWeight(w=sds((n, k), dtype), a_absmax=sds((g,), "float32") if g else None,
                                            act=config.act)
        layers.append(with_weights(layer, new))
    heads = {}
    if config.head_bits is not None:
        if head_n8 is None:
            raise ValueError("quantized checkpoint: config.head_bits is set but head_n8 is missing; re-create it")
        heads = {name: _abstract_mixed(*tree[name].shape, int(n), sds) for name, n in head_n8.items()}
    return {**tree, "layers": tuple(layers), **heads}


def _abstract_mixed(n: int, k: int, n8: int, sds):
    from pallas_kernels.format import GROUP_SIZE, ROW_ALIGN, MixedWeight

    up = lambda v, m: -(-v // m) * m  # noqa: E731
    kp, n8p, n4p = up(k, GROUP_SIZE), up(n8, ROW_ALIGN), up(n - n8, ROW_ALIGN)
    g = kp // GROUP_SIZE
    return MixedWeight(
        q8=sds((n8p, kp), "int8"), scale8=sds((g, n8p), "float32"), q4=sds((n4p, kp // 2), "int8"),
        scale4=sds((g, n4p), "float32"), zero4=sds((g, n4p), "int8"), channel=sds((n8p + n4p,), "int32"),
        row_of_channel=sds((n,), "int32"), n=n, k=k, n8=n8,
    )
