"""Where a bundle lives in the fleet's TUF repository: the one naming rule that the fleet
(``edged.fleet.publish``) writes and a device (``edged.ota.updater``) reads.

Targets are ``models/<model>/<version>.tar.gz``; any other target path is not a bundle.
"""

from __future__ import annotations

from edged.serving.repository import parse_version


def target_path(model: str, version: int) -> str:
    """The target path of a bundle: ``models/<model>/<version>.tar.gz``."""
    return f"models/{model}/{version}.tar.gz"


def parse_target_path(path: str) -> tuple[str, int] | None:
    """(model, version) of a bundle target path, or None for any other target."""
    parts = path.split("/")
    if len(parts) != 3 or parts[0] != "models" or not parts[2].endswith(".tar.gz"):
        return None
    version = parse_version(parts[2].removesuffix(".tar.gz"))
    return None if version is None else (parts[1], version)
