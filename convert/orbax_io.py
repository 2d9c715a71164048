"""mixjax checkpoints: params (Orbax) + config and metadata (JSON), written atomically.

Layout of a checkpoint directory:

    mixjax.json   {"format_version": 1, "config": LlamaConfig fields, "dtype": ..., "layers": "stacked" |
                   "tuple", "params_sha256": digest of every array, "extra": caller metadata}
    params/       the params pytree, saved by `orbax.checkpoint.StandardCheckpointer`
    tokenizer/    optional extra files (e.g. a tokenizer's save_pretrained output)

Everything is written into a temporary directory beside the target and renamed into place at the end, so
a failed save leaves nothing behind and an existing checkpoint is replaced only with `force=True`.

Orbax's container files hold temporary paths and random ids, so two saves of the same params differ in
bytes; `params_sha256` (paths, dtypes, shapes and bytes of every leaf in tree order) is what makes a
checkpoint reproducible and checkable: a re-run writes the same digest, and a restore that reads back
different bytes (a damaged file) is refused.

Float params restore against an abstract tree derived from the config. Trees with other leaves (the
quantized checkpoint's `MixedWeight`s) pass `abstract_params` — a tree of `jax.ShapeDtypeStruct`s in the
same pytree structure — to `restore_checkpoint`, and record what they need to rebuild it in `extra`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from convert.layout import ConvertError
from mixjax.config import LlamaConfig
from mixjax.model import param_shapes

FORMAT_VERSION = 1
METADATA_FILE = "mixjax.json"
PARAMS_DIR = "params"


def params_digest(params) -> str:
    """sha256 over the key path, dtype, shape and bytes of every array leaf, in tree order."""
    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        a = np.asarray(leaf)
        h.update(f"{jax.tree_util.keystr(path)}|{a.dtype}|{a.shape}|".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def is_checkpoint(directory: Path) -> bool:
    return (Path(directory) / METADATA_FILE).is_file()


def read_metadata(directory: str | os.PathLike) -> dict[str, Any]:
    """The parsed mixjax.json of a checkpoint; checks its format_version."""
    path = Path(directory) / METADATA_FILE
    if not path.is_file():
        raise ConvertError(f"{directory}: not a mixjax checkpoint (no {METADATA_FILE})")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConvertError(f"{path}: corrupt metadata ({e}); re-create the checkpoint") from None
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise ConvertError(
            f"{path}: format_version={version!r}, this mixjax reads format_version={FORMAT_VERSION}; "
            "re-create the checkpoint with this version"
        )
    return meta


def _float_dtype(params, cfg: LlamaConfig) -> str | None:
    """The dtype of float params laid out as `cfg` implies (stacked or tuple layers); None for any other
    tree (e.g. quantized weights), which then needs `abstract_params` to restore."""
    layers = "tuple" if isinstance(params.get("layers"), (tuple, list)) else "stacked"
    expected = abstract_float_params(cfg, jnp.float32, layers)
    if jax.tree.structure(params) != jax.tree.structure(expected):
        return None
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    for (path, leaf), want in zip(flat, jax.tree.leaves(expected)):
        if tuple(leaf.shape) != want.shape:
            raise ConvertError(
                f"params{jax.tree_util.keystr(path)} has shape {tuple(leaf.shape)} but the config implies "
                f"{want.shape}; save the cfg the params were built with"
            )
    dtypes = {str(leaf.dtype) for _, leaf in flat}
    if len(dtypes) != 1 or not jnp.issubdtype(jnp.dtype(dtypes.copy().pop()), jnp.floating):
        raise ConvertError(f"float params mix dtypes {sorted(dtypes)}; cast them to one float dtype before saving")
    return dtypes.pop()


def save_checkpoint(
    directory: str | os.PathLike,
    params,
    cfg: LlamaConfig,
    *,
    extra_metadata: Mapping[str, Any] | None = None,
    files: Mapping[str, str | os.PathLike] | None = None,
    force: bool = False,
) -> Path:
    """Saves params + cfg to `directory` atomically and returns its path.

    extra_metadata: JSON-serializable, stored under "extra" (quantization config, provenance...).
    files: {relative name: source path} copied into the checkpoint (a file, or a directory copied whole),
    e.g. {"tokenizer": dir_with_tokenizer_files}.
    force: replace an existing directory; without it an existing target is an error.
    """
    target = Path(directory).expanduser().absolute()
    if target.exists() and not force:
        raise FileExistsError(f"{target} already exists; pass force=True (--force) to overwrite it")
    dtype = _float_dtype(params, cfg)
    layers = "tuple" if isinstance(params.get("layers"), (tuple, list)) else "stacked"
    meta = {"format_version": FORMAT_VERSION, "config": cfg.to_dict(), "dtype": dtype, "layers": layers,
            "params_sha256": params_digest(params), "extra": dict(extra_metadata or {})}
    try:
        meta_text = json.dumps(meta, indent=2)
    except TypeError as e:
        raise ConvertError(f"extra_metadata is not JSON-serializable ({e})") from None
    sources = {name: Path(src) for name, src in (files or {}).items()}
    missing = [str(p) for p in sources.values() if not p.exists()]
    if missing:
        raise FileNotFoundError(f"files to store in the checkpoint do not exist: {missing}")

    tmp = temp_dir_beside(target)
    try:
        _write(tmp, params, meta_text, sources)
        _replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return target


def _write(tmp: Path, params, meta_text: str, sources: Mapping[str, Path]) -> None:
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(tmp / PARAMS_DIR, params)
        checkpointer.wait_until_finished()
    for name, src in sources.items():
        dst = tmp / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst)
        else:
            shutil.copy2(src, dst)
    (tmp / METADATA_FILE).write_text(meta_text)  # last: its presence marks a complete checkpoint


def temp_dir_beside(target: Path) -> Path:
    """A new hidden directory next to `target` for a write that `_replace` moves into place. It gets the
    permissions any new directory gets (mkdtemp's are owner-only, which would follow the checkpoint)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)
    return tmp


def _replace(tmp: Path, target: Path) -> None:
    if not target.exists():
        os.rename(tmp, target)
        return
    old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
    os.rename(target, old)
    os.rename(tmp, target)
    shutil.rmtree(old) if old.is_dir() else old.unlink()


def _is_straggler(exc: BaseException | None, tb=None, obj=None) -> bool:
    """An error of orbax's reads that outlived a failed restore: a TensorStore callback scheduling onto the event loop
    orbax has closed (RuntimeError("Event loop is closed") from asyncio's `call_soon_threadsafe`), or one of its read
    coroutines closed unfinished, whose handler re-raises the read error ("Encountered error while reading array
    index", printing the whole TensorStore spec)."""
    if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
        tb = tb or exc.__traceback__
        while tb is not None:  # only asyncio's refusal to schedule a callback, not a program's own closed loop
            if tb.tb_frame.f_code.co_name == "call_soon_threadsafe":
                return True
            tb = tb.tb_next
        return False
    code = getattr(obj, "cr_code", None)
    return code is not None and "orbax" in code.co_filename and str(exc).startswith("Encountered error while reading")


class _StragglerLogFilter(logging.Filter):
    """Drops asyncio's report of an orbax read (a task or a TensorStore future) whose error nobody retrieved after a
    failed restore (`_quiet_orbax_stragglers`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        if " exception was never retrieved" not in message.split("\n", 1)[0]:  # Task, Future, _GatheringFuture …
            return True
        exc = record.exc_info[1] if record.exc_info else None
        orbax_read = str(exc).startswith("Encountered error while reading")  # orbax's wrapper of a failed read
        tensorstore_read = isinstance(exc, ValueError) and "Error reading" in str(exc) and "OCDBT" in str(exc)
        return not (orbax_read or tensorstore_read)


def _quiet_orbax_stragglers() -> None:
    """After a failed restore, orbax's other reads still finish on TensorStore's threads: their callbacks schedule
    onto the event loop orbax has already closed (printed through `sys.excepthook` by the binding, or through
    `sys.unraisablehook`), and its unfinished read coroutines, closed when collected, re-raise their read errors:
    tens to hundreds of tracebacks after the one error that matters. Drops exactly those, from then on; installed
    before a restore, since the first may come while orbax is still raising."""
    def quiet(hook, straggler):  # `hook` for everything but the stragglers
        def filtered(*args):
            if not straggler(*args):
                hook(*args)

        filtered.mixjax_quiet = True
        return filtered

    if not getattr(sys.unraisablehook, "mixjax_quiet", False):
        sys.unraisablehook = quiet(sys.unraisablehook, lambda u: _is_straggler(u.exc_value, obj=u.object))
    if not getattr(sys.excepthook, "mixjax_quiet", False):
        sys.excepthook = quiet(sys.excepthook, lambda kind, value, tb: _is_straggler(value, tb))
    asyncio_log = logging.getLogger("asyncio")  # a read task collected with its error: "Task exception was never
    if not any(isinstance(f, _StragglerLogFilter) for f in asyncio_log.filters):  # retrieved", logged by asyncio
        asyncio_log.addFilter(_StragglerLogFilter())


def _root_cause(e: BaseException) -> str:
    """The first line of the innermost exception behind `e` (orbax wraps TensorStore's error, which names the
    array and the byte range, in one that prints the whole TensorStore spec)."""
    while e.__cause__ is not None or e.__context__ is not None:
        e = e.__cause__ or e.__context__
    line = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {line if len(line) <= 300 else line[:300] + ' …'}"


def abstract_float_params(cfg: LlamaConfig, dtype, layers: str = "stacked"):
    """A tree of ShapeDtypeStructs (on the default device) for float params of `cfg`."""
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    is_shape = lambda x: isinstance(x, tuple) and all(isinstance(i, int) for i in x)  # noqa: E731
    tree = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, jnp.dtype(dtype), sharding=sharding), param_shapes(cfg), is_leaf=is_shape)
    if layers == "tuple":
        n = cfg.num_hidden_layers
        tree = {**tree, "layers": tuple(
            jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape[1:], s.dtype, sharding=sharding), tree["layers"])
            for _ in range(n)
        )}
    return tree


def restore_checkpoint(directory: str | os.PathLike, *, abstract_params=None, dtype=None, mesh=None):
    """Reads a checkpoint → (cfg, params).

    abstract_params: the target tree of ShapeDtypeStructs; required for checkpoints whose params are not
    plain float arrays (e.g. quantized ones). dtype: cast float params after reading (default: as saved).
    mesh: a "data" mesh: float params are read straight into their slices on its devices
    (`mixjax.parallel.shard_weights`).
    """
    directory = Path(directory).expanduser().absolute()
    meta = read_metadata(directory)
    cfg = LlamaConfig.from_dict(meta["config"])
    if abstract_params is None:
        if meta.get("dtype") is None:
            raise ConvertError(
                f"{directory}: params are not plain float arrays, and {METADATA_FILE} holds no record of what they "
                "are (a quantized checkpoint keeps it in extra.quantization: missing or edited out?); re-create the "
                "checkpoint (`mixjax convert`), or restore it in Python with the loader that wrote it "
                "(abstract_params=...)"
            )
        abstract_params = abstract_float_params(cfg, meta["dtype"], meta.get("layers", "stacked"))
        if mesh is not None:
            from mixjax.parallel import weight_shardings

            abstract_params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                           abstract_params, weight_shardings(abstract_params, mesh))
    import orbax.checkpoint as ocp

    params_dir = directory / PARAMS_DIR
    if not params_dir.is_dir():
        raise ConvertError(f"{directory}: the {PARAMS_DIR}/ folder is missing; the checkpoint is incomplete")
    _quiet_orbax_stragglers()
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            params = checkpointer.restore(params_dir, abstract_params)
    except Exception as e:  # noqa: BLE001 - orbax raises a bare Exception for a short or failed read of a data file
        cause = _root_cause(e)
        if isinstance(e, MemoryError) or "RESOURCE_EXHAUSTED" in cause:
            raise  # the device or host is out of memory: nothing is wrong with the checkpoint
        raise ConvertError(f"{params_dir}: cannot restore params ({cause}); the checkpoint is damaged, "
                           "incomplete or not of this model: re-create it") from None
    expected = meta.get("params_sha256")
    if expected is not None and params_digest(params) != expected:
        raise ConvertError(
            f"{params_dir}: the restored arrays do not match the digest in {METADATA_FILE} (a damaged or "
            "partly replaced checkpoint); re-create it"
        )
    if dtype is not None:
        params = jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, params)
    return cfg, params
