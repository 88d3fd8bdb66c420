"""Where a bundle lives in the fleet's TUF repository: the one naming rule that the fleet
(``edged.fleet.publish``) writes and a device (``edged.ota.tuf_client``) reads, and the checks
of a signed target before a device downloads it.

Targets are ``models/<model>/<version>.tar.gz``; any other target path is not a bundle.
"""

from __future__ import annotations

from edged.ota.errors import OtaError
from edged.serving.versions import parse_version


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


def edged_custom(custom: object) -> object:
    """The ``edged`` table of a target's custom metadata ({} when there is none; whatever it
    holds otherwise, for ``check_target`` to judge)."""
    return custom.get("edged", {}) if isinstance(custom, dict) else {}


def check_target(
    path: str,
    custom: object,
    *,
    model: str,
    version: int,
    fmt: str,
    length: int,
    max_bytes: int,
) -> None:
    """Check a signed target before downloading it: its ``edged`` custom metadata names the
    model, version and format asked for (where it names them), and it is not too big.

    Raises:
        OtaError: it is not the bundle asked for, or above ``max_bytes``.
    """
    if not isinstance(custom, dict):
        raise OtaError(f"target {path}: custom metadata 'edged' is not a table")
    if custom.get("model", model) != model or str(custom.get("version", version)) != str(version):
        raise OtaError(
            f"target {path} is signed as model {custom.get('model')!r} version "
            f"{custom.get('version')!r}"
        )
    if custom.get("format", fmt) != fmt:
        raise OtaError(
            f"target {path} is a {custom.get('format')!r} bundle; model.toml says {fmt!r}"
        )
    if length > max_bytes:
        raise OtaError(
            f"target {path} is {length} bytes, above ota.max_bundle_bytes ({max_bytes})"
        )
