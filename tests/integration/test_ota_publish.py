"""The fleet's TUF repository against a real python-tuf client over loopback HTTP.

A repository is made with ``edged.fleet.publish`` (digits published as versions 1 and 2), served
by ``http.server`` on 127.0.0.1, and read by a real ``tuf.ngclient.Updater`` bootstrapped from
the repository's 1.root.json. Then every attack a TUF client must stop is staged for real on
the server's files, each refused with its exact error class:

| attack                                                        | refused with                 |
| ------------------------------------------------------------- | ---------------------------- |
| target bytes changed on the server (same length)              | LengthOrHashMismatchError    |
| target bytes appended on the server (endless data)            | DownloadLengthMismatchError  |
| timestamp.json above UpdaterConfig.timestamp_max_length       | DownloadLengthMismatchError  |
| targets / snapshot / timestamp signed by a key root lacks     | UnsignedMetadataError        |
| an older timestamp served after a newer one was seen          | BadVersionNumberError        |
| a new timestamp naming an older snapshot                      | BadVersionNumberError        |
| a new snapshot naming an older targets version                | BadVersionNumberError        |
| a timestamp that expired (freeze attack)                      | ExpiredMetadataError         |
"""

from __future__ import annotations

import json
import shutil
import tarfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from securesystemslib.signer import CryptoSigner, Signer
from tuf.api.exceptions import (
    BadVersionNumberError,
    DownloadLengthMismatchError,
    ExpiredMetadataError,
    LengthOrHashMismatchError,
    UnsignedMetadataError,
)
from tuf.api.metadata import Metadata, MetaFile, Root, Snapshot, TargetFile, Targets, Timestamp
from tuf.ngclient import Updater, UpdaterConfig

from edged import fleet
from edged.fleet import publish
from edged.ota import archive, bundle
from edged.ota.errors import PublishError
from tests.tuf_fixtures import (
    DIGITS,
    FleetRepo,
    StaticServer,
    build_digits_bundle,
    make_fleet_repo,
    tuf_updater,
)

TARGET = "models/digits/2.tar.gz"


@dataclass
class Served:
    repo: FleetRepo
    server: StaticServer
    client_dir: Path

    @property
    def directory(self) -> Path:
        return self.repo.directory

    def updater(self, config: UpdaterConfig | None = None) -> Updater:
        """A fresh ngclient Updater sharing one client folder (so it remembers what it saw)."""
        return tuf_updater(
            self.server.url, self.repo.root_path.read_bytes(), self.client_dir, config
        )

    def refreshed(self) -> Updater:
        updater = self.updater()
        updater.refresh()
        return updater


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    repo = make_fleet_repo(tmp_path / "fleet", versions=(1, 2))
    with StaticServer(repo.directory) as server:
        yield Served(repo, server, tmp_path / "client")


# -- what an attacker holding some keys (or none) can write ---------------------------------


def signer(repo: FleetRepo, role: str) -> Signer:
    root = publish.load_metadata(repo.directory, Root.type, Root).signed
    return publish.load_signer(repo.keys_dir, role, root)


def resign_snapshot(repo: FleetRepo, targets_bytes: bytes, targets_version: int) -> bytes:
    """A new snapshot naming this targets version, signed with the real online key."""
    snapshot = publish.load_metadata(repo.directory, Snapshot.type, Snapshot)
    snapshot.signed.meta["targets.json"] = MetaFile.from_data(
        targets_version, targets_bytes, ["sha256"]
    )
    snapshot.signed.version += 1
    snapshot.sign(signer(repo, Snapshot.type))
    return publish.write_metadata(repo.directory, snapshot)


def resign_timestamp(
    repo: FleetRepo, snapshot_bytes: bytes, snapshot_version: int, key: Signer | None = None
) -> None:
    """A new timestamp naming this snapshot version (signed with the real key unless given)."""
    timestamp = publish.load_metadata(repo.directory, Timestamp.type, Timestamp)
    timestamp.signed.snapshot_meta = MetaFile.from_data(
        snapshot_version, snapshot_bytes, ["sha256"]
    )
    timestamp.signed.version += 1
    timestamp.sign(key or signer(repo, Timestamp.type))
    publish.write_metadata(repo.directory, timestamp)


def metadata_file(repo: FleetRepo, name: str) -> Path:
    return repo.directory / "metadata" / name


# -- the happy path --------------------------------------------------------------------------


