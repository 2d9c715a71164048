"""Several devices: data parallelism (calibration, evaluation, generation) and tensor parallelism (inference).

Data parallel (`data_mesh`, one axis named "data"): a batch of token ids [B, T] is split along B and the params
are replicated. The jitted calibration passes are the same programs as on one device: per-sample terms come back
sharded along B, and sums over tokens (a layer's H = 2·XᵀX) are all-reduced by XLA; GPTQ splits each linear's
rows (`shard_rows`). Evaluation and generation run the model per device inside `shard_map`. A batch the device
count does not divide is padded with copies of its first sample, which `shard_samples`' mask keeps out of every
sum.

Tensor parallel (`model_mesh`, one axis named "model"; `shard_model`): each device holds its heads and MLP
features of every decoder layer, o_proj and down_proj split along K behind `RowParallel`'s psum.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"
MODEL_AXIS = "model"


def data_mesh(devices: int | Sequence[jax.Device] | None = None) -> Mesh:
    """A one-axis mesh named "data": all local devices (None), the first `devices` of them, or the given list."""
    local = jax.local_devices()
    if devices is None:
        chosen = local
    elif isinstance(devices, int):
        if not 1 <= devices <= len(local):
            raise ValueError(f"asked for {devices} devices, but this process sees {len(local)} local device(s) "
                             f"({local[0].platform}); ask for 1..{len(local)}")
        chosen = local[:devices]
    else:
        chosen = list(devices)
        if not chosen:
            raise ValueError("devices=[] names no device; pass None for all local devices")
    return Mesh(np.array(chosen), (DATA_AXIS,))


def parse_devices(text: str, *, option: str = "--devices") -> int | None:
    """A command line's --devices: "all" → None (every local device), else a positive integer."""
    if text == "all":
        return None
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"{option} {text!r} must be 'all' or a positive integer (local devices to split over)")
    return n


def mesh_or_none(devices: int | None, axis: str = DATA_AXIS) -> Mesh | None:
    """A one-axis mesh named `axis` over `devices` (see `data_mesh`), or None where that is one device (the plain
    single-device path)."""
    mesh = data_mesh(devices)
    return Mesh(mesh.devices, (axis,)) if mesh.size > 1 else None


def check_mesh(mesh: Mesh | None, *, tensor_parallel: bool = False) -> None:
    """mesh: None, a one-axis "data" mesh, or (where `tensor_parallel`) a one-axis "model" mesh."""
    if mesh is None:
        return
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh is {type(mesh).__name__}; pass a jax.sharding.Mesh (mixjax.data_mesh() makes one)")
    allowed = ((DATA_AXIS,), (MODEL_AXIS,)) if tensor_parallel else ((DATA_AXIS,),)
    if mesh.axis_names not in allowed:
        raise ValueError(f"mesh has axes {mesh.axis_names}; this pass takes a one-axis mesh named "
                         + " or ".join(repr(a[0]) for a in allowed)
                         + " (mixjax.data_mesh(devices) splits samples"
                         + (", mixjax.model_mesh(devices) with shard_model splits the model)" if tensor_parallel
                            else ")"))


def replicate(tree: Any, mesh: Mesh | None) -> Any:
    """Every array of `tree` on every device of `mesh` (unchanged for mesh=None)."""
    if mesh is None:
        return tree
    return jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))


def weight_sharding(shape: Sequence[int], mesh: Mesh, *, layer_axis: bool) -> NamedSharding:
    """Where `shard_weights` puts one float leaf: a matrix split over the "data" axis along its last dimension
    (a stacked decoder matrix [L, N, K]) or its first (the embedding and LM head [V, D]: their rows), or the
    other matrix dimension where the device count does not divide that one; vectors (norms), and matrices
    neither of whose dimensions it divides, replicated. `layer_axis`: the leading dimension counts layers."""
    lead = 1 if layer_axis else 0
    dims = list(range(lead, len(shape)))
    spec = [None] * len(shape)
    if len(dims) >= 2:
        order = dims[::-1] if layer_axis else dims
        axis = next((d for d in order if shape[d] % mesh.size == 0), None)
        if axis is not None:
            spec[axis] = DATA_AXIS
    return NamedSharding(mesh, PartitionSpec(*spec))


def shard_weights(params: dict, mesh: Mesh | None) -> dict:
    """Float params with their weights split over a "data" mesh, FSDP-style: each device holds 1/N of every
    decoder matrix (and of the embedding and LM head), and XLA gathers one layer at a time inside the salience
    pass's `lax.scan`, so no device ever holds the whole model. For models one device cannot hold in float:
    `quantize(params, ..., mesh=mesh)` and `salience(...)` keep this placement (the calibration samples are split
    over the same devices), and the layer-by-layer passes gather one layer at a time. Slower than replicated
    params (each batch gathers every layer's weights again); `convert.load(path, mesh=mesh)` places them so
    from the host, never whole on one device. Unchanged for mesh=None."""
    if mesh is None:
        return params
    return jax.device_put(params, weight_shardings(params, mesh))


