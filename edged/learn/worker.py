"""The fine-tune worker: one process per job, started by ``edged.learn.jobs``.

    python -m edged.learn.worker JOB_DIR

Reads ``JOB_DIR``/task.json (``edged.learn.task.Task``) and samples.npz (the served head and
strategy state are named by path), fine-tunes the head with the job's strategy, evaluates the
served and the candidate head on held-out old data (the state's held-out buffer) and on the
held-out new samples, and writes the candidate version into ``JOB_DIR``/out/ (model.onnx =
backbone + candidate head, backbone.onnx, head.npz, learn_state.npz, lineage.json) with the
self-test the update path runs (selftest.npz: random inputs, and the probabilities the
candidate head gives on their backbone features, computed through the HAL on the CPU:
``edged.learn.features``), then ``JOB_DIR``/result.json
(``edged.learn.task.JobMetrics``). Progress goes to stdout as JSON lines
``{"progress": 0.4}``; a failure exits non-zero with the reason on stderr.

The parent sets the limits (address space, CPU time, niceness) and one BLAS/OpenMP thread
before this process starts; the gate is the parent's decision, not this process's.
"""

from __future__ import annotations

import importlib.util
import json
import resource
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from edged.learn.task import InputSpec, JobMetrics, Task

SAMPLES_FILE = "samples.npz"
OUT_DIR = "out"
SELFTEST_FILE = "selftest.npz"
LINEAGE_FILE = "lineage.json"
#: a head merged by a federation (edged.federated): when the job folder has it, the worker
#: judges and packages it instead of training, and LINEAGE_EXTRA_FILE's object joins the lineage
CANDIDATE_FILE = "candidate_head.npz"
LINEAGE_EXTRA_FILE = "lineage_extra.json"

#: numpy dtype of the KServe datatypes a trainable model's inputs may have
_FLOAT_TYPES = {"FP16": np.float16, "FP32": np.float32, "FP64": np.float64}


#: what a fine-tune needs beyond the base install: the worker writes the served graph with the
#: onnx package, an extra (pip: edged[learn]; the .deb: the edged-learn package)
LEARN_EXTRA_HINT = (
    "fine-tuning needs the onnx package, which is not installed: pip install 'edged[learn]' "
    "(from the .deb: apt install edged-learn)"
)


def learn_support_missing() -> str | None:
    """Why a fine-tune cannot run in this installation (``LEARN_EXTRA_HINT``), or None.
    Looks the onnx package up without importing it (the daemon never needs it loaded)."""
    try:
        found = importlib.util.find_spec("onnx") is not None
    except (ImportError, ValueError):
        found = False
    return None if found else LEARN_EXTRA_HINT


def _random_inputs(specs: tuple[InputSpec, ...], seed: int) -> dict[str, np.ndarray]:
    """Inputs for the self-test: the served graph must give what the head computes on the
    backbone's features, for any input; dynamic dims are 4."""
    rng = np.random.default_rng(seed)
    inputs = {}
    for spec in specs:
        shape = [4 if d < 0 else d for d in spec.shape]
        dtype = _FLOAT_TYPES.get(spec.datatype)
        if dtype is None:
            raise ValueError(
                f"input '{spec.name}' is {spec.datatype}: a trainable model's inputs must "
                "be floating point"
            )
        inputs[spec.name] = rng.standard_normal(shape).astype(dtype)
    return inputs


def _accuracy(head: Any, features: np.ndarray, labels: np.ndarray) -> float | None:
    from edged.learn.head import accuracy  # noqa: PLC0415 -- see run()

    return None if len(labels) == 0 else float(accuracy(head, features, labels))


