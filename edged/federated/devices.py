"""The device's side of a federation, in the daemon: one Flower client process per model that
takes part (``edged.federated.client``, run by the federated environment's interpreter under
the learning worker's limits, ``edged.learn.runner``), started again ``federated.retry_s``
after each session. A session's input is the model's waiting samples (features and labels,
as a fine-tune job gets them) and its served head and state; its output, the head the
federation merged in its last round, becomes a fine-tune job's candidate
(``LearnManager.start_job(candidate=...)``): the same gate, the same update path, lineage
with the round, the strategy and the participant count. A candidate the gate rejects leaves
the device's own head serving."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
from pathlib import Path

import structlog

from edged.config import FederatedConfig
from edged.core.errors import EdgedError
from edged.federated.session import MERGED_FILE, SAMPLES_FILE, MergedInfo, Session, default_python
from edged.learn.head import write_npz
from edged.learn.jobs import Candidate, LearnManager
from edged.learn.runner import Limits, run_process
from edged.learn.store import JobRecord
from edged.ota.errors import describe_error

log = structlog.get_logger("edged.federated")


class FederatedClients:
    """Supervises the Flower clients of the models that take part."""

    def __init__(self, learn: LearnManager, config: FederatedConfig) -> None:
        self.learn = learn
        self.config = config
        # beside the fine-tune jobs' folders: <state_dir>/learn/federated/<model>/
        self.sessions_dir = learn.jobs_dir.parent / "federated"
        self.python = config.python or default_python()
        self.device_id = config.device_id or socket.gethostname()
        self._tasks: dict[str, asyncio.Task[None]] = {}
        #: the jobs federations started, newest last (for tests and logs)
        self.jobs: list[JobRecord] = []

    def models(self) -> list[str]:
        return list(self.config.models) or self.learn.trainable_models()

    async def start(self) -> None:
        models = await asyncio.to_thread(self.models)
        for model in models:
            self._tasks[model] = asyncio.ensure_future(self._loop(model))
        log.info(
            "federated_started",
            models=models,
            server=self.config.server,
            device_id=self.device_id,
            tls=not self.config.insecure,
        )

    async def stop(self) -> None:
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()

    async def _loop(self, model: str) -> None:
        while True:
            try:
                await self.session(model)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.warning("federated_session_failed", model=model, error=describe_error(e))
            await asyncio.sleep(self.config.retry_s)

    def _prepare(self, model: str, folder: Path) -> int:
        """Write the session folder; returns the number of training samples."""
        mv = self.learn.manager.get(model)
        spec = mv.spec.learn
        if spec is None:
            raise EdgedError(f"model '{model}' is not trainable: its model.toml has no [learn]")
        samples = self.learn.store.pending(model)
        train = ~samples.holdout
        if not train.any():
            return 0
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        version_dir = mv.spec.path / str(mv.version)
        write_npz(
            folder / SAMPLES_FILE,
            {
                "x_train": samples.features[train],
                "y_train": samples.labels[train],
                "x_holdout": samples.features[samples.holdout],
                "y_holdout": samples.labels[samples.holdout],
            },
        )
        Session(
            model=model,
            server=self.config.server,
            root_certificates=self.config.root_certificates,
            insecure=self.config.insecure,
            device_id=self.device_id,
            token_file=self.config.token_file,
            strategy=spec.strategy,
            seed=self.learn.config.seed,
            head=str(version_dir / spec.head),
            state=str(version_dir / spec.state),
            max_wait_s=self.config.session_timeout_s,
        ).write(folder)
        return int(train.sum())

    async def session(self, model: str) -> JobRecord | None:
        """One Flower session of ``model``; the job that judged the merged head, or None
        (nothing to train on, or no final round reached this device)."""
        folder = self.sessions_dir / model
        count = await asyncio.to_thread(self._prepare, model, folder)
        if count == 0:
            log.info("federated_no_samples", model=model)
            return None
        config = self.learn.config
        limits = Limits(
            memory_mb=config.job_memory_mb,
            cpu_s=self.config.session_timeout_s,
            wall_s=self.config.session_timeout_s + 60,
            nice=config.job_nice,
        )
        log.info("federated_session_started", model=model, samples=count)
        argv = [self.python, "-m", "edged.federated.client", str(folder)]
        try:  # the runner's own wall limit (a minute later) only backs this one up
            await asyncio.wait_for(
                run_process(argv, limits, lambda _: None), self.config.session_timeout_s
            )
        except TimeoutError:  # an idle client is started afresh, its samples re-read
            log.info(
                "federated_session_ended",
                model=model,
                merged=False,
                reason=f"federated.session_timeout_s ({self.config.session_timeout_s:g} s)",
            )
            return None
        return await self._promote(model, folder)

    async def _promote(self, model: str, folder: Path) -> JobRecord | None:
        if not (folder / MERGED_FILE).exists():
            log.info("federated_session_ended", model=model, merged=False)
            return None
        info = await asyncio.to_thread(MergedInfo.read, folder)
        if info.round < info.rounds:
            log.warning(
                "federated_session_ended",
                model=model,
                merged=False,
                reason=f"the last merged head is of round {info.round} of {info.rounds}",
            )
            return None
        candidate = Candidate(
            head=folder / MERGED_FILE,
            lineage={
                "federated": {
                    "round": info.round,
                    "rounds": info.rounds,
                    "strategy": info.strategy,
                    "participants": info.participants,
                    "server": self.config.server,
                }
            },
        )
        try:
            record = await self.learn.start_job(
                model, wait=True, trigger="federated", candidate=candidate
            )
        finally:
            with contextlib.suppress(OSError):
                (folder / MERGED_FILE).unlink()
        self.jobs.append(record)
        log.info(
            "federated_candidate_judged",
            model=model,
            job_id=record.id,
            state=str(record.state),
            verdict=record.verdict,
            round=info.round,
            strategy=info.strategy,
            participants=info.participants,
        )
        return record
