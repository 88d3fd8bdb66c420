"""Where bundles come from: python-tuf's ngclient over the fleet's repository.

``UpdateManager`` receives a ``BundleSource`` (the daemon passes a ``TufClient``; tests pass a
simulated repository, as python-tuf tests its own client against ``RepositorySimulator``), so the
update orchestration runs in process without HTTP. Both methods block: call them from a worker
thread.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from edged import __version__
from edged.config import OtaConfig
from edged.ota import archive
from edged.ota.errors import OtaError
from edged.ota.targets import check_target, edged_custom, parse_target_path, target_path

if TYPE_CHECKING:
    from tuf.ngclient.updater import Updater

# python-tuf (with securesystemslib) costs ~5 MiB of RSS once imported: it is imported when a
# repository is first asked, so a daemon without OTA never loads it.


class BundleSource(Protocol):
    """The signed bundles of a fleet repository, as the updater needs them."""

    def versions(self) -> dict[str, dict[int, Mapping[str, Any]]]:
        """Refresh, then {model: {version: custom edged metadata}} of every bundle target."""
        ...

    def fetch(self, model: str, version: int, fmt: str, free_space_floor: int) -> Path:
        """Refresh, check the signed target, download it (verified); the local file. The
        caller may delete it once unpacked."""
        ...


class TufClient:
    """python-tuf's ngclient over the configured repository: metadata and the targets cache in
    ``<state_dir>/tuf/``, trust bootstrapped from the configured root.json. A fresh ngclient
    Updater per operation (an Updater refreshes once in its life). Blocking."""

    def __init__(self, config: OtaConfig) -> None:
        self.config = config
        base = config.repository_url.rstrip("/")
        self.metadata_url = f"{base}/metadata/"
        self.targets_url = f"{base}/targets/"
        self.metadata_dir = Path(config.state_dir) / "tuf" / "metadata"
        self.targets_dir = Path(config.state_dir) / "tuf" / "targets"

    def _updater(self) -> Updater:
        from tuf.ngclient.config import UpdaterConfig  # noqa: PLC0415 (see the imports)
        from tuf.ngclient.updater import Updater  # noqa: PLC0415
        from tuf.ngclient.urllib3_fetcher import Urllib3Fetcher  # noqa: PLC0415

        try:
            root = self.config.root_path.read_bytes()
        except OSError as e:
            raise OtaError(
                f"no trusted TUF root: cannot read {self.config.root_path} (ota.root): {e}"
            ) from e
        self.metadata_dir.mkdir(parents=True, exist_ok=True)
        self.targets_dir.mkdir(parents=True, exist_ok=True)
        return Updater(
            metadata_dir=str(self.metadata_dir),
            metadata_base_url=self.metadata_url,
            target_dir=str(self.targets_dir),
            target_base_url=self.targets_url,
            fetcher=Urllib3Fetcher(
                socket_timeout=max(1, round(self.config.fetch_timeout_s)),
                app_user_agent=f"edged/{__version__}",
            ),
            config=UpdaterConfig(app_user_agent=f"edged/{__version__}"),
            bootstrap=root,
        )

    def versions(self) -> dict[str, dict[int, Mapping[str, Any]]]:
        """Refresh, then {model: {version: custom edged metadata}} of every bundle target.

        Raises:
            tuf.api.exceptions.RepositoryError, DownloadError: refresh failed.
            OtaError: no trusted root.
        """
        self._updater().refresh()
        # ngclient has no public listing of targets, but it persists each top-level role to
        # metadata_dir only after verifying it (signatures, thresholds, expiry, version and
        # snapshot consistency): what refresh() just trusted is that targets.json
        from tuf.api.metadata import Metadata, Targets  # noqa: PLC0415

        trusted = Metadata[Targets].from_file(str(self.metadata_dir / "targets.json"))
        targets = trusted.signed.targets
        found: dict[str, dict[int, Mapping[str, Any]]] = {}
        for path, info in targets.items():
            parsed = parse_target_path(path)
            if parsed is None:
                continue
            custom = edged_custom(info.custom)
            if not isinstance(custom, dict):
                custom = {}
            found.setdefault(parsed[0], {})[parsed[1]] = custom
        return found

    def fetch(self, model: str, version: int, fmt: str, free_space_floor: int) -> Path:
        """Refresh, check the signed target, download it (or take it from the cache); TUF
        verifies its length and hashes. Returns the local file.

        Raises:
            tuf.api.exceptions.RepositoryError: metadata or the target failed to verify.
            tuf.api.exceptions.DownloadError: a download failed.
            OtaError: no such target, or it is not the bundle asked for, too big, or would
                leave too little disk space.
        """
        updater = self._updater()
        path = target_path(model, version)
        info = updater.get_targetinfo(path)
        if info is None:
            raise OtaError(f"target {path} is not in the repository")
        check_target(
            path,
            edged_custom(info.custom),
            model=model,
            version=version,
            fmt=fmt,
            length=info.length,
            max_bytes=self.config.max_bundle_bytes,
        )
        cached = updater.find_cached_target(info)
        if cached is not None:
            return Path(cached)
        if not archive.free_space_ok(self.targets_dir, info.length, free_space_floor):
            raise OtaError(
                f"downloading {info.length} bytes would leave less than ota.min_free_bytes "
                f"({free_space_floor}) free in {self.targets_dir}"
            )
        return Path(updater.download_target(info))