def run(job_dir: Path) -> JobMetrics:
    """Do the job in ``job_dir``; returns what result.json holds."""
    # imported here: the daemon imports this module for its file names, and never needs the
    # onnx package, the trainer or a backbone in its own process
    try:
        import onnx  # noqa: PLC0415
    except ImportError as e:
        raise RuntimeError(LEARN_EXTRA_HINT) from e

    from edged.learn.features import WORKER_KINDS, open_backbone  # noqa: PLC0415
    from edged.learn.graph import compose  # noqa: PLC0415
    from edged.learn.head import load_head, read_npz, save_head, write_npz  # noqa: PLC0415
    from edged.learn.strategies import (  # noqa: PLC0415
        adopt,
        fine_tune,
        load_state,
        save_state,
        tuned_hyper,
    )

    task = Task.read(job_dir)
    data = read_npz(job_dir / SAMPLES_FILE)
    x_train, y_train = data["x_train"], data["y_train"]
    x_new, y_new = data["x_holdout"], data["y_holdout"]
    head = load_head(Path(task.head))
    state = load_state(task.state)
    # the hyperparameters chosen for this strategy on the benchmark's validation split
    hyper = tuned_hyper(task.strategy, epochs=task.epochs)
    seed = task.seed

    def progress(fraction: float) -> None:
        print(json.dumps({"progress": round(float(fraction), 4)}), flush=True)  # noqa: T201

    started = time.perf_counter()
    # the held-out new samples join the state's held-out buffer: what is new now is old data
    # to the next job
    if (job_dir / CANDIDATE_FILE).exists():
        candidate = load_head(job_dir / CANDIDATE_FILE)
        new_state = adopt(candidate, state, x_train, y_train, (x_new, y_new), seed)
    else:
        candidate, new_state = fine_tune(
            head,
            state,
            x_train,
            y_train,
            task.strategy,
            hyper,
            seed,
            progress=progress,
            validation=(x_new, y_new),
        )
    train_seconds = time.perf_counter() - started

    old_x, old_y = state.holdout.features, state.holdout.labels
    metrics = JobMetrics(
        old_accuracy_before=_accuracy(head, old_x, old_y),
        old_accuracy_after=_accuracy(candidate, old_x, old_y),
        new_accuracy_before=_accuracy(head, x_new, y_new),
        new_accuracy_after=_accuracy(candidate, x_new, y_new),
        old_holdout=len(old_y),
        new_holdout=len(y_new),
        trained_samples=len(y_train),
        train_seconds=round(train_seconds, 4),
    )

    out = job_dir / OUT_DIR
    out.mkdir(exist_ok=True)
    names = task.files
    save_head(out / names.head, candidate)
    save_state(out / names.state, new_state)
    shutil.copyfile(task.backbone, out / names.backbone)
    backbone = onnx.load(task.backbone)
    served = compose(
        backbone, candidate, features=task.features, doc=f"edged fine-tune job {task.job_id}"
    )
    onnx.save(served, out / names.model)

    inputs = _random_inputs(task.inputs, seed)
    extractor = open_backbone(Path(task.backbone), task.features, WORKER_KINDS)
    try:
        features = extractor.features(inputs)
    finally:
        extractor.close()
    assert features is not None  # closed only above
    write_npz(
        out / SELFTEST_FILE,
        {
            **{f"input.{k}": v for k, v in inputs.items()},
            "expected.probabilities": candidate.proba(features),
        },
    )
    lineage = {
        "job_id": task.job_id,
        "parent_version": task.parent_version,
        "strategy": task.strategy,
        "samples": len(y_train) + len(y_new),
        "seed": seed,
        "epochs": hyper.epochs,
        "metrics": metrics.to_dict(),
        "created": time.time(),
    }
    if (job_dir / LINEAGE_EXTRA_FILE).exists():
        lineage.update(json.loads((job_dir / LINEAGE_EXTRA_FILE).read_text()))
    (out / LINEAGE_FILE).write_text(json.dumps(lineage, indent=2, sort_keys=True) + "\n")
    return replace(
        metrics,
        state_bytes=(out / names.state).stat().st_size,
        worker_max_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    )


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m edged.learn.worker JOB_DIR", file=sys.stderr)  # noqa: T201
        return 2
    job_dir = Path(args[0])
    try:
        result = run(job_dir)
    except Exception as e:
        print(f"{type(e).__name__}: {e}", file=sys.stderr)  # noqa: T201
        return 1
    result.write(job_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
