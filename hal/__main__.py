"""``python -m hal``: print what ``hal.probe()`` finds on this host (``--json`` for JSON)."""

from __future__ import annotations

import json
import sys

from hal.probe import format_table, probe


def main(argv: list[str]) -> int:
    reports = probe()
    if "--json" in argv:
        sys.stdout.write(json.dumps([r.to_dict() for r in reports], indent=2) + "\n")
    else:
        sys.stdout.write(format_table(reports))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
