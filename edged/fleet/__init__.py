"""The fleet side of OTA: what runs on the fleet's machine, never on a device (docs/ota.md).

- ``build``: build model bundles (runs the artifact through the HAL for the self-test)
- ``publish``: the fleet's TUF repository (init, publish, refresh, status)
- ``rollout``: the pure rules of a rollout (waves, halt or go on, the verdict)
- ``cli``: the ``edged-fleet`` command, the I/O around them

The device side is ``edged.ota`` (the bundle format and its checks, the TUF client, the update
state machine); this package imports it, never the other way round.
"""

from __future__ import annotations

from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``edged-fleet`` (the console script's entry point); see ``edged.fleet.cli.main``."""
    from edged.fleet import cli  # noqa: PLC0415 - importing the package stays light

    return cli.main(argv)
