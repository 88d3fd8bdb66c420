"""Long fuzzing runs (`make fuzz`): each harness of tests/fuzz/harnesses.py under atheris
(coverage-guided, libFuzzer) for FUZZ_SECONDS, starting from the checked-in corpus; where
atheris is not installed (it has wheels for x86-64 Linux only) the same harnesses run under
hypothesis with FUZZ_EXAMPLES examples each. New crashing inputs are written to
tests/fuzz/crashes/<target>/: add one to the corpus and a regression test, then fix.

    python -m tests.fuzz.run [TARGET ...]   # environment: FUZZ_SECONDS (60), FUZZ_EXAMPLES
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.fuzz.harnesses import HARNESSES

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def _has_atheris() -> bool:
    try:
        import atheris  # noqa: F401
    except ImportError:
        return False
    return True


def _atheris_child(target: str) -> None:
    """Run in a child process: libFuzzer owns the process and exits when done."""
    import atheris

    atheris.instrument_all()  # edged is imported already (by this module): instrument it now
    atheris.Setup(sys.argv, HARNESSES[target])
    atheris.Fuzz()


def _atheris(target: str, seconds: int) -> int:
    crashes = HERE / "crashes" / target
    crashes.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"edged-fuzz-{target}-") as work:
        # new interesting inputs go to the scratch folder; the checked-in corpus only seeds
        command = [
            sys.executable,
            "-m",
            "tests.fuzz.run",
            "--child",
            target,
            f"-max_total_time={seconds}",
            "-rss_limit_mb=2048",
            "-timeout=10",
            f"-artifact_prefix={crashes}/",
            work,
            str(HERE / "corpus" / target),
        ]
        return subprocess.call(command, cwd=ROOT)


def _hypothesis(targets: list[str], examples: int) -> int:
    env = {**os.environ, "FUZZ_EXAMPLES": str(examples)}
    selection = " or ".join(targets)
    command = [sys.executable, "-m", "pytest", "-q", str(HERE / "test_fuzz.py"), "-k", selection]
    return subprocess.call(command, cwd=ROOT, env=env)


def main(argv: list[str]) -> int:
    if argv[:1] == ["--child"]:
        sys.argv = [sys.argv[0], *argv[2:]]
        _atheris_child(argv[1])
        return 0
    targets = argv or sorted(HARNESSES)
    unknown = [t for t in targets if t not in HARNESSES]
    if unknown:
        print(f"unknown targets {unknown}; known: {sorted(HARNESSES)}", file=sys.stderr)
        return 2
    seconds = int(os.environ.get("FUZZ_SECONDS", "60"))
    if not _has_atheris():
        print("atheris is not installed: running the harnesses under hypothesis", file=sys.stderr)
        return _hypothesis(targets, int(os.environ.get("FUZZ_EXAMPLES", "20000")))
    failed = [t for t in targets if _atheris(t, seconds) != 0]
    if failed:
        print(f"crashes in {failed}: see tests/fuzz/crashes/", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
