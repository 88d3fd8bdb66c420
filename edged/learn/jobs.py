"""On-device learning: sample intake, fine-tune jobs, the gate, publishing.

``LearnManager`` does the work behind AddSamples / StartFineTune / GetJob / ListJobs (gRPC
and ZeroMQ reach it through ``edged.controlplane``):

* ``add_samples`` checks the inputs against the served version's signature
  (``validate_inputs``: an inference request's checks and messages), runs them through the
  version's frozen backbone (``edged.learn.features``: loaded through the HAL on the kinds the
  version is placed on, one thread, off the event loop) and stores the *features* with their
  labels (``LearnStore``);
* ``start_job`` takes the model's pending samples and runs the fine-tune in a worker process
  (``edged.learn.worker``, started by ``edged.learn.runner``) with its own limits: address
  space, CPU time, niceness, one BLAS thread; the task and its metrics go between the two as
  the typed values of ``edged.learn.task``. The candidate head is judged by ``judge``
  (``edged.learn.gate``, a pure function) on held-out old data and on the held-out share of
  the new samples; one that passes becomes a new version through
  ``UpdateManager.publish_local``: the update path (version folder, self-test, switch, health
  window, automatic rollback). A job that fails or is rejected leaves the served version as it
  was.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from edged.config import LearnConfig
from edged.core.control import SampleCounts
from edged.core.errors import (
    AlreadyExistsError,
    InvalidInputError,
    ModelNotFoundError,
    UnavailableError,
    UnsupportedError,
)
from edged.core.types import LEARN_STRATEGIES, Array
from edged.learn import worker
from edged.learn.features import Backbones, check_features
from edged.learn.gate import Verdict, judge
from edged.learn.head import read_npz, write_npz
from edged.learn.runner import Limits, run_process
from edged.learn.store import JobRecord, JobState, LearnStore, Samples, SampleStatus
from edged.learn.task import InputSpec, JobMetrics, Task, VersionFiles
from edged.ota.errors import describe_error
from edged.ota.state import State
from edged.ota.types import SelfTest
from edged.ota.updater import UpdateManager
from edged.serving.manager import ModelManager
from edged.serving.model import ModelVersion
from edged.serving.repository import LearnSpec, read_model_spec
from edged.serving.validate import validate_inputs
from edged.serving.versions import available_versions

log = structlog.get_logger("edged.learn")

JOBS_DIR = Path("learn") / "jobs"
LINEAGE_FILE = worker.LINEAGE_FILE


# -- the manager -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    """A head a job judges and publishes instead of training one (a federation's merged
    head, edged.federated.devices), and what its lineage records of where it came from."""

    head: Path
    lineage: Mapping[str, object]


@dataclass
class _Running:
    task: asyncio.Task[JobRecord]
    record: JobRecord
    progress: float = 0.0


class LearnManager:
    """Sample intake and fine-tune jobs of the trainable models one ModelManager serves."""

    def __init__(
        self,
        manager: ModelManager,
        updates: UpdateManager,
        config: LearnConfig,
        store: LearnStore,
        state_dir: Path,
    ) -> None:
        self.manager = manager
        self.updates = updates
        self.config = config
        self.store = store
        self.jobs_dir = state_dir / JOBS_DIR
        self._backbones = Backbones()
        self._running: dict[str, _Running] = {}
        self._ready = False
        self._stopping = False
        # read by the metrics collector from its own thread: replaced, never mutated in place
        self.jobs_total: dict[tuple[str, str], int] = {}

    # -- start-up and shutdown -----------------------------------------------------------

    def recover(self) -> list[JobRecord]:
        """Settle jobs a restart interrupted: a RUNNING job fails (its samples stay pending);
        a PUBLISHING job takes the outcome of its update, which OTA recovery has settled.
        Blocking: call from a worker thread, after OTA recovery."""
        settled = []
        for job in self.store.unfinished_jobs():
            record = self.updates.store.get(job.update_id) if job.update_id else None
            if job.state is JobState.PUBLISHING and record is not None:
                if record.state is State.COMMITTED:
                    self.store.mark_job(job.id, SampleStatus.LEARNED)
                    settled.append(self.store.update_job(job.id, state=JobState.PROMOTED))
                    continue
                reason = f"publishing ended {record.state}: {record.error or 'restart'}"
            else:
                reason = "interrupted by a restart of edged"
            settled.append(self.store.update_job(job.id, state=JobState.FAILED, error=reason))
            log.warning("learn_job_recovered", job_id=job.id, model=job.model, reason=reason)
        shutil.rmtree(self.jobs_dir, ignore_errors=True)
        return settled

    async def start(self) -> None:
        self._ready = True

    async def stop(self) -> None:
        """Cancel running jobs (their worker processes are killed; each is recorded FAILED)
        and close the backbones."""
        self._stopping = True
        self._ready = False
        tasks = [r.task for r in self._running.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.to_thread(self._backbones.close)

    def _check_ready(self) -> None:
        if self._stopping:
            raise UnavailableError("edged is shutting down")
        if not self._ready:
            raise UnavailableError("edged is starting: the model repository is still loading")

    # -- which models learn --------------------------------------------------------------

    def _trainable(self, model: str) -> tuple[ModelVersion, LearnSpec]:
        """The served version of a trainable model and its [learn] table.

        Raises:
            ModelNotFoundError, ModelNotReadyError: from the model manager.
            InvalidInputError: the model has no [learn] table.
        """
        if not model:
            raise InvalidInputError("'model' is empty")
        mv = self.manager.get(model)
        if mv.spec.learn is None:
            raise InvalidInputError(
                f"model '{model}' is not trainable: its model.toml has no [learn] table"
            )
        return mv, mv.spec.learn

    def trainable_models(self) -> list[str]:
        names = []
        for name in self.manager.models_on_disk():
            with contextlib.suppress(Exception):
                if read_model_spec(self.manager.repository / name).learn is not None:
                    names.append(name)
        return names

    # -- intake ----------------------------------------------------------------------------

    async def add_samples(
        self, model: str, inputs: Mapping[str, Array], labels: Array
    ) -> tuple[int, SampleCounts, JobRecord | None]:
        """Check, featurise and store labelled samples; returns (accepted, counts, the job
        this started or None).

        Raises:
            UnavailableError: learning is off, or edged is starting or stopping.
            ModelNotFoundError, ModelNotReadyError: no such model served.
            InvalidInputError: not trainable; inputs or labels wrong (named).
            OverloadedError: the store is full.
            ModelLoadError, ExecutorError: the backbone could not be loaded or run.
        """
        self._check_ready()
        mv, spec = self._trainable(model)
        count = validate_inputs(model, inputs, mv.signature)
        if mv.signature.max_batch_size == 0:
            count = next(iter(inputs.values())).shape[0] if inputs else 0
        labels = np.asarray(labels)
        if labels.ndim != 1 or labels.shape[0] != count:
            raise InvalidInputError(
                f"'labels' has {labels.size} entries for {count} samples; it needs one per "
                "sample (the inputs' batch axis)"
            )
        if count == 0:
            raise InvalidInputError("no samples: the inputs' batch axis is empty")
        if count > self.config.max_request_samples:
            raise InvalidInputError(
                f"{count} samples in one request; learn.max_request_samples allows "
                f"{self.config.max_request_samples}"
            )
        classes = _classes(mv)
        if not np.issubdtype(labels.dtype, np.integer):
            raise InvalidInputError(f"'labels' must be integers, got {labels.dtype}")
        bad = np.flatnonzero((labels < 0) | (labels >= classes))
        if bad.size:
            raise InvalidInputError(
                f"labels[{int(bad[0])}] = {int(labels[bad[0]])} is not a class of model "
                f"'{model}' (0 .. {classes - 1})"
            )
        path = mv.spec.path / str(mv.version) / spec.backbone
        kinds = (mv.kind, *mv.placement.candidates)  # where the version runs, then its fallbacks
        features = await asyncio.to_thread(
            self._backbones.features, model, path, spec.features, kinds, inputs
        )
        check_features(features, count, spec.features)
        counts = await asyncio.to_thread(self.store.add, model, features, labels.astype(np.int64))
        log.info("learn_samples_added", model=model, samples=count, pending=counts.pending)
        triggered = None
        trigger = self.config.trigger_samples
        if trigger and counts.pending >= trigger and model not in self._running:
            with contextlib.suppress(AlreadyExistsError, InvalidInputError):
                triggered = await self.start_job(model, trigger="trigger")
        return count, counts, triggered

    # -- jobs ------------------------------------------------------------------------------

    def running_jobs(self) -> dict[str, float]:
        """{model: progress} of the running jobs."""
        return {model: r.progress for model, r in dict(self._running).items()}

    def progress(self, job: JobRecord) -> float:
        running = self._running.get(job.model)
        if running is not None and running.record.id == job.id:
            return running.progress
        return job.progress

    async def start_job(
        self,
        model: str,
        strategy: str = "",
        *,
        wait: bool = False,
        trigger: str = "requested",
        candidate: Candidate | None = None,
    ) -> JobRecord:
        """Fine-tune ``model`` on its pending samples; with ``candidate`` (a head merged by a
        federation), judge and publish that head instead of training one.

        Raises:
            UnavailableError: learning is off, or edged is starting or stopping.
            ModelNotFoundError, ModelNotReadyError: no such model served.
            InvalidInputError: not trainable, unknown strategy, too few samples.
            AlreadyExistsError: a job of ``model`` is running.
            UnsupportedError: the onnx package (edged[learn], edged-learn) is not installed.
        """
        self._check_ready()
        mv, spec = self._trainable(model)
        strategy = strategy or spec.strategy
        if strategy not in LEARN_STRATEGIES:
            raise InvalidInputError(
                f"strategy {strategy!r} is not one of {', '.join(LEARN_STRATEGIES)}"
            )
        missing = worker.learn_support_missing()
        if missing is not None:
            raise UnsupportedError(missing)
        if model in self._running:
            raise AlreadyExistsError(
                f"fine-tune job {self._running[model].record.id} of '{model}' is running"
            )
        samples = await asyncio.to_thread(self.store.pending, model)
        held = int(samples.holdout.sum())
        if len(samples) < self.config.min_samples or held == 0 or held == len(samples):
            raise InvalidInputError(
                f"model '{model}' has {len(samples)} new samples ({held} held out); a "
                f"fine-tune needs learn.min_samples ({self.config.min_samples}), some of them "
                "held out and some to train on"
            )
        if model in self._running:  # raced while reading
            raise AlreadyExistsError(f"a fine-tune job of '{model}' is running")
        record = await asyncio.to_thread(self.store.begin_job, model, strategy, trigger, mv.version)
        log.info(
            "learn_job_started",
            job_id=record.id,
            model=model,
            strategy=strategy,
            samples=len(samples),
            parent_version=mv.version,
        )
        task = asyncio.ensure_future(self._run(record, mv, spec, samples, candidate))
        running = _Running(task, record)
        self._running[model] = running

        def finished(_: asyncio.Future[JobRecord]) -> None:
            if self._running.get(model) is running:
                del self._running[model]

        task.add_done_callback(finished)
        if wait:
            return await asyncio.shield(task)
        return record

    async def job(self, job_id: int) -> JobRecord:
        """Raises: NotFoundError-like ModelNotFoundError when there is no such job."""
        record = await asyncio.to_thread(self.store.job, job_id)
        if record is None:
            raise ModelNotFoundError(f"no fine-tune job {job_id}")
        return record

    async def jobs(self, model: str = "", limit: int = 0) -> list[JobRecord]:
        return await asyncio.to_thread(self.store.jobs, model, limit or self.config.history_limit)

    async def counts(self, model: str) -> SampleCounts:
        return await asyncio.to_thread(self.store.counts, model)

    async def all_counts(self, model: str = "") -> list[SampleCounts]:
        """The sample store of every trainable model (of ``model`` only, when given).

        Raises:
            ModelNotFoundError: ``model`` is not in the repository.
        """
        names = await asyncio.to_thread(self.trainable_models)
        if model:
            if model not in await asyncio.to_thread(self.manager.models_on_disk):
                raise ModelNotFoundError(f"unknown model '{model}'")
            names = [model]
        return [await self.counts(name) for name in names]

    async def _set(self, record: JobRecord, **changes: Any) -> JobRecord:
        after = await asyncio.to_thread(self.store.update_job, record.id, **changes)
        running = self._running.get(after.model)
        if running is not None and running.record.id == after.id:
            running.record = after
        if after.state is not record.state:
            key = (after.model, str(after.state))
            self.jobs_total = {**self.jobs_total, key: self.jobs_total.get(key, 0) + 1}
            level = log.warning if after.state is JobState.FAILED else log.info
            level(
                "learn_job_state",
                job_id=after.id,
                model=after.model,
                state=str(after.state),
                **({"verdict": after.verdict} if after.verdict else {}),
                **({"error": after.error} if after.error else {}),
                **({"new_version": after.new_version} if after.new_version else {}),
            )
        return after

    async def _run(
        self,
        record: JobRecord,
        mv: ModelVersion,
        spec: LearnSpec,
        samples: Samples,
        candidate: Candidate | None = None,
    ) -> JobRecord:
        job_dir = self.jobs_dir / str(record.id)
        try:
            metrics = await self._train(record, mv, spec, samples, job_dir, candidate)
            verdict = judge(metrics, self.config.max_old_drop, self.config.min_new_gain)
            if not verdict.passed:
                await asyncio.to_thread(
                    self.store.mark, samples.ids, SampleStatus.REJECTED, record.id
                )
                return await self._set(
                    record,
                    state=JobState.REJECTED,
                    progress=1.0,
                    metrics=metrics.to_dict(),
                    verdict=verdict.reason,
                )
            return await self._publish(record, mv, spec, samples, job_dir, metrics, verdict)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await asyncio.shield(
                    self._set(record, state=JobState.FAILED, error="edged stopped")
                )
            raise
        except Exception as e:
            log.warning("learn_job_failed", job_id=record.id, error=describe_error(e))
            return await self._set(record, state=JobState.FAILED, error=describe_error(e))
        finally:
            await asyncio.to_thread(shutil.rmtree, job_dir, True)

    async def _train(
        self,
        record: JobRecord,
        mv: ModelVersion,
        spec: LearnSpec,
        samples: Samples,
        job_dir: Path,
        candidate: Candidate | None = None,
    ) -> JobMetrics:
        version_dir = mv.spec.path / str(mv.version)
        task = Task(
            job_id=record.id,
            strategy=record.strategy,
            epochs=self.config.epochs,
            seed=self.config.seed + record.id,
            parent_version=mv.version,
            head=str(version_dir / spec.head),
            state=str(version_dir / spec.state),
            backbone=str(version_dir / spec.backbone),
            features=spec.features,
            inputs=tuple(
                InputSpec(t.name, t.datatype.value, tuple(mv.signature.client_shape(t)))
                for t in mv.signature.inputs
            ),
            files=VersionFiles(
                model=mv.spec.artifact_name,
                backbone=spec.backbone,
                head=spec.head,
                state=spec.state,
            ),
        )

        def prepare() -> None:
            shutil.rmtree(job_dir, ignore_errors=True)
            job_dir.mkdir(parents=True)
            task.write(job_dir)
            train = ~samples.holdout
            write_npz(
                job_dir / worker.SAMPLES_FILE,
                {
                    "x_train": samples.features[train],
                    "y_train": samples.labels[train],
                    "x_holdout": samples.features[samples.holdout],
                    "y_holdout": samples.labels[samples.holdout],
                },
            )
            if candidate is not None:
                shutil.copyfile(candidate.head, job_dir / worker.CANDIDATE_FILE)
                (job_dir / worker.LINEAGE_EXTRA_FILE).write_text(json.dumps(candidate.lineage))

        def progress(fraction: float) -> None:
            running = self._running.get(record.model)
            if running is not None and running.record.id == record.id:
                running.progress = fraction

        config = self.config
        limits = Limits(
            memory_mb=config.job_memory_mb,
            cpu_s=config.job_timeout_s,
            wall_s=config.job_timeout_s,
            nice=config.job_nice,
        )
        await asyncio.to_thread(prepare)
        await run_process(
            [sys.executable, "-m", "edged.learn.worker", str(job_dir)], limits, progress
        )
        return await asyncio.to_thread(JobMetrics.read, job_dir)

    async def _publish(
        self,
        record: JobRecord,
        mv: ModelVersion,
        spec: LearnSpec,
        samples: Samples,
        job_dir: Path,
        metrics: JobMetrics,
        verdict: Verdict,
    ) -> JobRecord:
        model = record.model
        served = self.manager.get(model)
        if served.version != mv.version:
            raise RuntimeError(
                f"model '{model}' moved from version {mv.version} to {served.version} during "
                "the job; the candidate was trained on the old one"
            )
        committed = self.updates.committed.get(model) or mv.version
        on_disk = await asyncio.to_thread(available_versions, mv.spec.path)
        version = max([committed, *on_disk]) + 1
        # tag the samples, so that a restart can settle them with the update's outcome
        await asyncio.to_thread(self.store.mark, samples.ids, SampleStatus.PENDING, record.id)
        record = await self._set(
            record,
            state=JobState.PUBLISHING,
            progress=1.0,
            metrics=metrics.to_dict(),
            verdict=verdict.reason,
            new_version=version,
        )
        out = job_dir / worker.OUT_DIR
        names = [mv.spec.artifact_name, spec.backbone, spec.head, spec.state, LINEAGE_FILE]
        files = {name: out / name for name in names}
        data = await asyncio.to_thread(read_npz, out / worker.SELFTEST_FILE)
        test = SelfTest(
            inputs={k.removeprefix("input."): v for k, v in data.items() if k.startswith("input.")},
            expected={
                k.removeprefix("expected."): v for k, v in data.items() if k.startswith("expected.")
            },
            rtol=1e-3,
            atol=1e-5,
        )

        async def started(update: Any) -> None:
            nonlocal record
            record = await self._set(record, update_id=update.id)

        update = await self.updates.publish_local(
            model, version, files, test, requested=f"fine-tune job {record.id}", on_start=started
        )
        if update.state is State.COMMITTED:
            await asyncio.to_thread(self.store.mark_job, record.id, SampleStatus.LEARNED)
            return await self._set(record, state=JobState.PROMOTED)
        return await self._set(
            record,
            state=JobState.FAILED,
            error=f"version {version} ended {update.state}: {update.error}",
        )


def _classes(mv: ModelVersion) -> int:
    """The number of classes: the last dim of the model's first FP output."""
    for spec in mv.signature.outputs:
        dims = mv.signature.client_shape(spec)
        if dims and dims[-1] > 0 and spec.datatype.value.startswith("FP"):
            return int(dims[-1])
    raise InvalidInputError(f"model '{mv.name}' has no class-probability output")
