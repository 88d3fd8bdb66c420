"""TUF test helpers, free of pytest so any test (unit, integration, e2e) can use them.

- ``StaticServer``: a loopback HTTP server for a fleet repository folder, in a thread; it
  serves only ``metadata/`` and ``targets/`` (never ``keys/``) and records every path asked.
- ``make_fleet_repo``: ``edged-fleet init`` plus published digits bundles, as a ``FleetRepo``.
- ``tuf_updater``: a python-tuf ngclient ``Updater`` bootstrapped from a repository's first
  root, with its own metadata and targets folders.
"""

from __future__ import annotations

import functools
import http.server
import sys
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from tuf.ngclient import Updater, UpdaterConfig

from edged.fleet import build, publish

EXAMPLE_MODELS = Path(__file__).resolve().parents[1] / "models"
DIGITS = EXAMPLE_MODELS / "digits"
DIGITS_SAMPLE = DIGITS / "sample.npy"


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Static files under the server's folder, only below the allowed top folders."""

    server: _Server

    def send_head(self) -> Any:
        path = self.path.split("?", 1)[0].split("#", 1)[0]
        top = path.lstrip("/").split("/", 1)[0]
        self.server.requests.append(path)
        if top not in self.server.folders:
            self.send_error(404, "not served")
            return None
        return super().send_head()

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    folders: frozenset[str]
    requests: list[str]

    def handle_error(self, request: Any, client_address: Any) -> None:
        # a client that stops reading (a download over its length limit) is expected here
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class StaticServer:
    """Serve ``root`` on http://127.0.0.1:<free port>/ from a thread until ``close()``."""

    def __init__(self, root: Path, folders: Iterable[str] = ("metadata", "targets")) -> None:
        handler = functools.partial(_Handler, directory=str(root))
        self._server = _Server(("127.0.0.1", 0), handler)
        self._server.folders = frozenset(folders)
        self._server.requests = []
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        host, port = self._server.server_address[:2]
        self.url = f"http://{host!s}:{port}"

    @property
    def requests(self) -> list[str]:
        """Every path asked for, in order (404s included)."""
        return self._server.requests

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def __enter__(self) -> StaticServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def build_digits_bundle(
    out_dir: Path,
    version: int,
    *,
    expected: Mapping[str, np.ndarray] | None = None,
    inputs: Mapping[str, np.ndarray] | None = None,
) -> Path:
    """models/digits' version-1 model bundled as ``version``; the self-test input is
    models/digits/sample.npy and the expected outputs what the model answers (or
    ``expected``)."""
    selftest = dict(inputs) if inputs is not None else {"input": np.load(DIGITS_SAMPLE)}
    return build.build_bundle(
        DIGITS,
        version,
        Path(out_dir) / f"digits-{version}.tar.gz",
        selftest,
        source=DIGITS / "1",
        expected=expected,
    )


@dataclass
class FleetRepo:
    """A fleet repository folder with published digits versions."""

    directory: Path
    bundles: dict[int, Path] = field(default_factory=dict)

    @property
    def root_path(self) -> Path:
        """The first root: what a device is shipped with (``ota.root``)."""
        return self.directory / publish.METADATA_DIR / "1.root.json"

    @property
    def keys_dir(self) -> Path:
        return self.directory / publish.KEYS_DIR

    def served_file(self, target: str) -> Path:
        """The file a client downloads for ``target`` (hash-prefixed)."""
        return publish.target_file(self.directory, target)

    def publish_digits(
        self,
        version: int,
        *,
        expected: Mapping[str, np.ndarray] | None = None,
        force: bool = False,
        now: datetime | None = None,
    ) -> publish.Published:
        """Build digits ``version`` and publish it."""
        path = build_digits_bundle(self.directory.parent / "bundles", version, expected=expected)
        self.bundles[version] = path
        return publish.publish(self.directory, path, force=force, now=now)


def make_fleet_repo(
    directory: Path, versions: Sequence[int] = (1, 2), *, now: datetime | None = None
) -> FleetRepo:
    """``init`` a repository in ``directory`` and publish digits ``versions`` (built from
    models/digits/1); bundles are written beside it, in ``directory``/../bundles."""
    repo = FleetRepo(Path(directory))
    publish.init(repo.directory, now=now)
    for version in versions:
        repo.publish_digits(version, now=now)
    return repo


def tuf_updater(
    url: str, root: bytes, client_dir: Path, config: UpdaterConfig | None = None
) -> Updater:
    """An ngclient Updater for the repository at ``url``, trusting ``root`` first, with its
    metadata and downloads under ``client_dir``."""
    metadata, targets = Path(client_dir) / "metadata", Path(client_dir) / "targets"
    metadata.mkdir(parents=True, exist_ok=True)
    targets.mkdir(parents=True, exist_ok=True)
    return Updater(
        metadata_dir=str(metadata),
        metadata_base_url=f"{url}/metadata/",
        target_dir=str(targets),
        target_base_url=f"{url}/targets/",
        config=config,
        bootstrap=root,
    )


class ServedFleetRepo:
    """A new fleet repository in ``directory``, served on 127.0.0.1 until ``close()``: what a
    daemon-level test points ``ota.repository_url`` (``url``) and ``ota.root``
    (``root_path``) at."""

    def __init__(self, directory: Path, *, now: datetime | None = None) -> None:
        self.directory = Path(directory)
        publish.init(self.directory, now=now)
        self.server = StaticServer(self.directory)
        self.url = self.server.url
        self.root_path = self.directory / publish.METADATA_DIR / "1.root.json"

    def publish(
        self, bundle_path: Path, *, force: bool = False, now: datetime | None = None
    ) -> publish.Published:
        """Publish a bundle as models/<model>/<version>.tar.gz (``.target``)."""
        return publish.publish(self.directory, bundle_path, force=force, now=now)

    def served_file(self, target: str) -> Path:
        """The file a client downloads for ``target`` (hash-prefixed)."""
        return publish.target_file(self.directory, target)

    def tamper(self, target: str) -> None:
        """Flip one byte of a published target on the server (same length)."""
        file = self.served_file(target)
        data = bytearray(file.read_bytes())
        data[len(data) // 2] ^= 0xFF
        file.write_bytes(bytes(data))

    def close(self) -> None:
        self.server.close()

    def __enter__(self) -> ServedFleetRepo:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