def test_a_tuf_client_finds_and_downloads_the_published_bundle(served: Served) -> None:
    updater = served.refreshed()

    info = updater.get_targetinfo(TARGET)
    assert info is not None
    assert info.custom == {
        "edged": {
            "model": "digits",
            "version": 2,
            "format": "onnx",
            "signature": {
                "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}],
                "outputs": [
                    {"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]},
                    {"name": "label", "datatype": "INT64", "shape": [-1]},
                ],
            },
            "selftest": True,
        }
    }
    local = Path(updater.download_target(info))
    assert local.read_bytes() == served.repo.bundles[2].read_bytes()
    assert updater.get_targetinfo("models/digits/1.tar.gz") is not None
    assert updater.get_targetinfo("models/digits/3.tar.gz") is None

    # consistent snapshots for real: versioned metadata and hash-prefixed target names
    digest = info.hashes["sha256"]
    assert "/metadata/3.snapshot.json" in served.server.requests
    assert "/metadata/3.targets.json" in served.server.requests
    assert f"/targets/models/digits/{digest}.2.tar.gz" in served.server.requests
    # and what was downloaded is a bundle a device accepts
    assert bundle.inspect_bundle(local).manifest.version == 2


def test_the_server_helper_never_serves_keys(served: Served) -> None:
    with pytest.raises(urllib.error.HTTPError, match="404"):
        urllib.request.urlopen(f"{served.server.url}/keys/online/timestamp.pem", timeout=5)


def test_a_new_version_reaches_a_client_that_saw_the_old_one(served: Served) -> None:
    served.refreshed()
    served.repo.publish_digits(3)
    updater = served.refreshed()
    assert updater.get_targetinfo("models/digits/3.tar.gz") is not None


# -- attacks on targets ----------------------------------------------------------------------


def test_tampered_target_bytes_fail_the_hash_check(served: Served) -> None:
    updater = served.refreshed()
    info = updater.get_targetinfo(TARGET)
    assert info is not None
    file = served.repo.served_file(TARGET)
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    file.write_bytes(bytes(data))

    with pytest.raises(LengthOrHashMismatchError, match="does not match expected hash"):
        updater.download_target(info)
    assert not list((served.client_dir / "targets").iterdir())


def test_oversized_target_download_stops_at_the_signed_length(served: Served) -> None:
    updater = served.refreshed()
    info = updater.get_targetinfo(TARGET)
    assert info is not None
    file = served.repo.served_file(TARGET)
    with open(file, "ab") as f:
        f.write(bytes(4 * 1024 * 1024))

    with pytest.raises(
        DownloadLengthMismatchError, match=f"maximum allowed length of {info.length}"
    ):
        updater.download_target(info)


def test_oversized_metadata_stops_at_the_client_limit(served: Served) -> None:
    config = UpdaterConfig()
    timestamp = metadata_file(served.repo, "timestamp.json")
    timestamp.write_bytes(timestamp.read_bytes() + b" " * config.timestamp_max_length)

    limit = config.timestamp_max_length
    with pytest.raises(DownloadLengthMismatchError, match=f"maximum allowed length of {limit}"):
        served.updater(config).refresh()


@pytest.mark.parametrize("role", [Targets.type, Snapshot.type, Timestamp.type])
def test_metadata_signed_by_an_unknown_key_is_refused(served: Served, role: str) -> None:
    served.refreshed()
    repo = served.repo
    rogue = CryptoSigner.generate_ed25519()
    targets = publish.load_metadata(repo.directory, Targets.type, Targets)
    evil = b"not a model"
    path = "models/digits/9.tar.gz"
    targets.signed.targets[path] = TargetFile.from_data(path, evil, ["sha256"])
    targets.signed.version += 1
    targets.sign(rogue if role == Targets.type else signer(repo, Targets.type))
    evil_file = (
        repo.directory
        / "targets"
        / publish.served_path(path, targets.signed.targets[path].hashes["sha256"])
    )
    evil_file.write_bytes(evil)
    targets_bytes = publish.write_metadata(repo.directory, targets)
    snapshot = publish.load_metadata(repo.directory, Snapshot.type, Snapshot)
    snapshot.signed.meta["targets.json"] = MetaFile.from_data(
        targets.signed.version, targets_bytes, ["sha256"]
    )
    snapshot.signed.version += 1
    snapshot.sign(rogue if role == Snapshot.type else signer(repo, Snapshot.type))
    snapshot_bytes = publish.write_metadata(repo.directory, snapshot)
    resign_timestamp(
        repo,
        snapshot_bytes,
        snapshot.signed.version,
        key=rogue if role == Timestamp.type else None,
    )

    updater = served.updater()
    with pytest.raises(UnsignedMetadataError, match=f"{role} was signed by 0/1 keys"):
        updater.refresh()


def test_publish_refuses_a_key_root_does_not_trust(served: Served) -> None:
    key = publish.key_file(served.repo.keys_dir, Targets.type)
    key.unlink()
    key.write_bytes(CryptoSigner.generate_ed25519().private_bytes)
    key.chmod(0o600)
    with pytest.raises(PublishError, match=r"is not a key root\.json trusts for targets"):
        served.repo.publish_digits(3)


def test_refresh_refuses_to_snapshot_targets_root_does_not_trust(served: Served) -> None:
    targets = publish.load_metadata(served.directory, Targets.type, Targets)
    targets.signed.version += 1
    targets.sign(CryptoSigner.generate_ed25519())
    publish.write_metadata(served.directory, targets)
    with pytest.raises(PublishError, match="refusing to snapshot it"):
        publish.refresh(served.directory)


# -- rollback and freeze attacks -------------------------------------------------------------


def test_an_older_timestamp_after_a_newer_one_is_a_rollback(served: Served) -> None:
    timestamp = metadata_file(served.repo, "timestamp.json")
    older = timestamp.read_bytes()
    publish.refresh(served.directory)
    served.refreshed()  # the client now trusts the newer timestamp
    timestamp.write_bytes(older)

    with pytest.raises(BadVersionNumberError, match="must be >= "):
        served.updater().refresh()


def test_a_timestamp_naming_an_older_snapshot_is_a_rollback(served: Served) -> None:
    old_version = publish.load_metadata(served.directory, Snapshot.type, Snapshot).signed.version
    old_bytes = metadata_file(served.repo, f"{old_version}.snapshot.json").read_bytes()
    publish.refresh(served.directory)
    served.refreshed()  # the client now trusts snapshot old_version + 1
    # an attacker holding the timestamp key signs a timestamp naming the older snapshot
    resign_timestamp(served.repo, old_bytes, old_version)

    with pytest.raises(BadVersionNumberError, match="New snapshot version must be >= "):
        served.updater().refresh()


def test_a_snapshot_naming_older_targets_is_a_rollback(served: Served) -> None:
    targets = publish.load_metadata(served.directory, Targets.type, Targets).signed
    served.refreshed()  # the client trusts targets v(N)
    old_bytes = metadata_file(served.repo, f"{targets.version - 1}.targets.json").read_bytes()
    # an attacker holding both online keys re-points the snapshot at the older targets
    snapshot_bytes = resign_snapshot(served.repo, old_bytes, targets.version - 1)
    snapshot = Metadata[Snapshot].from_bytes(snapshot_bytes)
    resign_timestamp(served.repo, snapshot_bytes, snapshot.signed.version)

    with pytest.raises(BadVersionNumberError, match=r"targets\.json"):
        served.updater().refresh()


def test_an_expired_timestamp_is_refused(served: Served) -> None:
    # the repository stopped being refreshed two days ago (or an attacker replays that one)
    publish.refresh(served.directory, now=datetime.now(UTC) - timedelta(days=2))

    with pytest.raises(ExpiredMetadataError, match=r"timestamp\.json is expired"):
        served.updater().refresh()


# -- the repository's own rules --------------------------------------------------------------


def test_publishing_an_old_or_equal_version_needs_force(served: Served) -> None:
    with pytest.raises(PublishError, match=r"version 2: it is already published .*--force"):
        served.repo.publish_digits(2)
    with pytest.raises(PublishError, match=r"version 1: it is already published"):
        served.repo.publish_digits(1)
    with pytest.raises(PublishError, match=r"version 2: it is below 3 .*Publish version 4"):
        publish.check_new_version("digits", 2, [1, 3], force=False)
    publish.check_new_version("digits", 2, [1, 3], force=True)
    publish.check_new_version("digits", 4, [1, 3], force=False)
    before = publish.status(served.directory)["roles"]["targets"]["version"]

    done = served.repo.publish_digits(
        2, force=True, expected={"label": np.array([0, 0]), "probabilities": np.zeros((2, 10))}
    )

    assert done.versions["targets"] == before + 1
    updater = served.refreshed()
    info = updater.get_targetinfo(TARGET)
    assert info is not None
    assert info.hashes["sha256"] == done.sha256


def test_layout_keys_and_expiry(tmp_path: Path) -> None:
    now = datetime(2030, 1, 1, tzinfo=UTC)
    repo = make_fleet_repo(tmp_path / "fleet", versions=(2,), now=now)
    d = repo.directory

    names = sorted(p.name for p in (d / "metadata").iterdir())
    assert names == [
        "1.root.json",
        "1.snapshot.json",
        "1.targets.json",
        "2.snapshot.json",
        "2.targets.json",
        "root.json",
        "snapshot.json",
        "targets.json",
        "timestamp.json",
    ]
    assert (d / "keys" / "offline" / "root.pem").is_file()
    assert (d / "keys" / "offline" / "targets.pem").is_file()
    assert (d / "keys" / "online" / "snapshot.pem").is_file()
    assert (d / "keys" / "online" / "timestamp.pem").is_file()
    for pem in (d / "keys").rglob("*.pem"):
        assert pem.stat().st_mode & 0o777 == 0o600
    assert (d / "keys" / "offline").stat().st_mode & 0o777 == 0o700
    root = json.loads((d / "metadata" / "root.json").read_text())["signed"]
    assert root["consistent_snapshot"] is True

    report = publish.status(d, now=now)
    expires = {role: r["expires"] for role, r in report["roles"].items()}
    assert expires == {
        "root": "2031-01-01T00:00:00+00:00",
        "targets": "2030-04-01T00:00:00+00:00",
        "snapshot": "2030-01-08T00:00:00+00:00",
        "timestamp": "2030-01-02T00:00:00+00:00",
    }
    assert report["problems"] == []
    assert [v["version"] for v in report["models"]["digits"]] == [2]

    # a year later everything has expired, and status says so
    later = publish.status(d, now=now + timedelta(days=400))
    assert len(later["problems"]) == 4
    assert all(r["expired"] for r in later["roles"].values())

    # refresh needs only the online keys
    offline = tmp_path / "usb"
    (d / "keys" / "offline").rename(offline)
    assert publish.refresh(d, now=now) == {"snapshot": 3, "timestamp": 3}
    with pytest.raises(PublishError, match=r"the targets key .* is missing"):
        repo.publish_digits(3, now=now)


def test_init_never_overwrites(tmp_path: Path) -> None:
    publish.init(tmp_path / "r")
    with pytest.raises(PublishError, match="already holds a repository"):
        publish.init(tmp_path / "r")


def test_a_key_readable_by_others_is_refused(tmp_path: Path) -> None:
    repo = make_fleet_repo(tmp_path / "fleet", versions=())
    publish.key_file(repo.keys_dir, "timestamp").chmod(0o644)
    with pytest.raises(PublishError, match=r"readable by others \(mode 0644\)"):
        publish.refresh(repo.directory)


def test_an_unsafe_bundle_is_never_published(tmp_path: Path) -> None:
    repo = make_fleet_repo(tmp_path / "fleet", versions=())
    good = build_digits_bundle(tmp_path, 2)
    folder = archive.extract(good, tmp_path)
    (folder / "stray.txt").write_text("not listed in bundle.toml")
    bad = tmp_path / "bad.tar.gz"
    with tarfile.open(bad, "w:gz") as tar:
        for p in sorted(folder.iterdir()):
            tar.add(p, arcname=p.name)
    with pytest.raises(bundle.BundleError, match=r"stray\.txt"):
        publish.publish(repo.directory, bad)
    assert publish.status(repo.directory)["models"] == {}


# -- the command -----------------------------------------------------------------------------


def test_edged_fleet_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d, out = tmp_path / "repo", tmp_path / "digits-2.tar.gz"
    sample = tmp_path / "sample.npy"
    np.save(sample, np.load(DIGITS / "sample.npy"))

    assert fleet.main(["init", str(d), "--timestamp-days", "2"]) == 0
    assert fleet.main(["bundle", str(DIGITS), "--version", "2", "--out", str(out)]) == 1
    assert "--source" in capsys.readouterr().err
    args = ["bundle", str(DIGITS), "--version", "2", "--out", str(out)]
    args += ["--source", str(DIGITS / "1"), "--selftest-input", f"input={sample}"]
    assert fleet.main(args) == 0
    assert fleet.main(["publish", str(d), str(out)]) == 0
    published = capsys.readouterr()
    assert "published models/digits/2.tar.gz" in published.out
    steps = [line.removeprefix("edged-fleet: ") for line in published.err.splitlines()]
    assert steps[0].startswith(f"checking {out} whole")
    assert [s.split(" ")[0] for s in steps[1:]] == ["digits", "copying", "signing", "signing"]
    assert steps[-1] == "signing snapshot and timestamp"
    assert fleet.main(["publish", str(d), str(out)]) == 1
    assert "pass --force" in capsys.readouterr().err
    assert fleet.main(["refresh", str(d)]) == 0
    capsys.readouterr()
    assert fleet.main(["status", str(d), "--json"]) == 0
    report: dict[str, Any] = json.loads(capsys.readouterr().out)
    assert report["models"]["digits"][0]["target"] == TARGET
    assert report["roles"]["timestamp"]["version"] == 3
    assert fleet.main(["status", str(d)]) == 0
    assert "digits 2: models/digits/2.tar.gz (onnx" in capsys.readouterr().out


def test_edged_fleet_bundle_of_the_current_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`edged-fleet bundle . --version N` inside a model folder names the model after it."""
    model = tmp_path / "digits"
    shutil.copytree(DIGITS, model)
    monkeypatch.chdir(model)
    out = tmp_path / "digits-1.tar.gz"
    assert fleet.main(["bundle", ".", "--version", "1", "--out", str(out)]) == 0, (
        capsys.readouterr().err
    )
    assert bundle.read_manifest(out).name == "digits"
