"""Data parallelism over several devices for the calibration passes (salience, GPTQ statistics).

The calibration batch is the parallel axis. A batch of token ids [B, T] is split along B over a one-axis
`jax.sharding.Mesh` named "data"; the params are replicated on every device. The jitted passes are then the
same programs as on one device: per-sample terms come back sharded along B, and sums over tokens (a layer's
H = 2·XᵀX) are all-reduced by XLA. A batch whose size the device count does not divide is padded with
copies of its first sample, and `sample_mask` marks them, so that no pass counts them.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


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


def parse_devices(text: str) -> int | None:
    """A command line's --devices: "all" → None (every local device), else a positive integer."""
    if text == "all":
        return None
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"--devices {text!r} must be 'all' or a positive integer (local devices to split over)")
    return n


def mesh_or_none(devices: int | None) -> Mesh | None:
    """`data_mesh(devices)`, or None where that is one device (the plain single-device path)."""
    mesh = data_mesh(devices)
    return mesh if mesh.size > 1 else None


def check_mesh(mesh: Mesh | None) -> None:
    if mesh is None:
        return
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh is {type(mesh).__name__}; pass a jax.sharding.Mesh (mixjax.data_mesh() makes one)")
    if mesh.axis_names != (DATA_AXIS,):
        raise ValueError(f"mesh has axes {mesh.axis_names}; the calibration passes split samples over one axis "
                         f"named {DATA_AXIS!r} (mixjax.data_mesh(devices) makes one)")


def replicate(tree: Any, mesh: Mesh | None) -> Any:
    """Every array of `tree` on every device of `mesh` (unchanged for mesh=None)."""
    if mesh is None:
        return tree
    return jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))


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