def weight_shardings(params: Any, mesh: Mesh) -> Any:
    """`shard_weights`' placement of every leaf of float params (arrays or `jax.ShapeDtypeStruct`s: a checkpoint
    can be restored straight into it), as a tree of `NamedSharding`s."""
    if mesh is None:
        raise ValueError("weight_shardings needs a mesh (mixjax.data_mesh(devices))")
    check_mesh(mesh)
    if not all(jnp.issubdtype(a.dtype, jnp.floating) for a in jax.tree.leaves(params)):
        raise ValueError("shard_weights takes float params (as convert.load gives them); quantized params are "
                         "small enough to replicate, or split them for inference with mixjax.shard_model")

    def place(tree, layer_axis):
        return jax.tree.map(lambda a: weight_sharding(a.shape, mesh, layer_axis=layer_axis), tree)

    layers = params["layers"]
    layers = tuple(place(layer, False) for layer in layers) if isinstance(layers, (tuple, list)) else place(layers, True)
    return {**place({k: v for k, v in params.items() if k != "layers"}, False), "layers": layers}


def has_split_weights(params: Any, mesh: Mesh | None) -> bool:
    """Whether `params` are float params with some leaf split over `mesh` (placed by `shard_weights`) rather than
    replicated. Quantized params (integer codes among their leaves) never count: their kernels run per device."""
    leaves = jax.tree.leaves(params)
    if mesh is None or not all(jnp.issubdtype(a.dtype, jnp.floating) for a in leaves):
        return False
    return any(_on_mesh(a, mesh) and not a.sharding.is_fully_replicated for a in leaves)


def _on_mesh(a, mesh: Mesh) -> bool:
    return isinstance(getattr(a, "sharding", None), NamedSharding) and a.sharding.mesh == mesh


def keep_or_replicate(tree: Any, mesh: Mesh | None) -> Any:
    """Leaves already placed on `mesh` (by `shard_weights`, or replicated) stay where they are; the others are
    replicated on it. Unchanged for mesh=None."""
    if mesh is None:
        return tree
    replicated = NamedSharding(mesh, PartitionSpec())

    return jax.tree.map(lambda a: a if _on_mesh(a, mesh) else jax.device_put(a, replicated), tree)


def shard_rows(x: jax.Array, mesh: Mesh | None) -> tuple[jax.Array, int]:
    """(x with its leading axis, a weight's output channels, split over the mesh, that axis's length).

    A length the device count does not divide is padded with copies of row 0; slice results to [:n].
    Unchanged for mesh=None.
    """
    n = x.shape[0]
    if mesh is None:
        return x, n
    pad = -n % mesh.size
    if pad:
        x = jnp.concatenate([x, jnp.repeat(x[:1], pad, axis=0)])
    return jax.device_put(x, NamedSharding(mesh, PartitionSpec(DATA_AXIS))), n


def shard_samples(tokens: np.ndarray, mesh: Mesh | None) -> tuple[jax.Array, jax.Array | None, int]:
    """int [B, T] → (tokens [Bp, T] split along Bp over the mesh, sample_mask f32 [Bp] or None, B).

    Bp is B rounded up to a multiple of the device count; the padding repeats sample 0 with mask 0.
    With mesh=None: (tokens on the default device, None, B).
    """
    b = tokens.shape[0]
    if mesh is None:
        return jnp.asarray(tokens, jnp.int32), None, b
    n = mesh.size
    pad = -b % n
    if pad:
        tokens = np.concatenate([tokens, np.repeat(tokens[:1], pad, axis=0)])
    mask = np.concatenate([np.ones(b, np.float32), np.zeros(pad, np.float32)])
    rows = NamedSharding(mesh, PartitionSpec(DATA_AXIS))
    return jax.device_put(np.asarray(tokens, np.int32), rows), jax.device_put(mask, rows), b


# ----------------------------------------------------------------------------------------------------
# Tensor parallelism (inference): each device holds a slice of every decoder linear


def model_mesh(devices: int | Sequence[jax.Device] | None = None) -> Mesh:
    """A one-axis mesh named "model" (tensor parallelism, `shard_model`): like `data_mesh` otherwise."""
    return Mesh(data_mesh(devices).devices, (MODEL_AXIS,))


@functools.partial(jax.tree_util.register_dataclass, data_fields=["w"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class RowParallel:
    """One device's slice of a linear split along its input features K (o_proj, down_proj under `shard_model`):
    each device multiplies its slice of the input, and the partial outputs are summed over the "model" axis in
    f32. Use inside `shard_map` over a `model_mesh` only."""

    w: Any  # [N, K / devices]: a float array or a QuantizedLinear

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.w.shape)

    def matmul(self, x: jax.Array, *, implementation: str = "auto") -> jax.Array:
        from mixjax.linear import QuantizedLinear
        from pallas_kernels.format import MixedWeight
        from pallas_kernels.static import StaticMixedWeight

        if isinstance(self.w, (MixedWeight, StaticMixedWeight)):
            part = jnp.sum(self.w.matmul(x, implementation=implementation, partials=True), axis=0)  # f32 [..., N]
        elif isinstance(self.w, QuantizedLinear):
            part = self.w.matmul(x, implementation=implementation).astype(jnp.float32)
        else:
            part = jnp.einsum("...k,nk->...n", x, self.w.astype(x.dtype), preferred_element_type=jnp.float32)
        return jax.lax.psum(part, MODEL_AXIS).astype(x.dtype)


COLUMN_SPLIT = (("self_attn", "q_proj"), ("self_attn", "k_proj"), ("self_attn", "v_proj"), ("mlp", "gate_proj"),
                ("mlp", "up_proj"))  # split along N: heads, and the MLP's hidden features
ROW_SPLIT = (("self_attn", "o_proj"), ("mlp", "down_proj"))  # split along K, outputs psum'd


def local_config(cfg, parts: int):
    """The config one device runs under `shard_model`: its heads, KV heads and MLP features."""
    return dataclasses.replace(cfg, num_attention_heads=cfg.num_attention_heads // parts,
                               num_key_value_heads=cfg.num_key_value_heads // parts,
                               intermediate_size=cfg.intermediate_size // parts)


def check_tensor_parallel(cfg, parts: int) -> None:
    """Raises ValueError naming the dimension `parts` devices cannot split."""
    for name in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
        if getattr(cfg, name) % parts:
            raise ValueError(f"{parts} devices cannot split {name}={getattr(cfg, name)} evenly: use a device count "
                             f"that divides it (tensor parallelism splits heads, KV heads and MLP features)")


def shard_model(params: dict, cfg, mesh: Mesh, *, fuse: bool = True) -> dict:
    """Float or quantized params (q/k/v and gate/up unfused, as loaded) → tensor-parallel params on `mesh`.

    q/k/v and gate/up are split along N by heads and MLP features, o_proj and down_proj along K (wrapped in
    `RowParallel`, their outputs psum'd); every per-layer leaf gets a leading device axis split over the mesh.
    A `MixedWeight` is cut by `pallas_kernels.shard` (equal 8-bit counts per device, exact). The embedding,
    final norm and LM head are replicated. With `fuse`, each device's q/k/v and gate/up are then fused
    (`model.fuse_projections`). Run the result through `generate`, `perplexity` or `forward_sharded` with the
    same mesh: each device runs `local_config(cfg, devices)`.
    """
    from mixjax import model
    from pallas_kernels.format import MixedWeight
    from pallas_kernels.shard import split_channels, split_groups
    from pallas_kernels.static import StaticMixedWeight

    if not isinstance(mesh, Mesh) or mesh.axis_names != (MODEL_AXIS,):
        raise ValueError(f"shard_model needs a one-axis mesh named {MODEL_AXIS!r} (mixjax.model_mesh(devices))")
    parts = mesh.size
    check_tensor_parallel(cfg, parts)
    params = model.unstack_layers(_assembled_on_host(params))

    def split(w, axis, path):
        if isinstance(w, StaticMixedWeight):  # the calibrated maxima follow the input features
            parts_q, g = split(w.qw, axis, path), w.a_absmax.shape[0] // parts
            return [StaticMixedWeight(q, w.a_absmax if axis == 0 else w.a_absmax[d * g:(d + 1) * g])
                    for d, q in enumerate(parts_q)]
        if isinstance(w, MixedWeight):
            try:
                return split_channels(w, parts) if axis == 0 else split_groups(w, parts)
            except ValueError as e:
                raise ValueError(f"{path}: {e}; a quantized model splits K only at groups of 128 "
                                 f"(try fewer devices)") from None
        if not hasattr(w, "dtype") or w.ndim != 2:
            raise ValueError(f"{path} is a {type(w).__name__}; shard_model splits float arrays, MixedWeights and "
                             "StaticMixedWeights")
        return jnp.split(w, parts, axis=axis)

    per_device = [[] for _ in range(parts)]
    for i, layer in enumerate(params["layers"]):
        for group, proj in COLUMN_SPLIT + ROW_SPLIT:
            if proj not in layer[group]:
                raise ValueError(f"layers.{i}.{group}.{proj} is missing: shard_model takes unfused params "
                                 "(shard first, it fuses each device's projections itself)")
        pieces = [{g: {p: dict(v) for p, v in sub.items()} if isinstance(sub, dict) else sub
                   for g, sub in layer.items()} for _ in range(parts)]
        for (group, proj), axis in [(gp, 0) for gp in COLUMN_SPLIT] + [(gp, 1) for gp in ROW_SPLIT]:
            entry = layer[group][proj]
            ws = split(entry["weight"], axis, f"layers.{i}.{group}.{proj}")
            bias = entry.get("bias")
            for d in range(parts):
                piece = pieces[d][group][proj]
                piece["weight"] = ws[d] if axis == 0 else RowParallel(ws[d])
                if bias is not None and axis == 0:
                    piece["bias"] = jnp.split(bias, parts)[d]
        for d in range(parts):
            per_device[d].append(pieces[d])
    if fuse:
        # (row-major codes: the tiled order, `model.TILED_CODES`, is measured on one device only)
        per_device = [list(model.fuse_projections({"layers": tuple(layers)}, tile=False)["layers"])
                      for layers in per_device]
    split_spec = NamedSharding(mesh, PartitionSpec(MODEL_AXIS))
    layers = tuple(jax.device_put(jax.tree.map(lambda *xs: jnp.stack(xs), *[per_device[d][i] for d in range(parts)]),
                                  split_spec) for i in range(len(params["layers"])))
    rest = replicate({k: v for k, v in params.items() if k != "layers"}, mesh)
    return {**rest, "layers": layers}


def _assembled_on_host(tree: Any) -> Any:
    """Leaves split over several devices (`shard_weights`' FSDP slices, `quantize(mesh=)`'s rows) as host arrays,
    each assembled from its shards without a collective; the rest unchanged. `shard_model` cuts whole arrays."""
    def gather(a):
        split = isinstance(a, jax.Array) and len(a.sharding.device_set) > 1 and not a.sharding.is_fully_replicated
        return np.asarray(a) if split else a

    return jax.tree.map(gather, tree)


def is_model_mesh(mesh: Mesh | None) -> bool:
    return mesh is not None and mesh.axis_names == (MODEL_AXIS,)


def check_params_for_mesh(params, mesh: Mesh | None, what: str = "params") -> None:
    """`shard_model`'s params go with the "model" mesh they were split over, and other params without one."""
    if params is None:
        return
    layers = params["layers"]
    first = layers[0] if isinstance(layers, (tuple, list)) and layers else None
    split = first is not None and isinstance(first.get("self_attn", {}).get("o_proj", {}).get("weight"), RowParallel)
    if is_model_mesh(mesh):
        n = jax.tree.leaves(first)[0].shape[0] if split else None
        if n != mesh.size:
            raise ValueError(f"{what} are not split over this {mesh.size}-device 'model' mesh: pass "
                             f"mixjax.shard_model({what}, cfg, mesh) with the same mesh")
    elif split:
        raise ValueError(f"{what} come from mixjax.shard_model: pass mesh= the 'model' mesh they were split over")


def param_specs(params):
    """shard_map in_specs for `shard_model`'s params (or a tuple of such, or None): layers split, the rest
    replicated."""
    if params is None:
        return PartitionSpec()
    if isinstance(params, tuple):
        return tuple(param_specs(p) for p in params)
    return {k: PartitionSpec(MODEL_AXIS) if k == "layers" else PartitionSpec() for k in params}


def local_params(params):
    """Inside shard_map: drop the leading device axis (size 1 there) of every layer leaf (tuples, None too)."""
    if params is None:
        return None
    if isinstance(params, tuple):
        return tuple(local_params(p) for p in params)
    return {**params, "layers": jax.tree.map(lambda a: a[0], params["layers"])}


def tensor_parallel_jit(fn, mesh: Mesh, n_params: int):
    """jit(shard_map(fn)) over a "model" mesh: the first `n_params` arguments are `shard_model` params (or None),
    each device getting its slice (`local_params`); the rest, and every output, are the same on every device."""
    def local(*args):
        return fn(*(local_params(a) for a in args[:n_params]), *args[n_params:])

    def call(*args):
        specs = tuple(param_specs(a) for a in args[:n_params]) + (PartitionSpec(),) * (len(args) - n_params)
        return jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=PartitionSpec(), check_vma=False)(*args)

    return jax.jit(call)
