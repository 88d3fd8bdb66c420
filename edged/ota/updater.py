"""The OTA updater: the I/O around the rules of ``edged.ota.state``.

``UpdateManager`` runs one update at a time per model::

    DOWNLOADING  refresh TUF metadata, check the signed target, free space, download (TUF
                 checks length and hashes)                                        -> VERIFIED
    VERIFIED     scan and unpack the bundle into <repo>/<model>/.ota-staging/, check
                 bundle.toml against the request and model.toml, install the artifacts as
                 <repo>/<model>/<version>/ (edged.serving.versions.install_version) -> STAGED
    STAGED       persist WARMING, then ask serving to serve the new version:
                 ModelManager.serve(model, [new], gate=self-test) loads it beside the served
                 one, runs the bundle's self-test on it, writes ACTIVE, switches -> ACTIVE_TRIAL
                 (refused: nothing switched, ACTIVE untouched; the old version never stopped)
    ACTIVE_TRIAL watch the new version's statistics for ota.health_window_s      -> COMMITTED
                 or ROLLING_BACK: ModelManager.serve(model, [committed])         -> ROLLED_BACK

Every state is persisted (``edged.ota.store``, fsynced) before the next stage starts, and
``recover`` — run at start-up before the repository loads — finishes or undoes whatever a crash
interrupted, so the daemon always starts on a committed version. Stages that do file or network
I/O run on worker threads; the event loop only sequences them.

Bundles come from an injected ``edged.ota.tuf_client.BundleSource`` (the daemon's ``TufClient``;
a simulated repository in tests), the checks of a signed target and of an unpacked bundle are
pure rules in ``edged.ota.targets`` and ``edged.ota.bundle``, and the values handed to callers
are in ``edged.ota.types``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import shutil
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from edged.config import OtaConfig
from edged.core.errors import (
    AlreadyExistsError,
    EdgedError,
    InvalidInputError,
    ModelLoadError,
    ModelNotFoundError,
    UnavailableError,
)
from edged.core.types import Array, InferRequest
from edged.ota import archive, bundle
from edged.ota.errors import OtaError, describe_error
from edged.ota.state import (
    AT_REST,
    Event,
    HealthPolicy,
    HealthSample,
    Kind,
    Recovery,
    State,
    Transition,
    UpdateRecord,
    Verdict,
    advance,
    check_requested_version,
    committed_after,
    judge_health,
    recovery_for,
    recovery_reason,
    rollback_target,
    rollback_version,
)
from edged.ota.store import UpdateStore
from edged.ota.tuf_client import BundleSource
from edged.ota.types import ModelStatus, OptimizeCheck, SelfTest, StartResult
from edged.serving.manager import ModelManager
from edged.serving.model import ModelVersion, Sample
from edged.serving.repository import read_model_spec
from edged.serving.stats import ModelStats
from edged.serving.versions import (
    available_versions,
    clear_staging,
    install_version,
    parse_version,
    pin_active,
    remove_version,
    staging_dir,
    write_active,
)

log = structlog.get_logger("edged.ota")


def _versions(version: int | None) -> list[int] | None:
    """What ACTIVE names to serve ``version`` (None: no ACTIVE, the version policy decides)."""
    return None if version is None else [version]


# -- the statistics the health window reads --------------------------------------------------


def health_sample(stats: ModelStats) -> HealthSample:
    """A consistent copy of what ``stats`` counted so far."""
    snapshot = stats.snapshot("", 0)
    return HealthSample(
        successes=snapshot.success.count,
        failures_by_error=snapshot.failures_by_error,
        latency_bounds=snapshot.request_seconds.bounds,
        latency_counts=tuple(snapshot.request_seconds.counts),
    )


# -- the manager -----------------------------------------------------------------------------


@dataclass
class _Running:
    task: asyncio.Task[UpdateRecord]
    record: UpdateRecord
    abort: asyncio.Event = field(default_factory=asyncio.Event)
    abort_reason: str = ""


class _SelfTestGate:
    """The gate (``edged.serving.swap.Gate``) serving runs on a new version, loaded beside
    the served one, before it takes traffic: the bundle's self-test, or
    else the served version's reference sample (neither: nothing to test, it passes).
    ``refusal`` keeps the first error that refused it."""

    def __init__(
        self,
        record: UpdateRecord,
        version: int,
        test: SelfTest | None,
        reference: tuple[Sample, dict[str, Array]] | None,
        slack: tuple[float, float] = (0.0, 0.0),
    ) -> None:
        """``slack``: ota.optimize_agreement_slack and ota.optimize_error_slack, for the
        check of an optimised variant (``test.optimize``)."""
        self.record = record
        self.version = version
        self.test = test
        self.reference = reference
        self.slack = slack
        self.refusal: BaseException | None = None

    async def __call__(self, mv: ModelVersion) -> None:
        test, reference = self.test, self.reference
        if test is not None:
            inputs = dict(test.inputs)
        elif reference is not None:
            inputs = dict(reference[0].inputs)
        else:
            return
        try:
            response = await mv.infer(
                InferRequest(
                    model_name=self.record.model,
                    inputs=inputs,
                    model_version=str(self.version),
                    id=f"ota-selftest-{self.record.id}",
                )
            )
            if test is not None:
                bundle.check_selftest(test.expected, response.outputs, test.rtol, test.atol)
                if test.optimize is not None:
                    await self._check_optimized(mv, test.optimize)
            else:
                assert reference is not None
                bundle.check_like_reference(reference[1], response.outputs)
        except Exception as e:
            if self.refusal is None:
                self.refusal = e
            raise ModelLoadError(f"self-test failed: {describe_error(e)}") from e

    async def _check_optimized(self, mv: ModelVersion, check: OptimizeCheck) -> None:
        """Run the variant on the check set through its own executor (as many rows per
        request as the model batches) and hold its outputs against the parent's."""
        evidence = check.evidence
        rows = int(next(iter(check.inputs.values())).shape[0])
        step = mv.signature.max_batch_size if mv.signature.max_batch_size > 0 else 1
        parts: list[Array] = []
        complete = True
        for start in range(0, rows, step):
            response = await mv.infer(
                InferRequest(
                    model_name=self.record.model,
                    inputs={k: v[start : start + step] for k, v in check.inputs.items()},
                    model_version=str(self.version),
                    id=f"ota-optimize-check-{self.record.id}-{start}",
                    requested_outputs=(evidence.output,),
                )
            )
            if evidence.output not in response.outputs:
                complete = False  # check_optimized names what is missing
                break
            parts.append(response.outputs[evidence.output])
        outputs = {evidence.output: np.concatenate(parts)} if complete and parts else {}
        labels = {"model": self.record.model, "version": self.version, "method": evidence.method}
        try:
            drift = bundle.check_optimized(evidence, check.parent, outputs, *self.slack)
        except Exception as e:
            log.warning("ota_optimize_check_failed", **labels, reason=describe_error(e))
            raise
        log.info(
            "ota_optimize_check",
            **labels,
            samples=rows,
            agreement=round(drift.agreement, 6),
            recorded_agreement=evidence.agreement,
            rel_l2_error=round(drift.rel_l2_error, 6),
            recorded_rel_l2_error=evidence.rel_l2_error,
        )


class _Aborted(Exception):
    """A Rollback asked a running update to stop."""


class UpdateManager:
    """Over-the-air updates of the models one ModelManager serves."""

    def __init__(
        self,
        manager: ModelManager,
        config: OtaConfig,
        store: UpdateStore,
        *,
        tuf: BundleSource | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        """``tuf``: where bundles come from (the daemon passes a ``TufClient`` when
        ota.repository_url is set; None: StartUpdate is off, Rollback and fine-tune publication
        still work). ``clock`` stamps the records; ``monotonic`` times the health window."""
        self.manager = manager
        self.config = config
        self.store = store
        self.repository = manager.repository
        self.tuf = tuf
        self.policy = HealthPolicy(
            window_s=config.health_window_s,
            min_requests=config.health_min_requests,
            max_error_rate=config.max_error_rate,
            max_p99_s=config.max_p99_ms / 1000.0,
        )
        self._clock = clock
        self._monotonic = monotonic
        self._running: dict[str, _Running] = {}
        self._poller: asyncio.Task[None] | None = None
        self._ready = False
        self._stopping = False
        # read by the metrics collector from its own thread: replaced, never mutated in place
        self.latest: dict[str, UpdateRecord] = {}
        self.committed: dict[str, int | None] = {}
        self.transitions_total: dict[tuple[str, str], int] = {}
        self.last_swap_seconds: dict[str, float] = {}
        self.poll_failures = 0
        self.last_poll_success = 0.0

    # -- start-up and shutdown -----------------------------------------------------------

    def recover(self) -> list[tuple[UpdateRecord, Recovery]]:
        """Finish or undo what a crash interrupted, before the repository is loaded: remove
        staging leftovers; an update that never served is discarded (ACTIVE back to the
        committed version, FAILED); one on trial, or a rollback under way, ends ROLLED_BACK on
        the version it goes back to. Blocking: call from a worker thread."""
        done = []
        for latest in self.store.latest_all():
            record = latest
            model_dir = self.repository / record.model
            if model_dir.is_dir():
                clear_staging(model_dir)
            action = recovery_for(record)
            if action is not Recovery.NOTHING:
                log.warning(
                    "ota_recovery",
                    model=record.model,
                    state=str(record.state),
                    action=str(action),
                    from_version=record.from_version,
                    to_version=record.to_version,
                )
                record = self._recover_one(record, action, model_dir)
            done.append((record, action))
        for name in self.manager.models_on_disk():
            clear_staging(self.repository / name)
        self.latest = {r.model: r for r in self.store.latest_all()}
        self.committed = self.store.committed_all()
        return done

    def _recover_one(self, record: UpdateRecord, action: Recovery, model_dir: Path) -> UpdateRecord:
        reason = recovery_reason(record)
        if action is Recovery.DISCARD:
            self._discard_files(record)
            return self._save_sync(record, Event.FAIL, reason)
        if action is Recovery.ROLL_BACK:
            record = self._save_sync(record, Event.ROLLBACK, reason)
        # ROLL_BACK and FINISH_ROLLBACK: ACTIVE to the target; load_all serves it next
        write_active(model_dir, _versions(rollback_target(record)))
        if record.kind is not Kind.ROLLBACK and record.installed and record.to_version is not None:
            remove_version(model_dir, record.to_version)
        return self._save_sync(record, Event.ROLLED_BACK)

    def _save_sync(self, record: UpdateRecord, event: Event, reason: str = "") -> UpdateRecord:
        after = advance(record, event, self._clock(), reason=reason)
        self.store.save(record, after, reason)
        self._published(record, after, reason)
        return after

    async def start(self) -> None:
        """Take requests (after ``recover`` and the repository load); start polling when
        ota.poll_interval_s is set."""
        self._ready = True
        if self.tuf is not None and self.config.poll_interval_s > 0:
            self._poller = asyncio.create_task(self._poll())

    async def stop(self) -> None:
        """Stop polling and cancel running updates; each stays in its persisted state, which
        the next start-up recovers from."""
        self._stopping = True
        self._ready = False
        tasks: list[asyncio.Task[Any]] = [r.task for r in self._running.values()]
        if self._poller is not None:
            tasks.append(self._poller)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _check_ready(self) -> None:
        if self._stopping:
            raise UnavailableError("edged is shutting down")
        if not self._ready:
            raise UnavailableError("edged is starting: the model repository is still loading")

    # -- reads -----------------------------------------------------------------------------

    async def status(self, model: str = "") -> list[ModelStatus]:
        """Each model's latest update and committed version (``model``: just that one).

        Raises:
            ModelNotFoundError: ``model`` is neither in the repository nor known to OTA.
        """
        records = await asyncio.to_thread(self.store.latest_all)
        committed = await asyncio.to_thread(self.store.committed_all)
        names = set(await asyncio.to_thread(self.manager.models_on_disk))
        by_model = {r.model: r for r in records}
        names |= set(by_model)
        if model:
            if model not in names:
                raise ModelNotFoundError(f"unknown model '{model}'")
            names = {model}
        result = []
        for name in sorted(names):
            record = by_model.get(name)
            served = self._served_version(name)
            result.append(
                ModelStatus(
                    name,
                    record.state if record else State.IDLE,
                    committed.get(name, served),
                    record,
                )
            )
        return result

    async def history(
        self, model: str = "", limit: int = 100
    ) -> list[tuple[ModelStatus, list[Transition]]]:
        """Past updates newest first, each with the states it passed."""

        def read() -> list[tuple[ModelStatus, list[Transition]]]:
            return [
                (
                    ModelStatus(r.model, r.state, committed_after(r), r),
                    self.store.transitions(r.id),
                )
                for r in self.store.history(model, limit)
            ]

        return await asyncio.to_thread(read)

    def _served_version(self, model: str) -> int | None:
        try:
            return self.manager.get(model).version
        except EdgedError:  # unknown, or not serving (loading, failed)
            return None

    async def _committed_version(self, model: str) -> int | None:
        committed = await asyncio.to_thread(self.store.committed, model)
        return committed if committed is not None else self._served_version(model)

    # -- StartUpdate -----------------------------------------------------------------------

    async def start_update(
        self, model: str, version: str = "latest", *, wait: bool = False
    ) -> StartResult:
        """Update ``model`` to ``version`` (a number, or "latest") from the TUF repository.

        Raises:
            UnavailableError: OTA is off, or the repository cannot be reached or verified
                while resolving "latest".
            ModelNotFoundError: no such model folder, or no such version in the repository.
            InvalidInputError: ``version`` is not a version number, or is below the
                committed version.
            AlreadyExistsError: an update of ``model`` is in progress.
        """
        self._check_ready()
        if self.tuf is None:
            raise UnavailableError("over-the-air updates are off: ota.repository_url is empty")
        await self._check_model(model)
        self._check_idle(model)
        committed = await self._committed_version(model)
        requested = version.strip().lower() or "latest"
        if requested == "latest":
            try:
                available = await asyncio.to_thread(self.tuf.versions)
            except Exception as e:
                raise UnavailableError(
                    f"cannot resolve 'latest' from the TUF repository: {describe_error(e)}"
                ) from e
            versions = available.get(model, {})
            if not versions:
                raise ModelNotFoundError(f"the TUF repository has no bundle of model '{model}'")
            number = max(versions)
            if committed is not None and number <= committed:
                return StartResult(
                    await self._one_status(model),
                    False,
                    f"version {committed} is committed; the repository's latest is {number}",
                )
        else:
            parsed = parse_version(requested)
            if parsed is None:
                raise InvalidInputError(
                    f"version '{version}' is neither a version number nor 'latest'"
                )
            number = parsed
            why = check_requested_version(number, committed, rollback=False)
            if why and number == committed:
                return StartResult(await self._one_status(model), False, why)
            if why:
                raise InvalidInputError(why)
        self._check_idle(model)
        record = await self._begin(model, Kind.UPDATE, requested, committed, number)
        await self._launch(record, self._update(record), wait)
        return StartResult(await self._one_status(model), True)

    async def _begin(
        self, model: str, kind: Kind, requested: str, committed: int | None, version: int
    ) -> UpdateRecord:
        """Record a new update (DOWNLOADING) and publish its first state.

        Raises:
            AlreadyExistsError: the store refused it (an update of ``model`` is in progress).
        """
        try:
            record = await asyncio.to_thread(
                self.store.begin,
                model,
                kind,
                requested=requested,
                from_version=committed,
                to_version=version,
                at=self._clock(),
            )
        except Exception as e:
            raise AlreadyExistsError(f"cannot start an update of '{model}': {e}") from e
        self._published(None, record)
        return record

    async def _check_model(self, model: str) -> None:
        names = await asyncio.to_thread(self.manager.models_on_disk)
        if model not in names:
            raise ModelNotFoundError(f"model '{model}' is not in the model repository")

    def _check_idle(self, model: str) -> None:
        running = self._running.get(model)
        if running is not None:
            raise AlreadyExistsError(
                f"an update of '{model}' is in progress ({running.record.state}, to version "
                f"{running.record.to_version})"
            )

    async def _one_status(self, model: str) -> ModelStatus:
        return (await self.status(model))[0]

    async def _launch(
        self, record: UpdateRecord, work: Awaitable[UpdateRecord], wait: bool
    ) -> asyncio.Future[UpdateRecord]:
        task = asyncio.ensure_future(work)
        running = _Running(task, record)
        self._running[record.model] = running

        def finished(_: asyncio.Future[UpdateRecord]) -> None:
            if self._running.get(record.model) is running:
                del self._running[record.model]

        task.add_done_callback(finished)
        if wait:
            await asyncio.shield(task)
        return task

    # -- Rollback --------------------------------------------------------------------------

    async def rollback(self, model: str, version: str = "", *, wait: bool = False) -> ModelStatus:
        """Go back to an earlier version: abort a running update (a trial rolls back, an
        update not yet serving fails), or return from the committed version to ``version``
        (default: the highest version folder below it).

        Raises:
            ModelNotFoundError: no such model, or no such (earlier) version folder.
            InvalidInputError: ``version`` is not a number or not below the committed one.
            AlreadyExistsError: a rollback is already under way.
        """
        self._check_ready()
        await self._check_model(model)
        running = self._running.get(model)
        if running is not None:
            if running.record.kind is Kind.ROLLBACK or running.abort.is_set():
                raise AlreadyExistsError(f"a rollback of '{model}' is under way")
            if version and parse_version(version) != running.record.from_version:
                raise InvalidInputError(
                    f"an update of '{model}' is in progress; it can only go back to "
                    f"version {running.record.from_version}"
                )
            running.abort_reason = "rollback requested"
            running.abort.set()
            if wait:
                await asyncio.shield(running.task)
            return await self._one_status(model)
        committed = await self._committed_version(model)
        model_dir = self.repository / model
        available = await asyncio.to_thread(available_versions, model_dir)
        if version:
            target = parse_version(version)
            if target is None:
                raise InvalidInputError(f"version '{version}' is not a version number")
            if target not in available:
                raise ModelNotFoundError(f"model '{model}' has no version {target} folder")
        else:
            target = rollback_version(available, committed)
            if target is None:
                raise ModelNotFoundError(
                    f"model '{model}' has no version folder below the committed version "
                    f"{committed} to roll back to"
                )
        why = check_requested_version(target, committed, rollback=True)
        if why:
            raise InvalidInputError(why)
        self._check_idle(model)
        record = await asyncio.to_thread(
            self.store.begin,
            model,
            Kind.ROLLBACK,
            requested=str(target),
            from_version=committed,
            to_version=target,
            at=self._clock(),
            reason="rollback requested",
        )
        self._published(None, record, "rollback requested")
        await self._launch(record, self._roll_back(record), wait)
        return await self._one_status(model)

    # -- versions made on the device ------------------------------------------------------

    async def publish_local(
        self,
        model: str,
        version: int,
        files: Mapping[str, Path],
        test: SelfTest,
        *,
        requested: str,
        on_start: Callable[[UpdateRecord], Awaitable[None]] | None = None,
    ) -> UpdateRecord:
        """Serve ``files`` (name -> file; copied, never moved) as ``version`` of ``model``
        through the path an update takes from its download on: version folder, self-test,
        switch, health window, commit or roll back. ``on_start`` runs once the update record
        exists (a fine-tune job records its id). Returns the record at rest.

        Raises:
            UnavailableError: edged is starting or stopping.
            ModelNotFoundError: no such model folder.
            InvalidInputError: ``version`` is not above the committed version.
            AlreadyExistsError: an update of ``model`` is in progress.
        """
        self._check_ready()
        await self._check_model(model)
        self._check_idle(model)
        committed = await self._committed_version(model)
        if committed is not None and version <= committed:
            raise InvalidInputError(
                f"version {version} is not above the committed version {committed}"
            )
        record = await self._begin(model, Kind.FINE_TUNE, requested, committed, version)
        if on_start is not None:
            await on_start(record)
        stage = functools.partial(self._stage_local, files=files, test=test)
        task = await self._launch(record, self._run(record, stage), wait=True)
        return task.result()

    # -- the stages ------------------------------------------------------------------------

    async def _advance(
        self, record: UpdateRecord, event: Event, reason: str = "", **changes: object
    ) -> UpdateRecord:
        """Persist the transition (fsynced), then tell logs and metrics; only then may the
        next stage start."""
        after = advance(record, event, self._clock(), reason=reason, **changes)
        await asyncio.to_thread(self.store.save, record, after, reason)
        self._published(record, after, reason)
        running = self._running.get(after.model)
        if running is not None:
            running.record = after
        await self._pause(after)
        return after

    async def _pause(self, record: UpdateRecord) -> None:
        """The fault-injection aid (ota.pause_after_state): sleep once ``record.state`` is
        persisted, so a test can kill the daemon there."""
        if self.config.pause_after_state == record.state and self.config.pause_s > 0:
            log.warning(
                "ota_paused",
                model=record.model,
                state=str(record.state),
                seconds=self.config.pause_s,
            )
            await asyncio.sleep(self.config.pause_s)

    def _published(
        self, before: UpdateRecord | None, after: UpdateRecord, reason: str = ""
    ) -> None:
        self.latest = {**self.latest, after.model: after}
        self.committed = {**self.committed, after.model: committed_after(after)}
        key = (after.model, str(after.state))
        self.transitions_total = {
            **self.transitions_total,
            key: self.transitions_total.get(key, 0) + 1,
        }
        level = log.warning if after.state in (State.FAILED, State.ROLLING_BACK) else log.info
        level(
            "ota_state",
            model=after.model,
            update_id=after.id,
            kind=str(after.kind),
            state=str(after.state),
            previous=str(before.state) if before else None,
            from_version=after.from_version,
            to_version=after.to_version,
            committed_version=committed_after(after),
            **({"reason": reason} if reason else {}),
        )

    def _check_abort(self, model: str) -> None:
        running = self._running.get(model)
        if running is not None and running.abort.is_set():
            raise _Aborted(running.abort_reason)

    async def _update(self, record: UpdateRecord) -> UpdateRecord:
        """DOWNLOADING -> ... -> COMMITTED, ROLLED_BACK or FAILED."""
        return await self._run(record, self._fetch_and_stage)

    async def _fetch_and_stage(self, record: UpdateRecord) -> tuple[UpdateRecord, SelfTest | None]:
        """The stage of a bundle from the repository: DOWNLOADING -> VERIFIED -> STAGED."""
        record = await self._download(record)
        self._check_abort(record.model)
        return await self._stage(record)

    async def _stage_local(
        self, record: UpdateRecord, *, files: Mapping[str, Path], test: SelfTest
    ) -> tuple[UpdateRecord, SelfTest]:
        """The stage of a version made on the device: DOWNLOADING -> VERIFIED (nothing to
        fetch) -> STAGED (``files`` copied into the version folder)."""
        record = await self._advance(record, Event.FETCHED, target_path="")
        self._check_abort(record.model)
        installed = await asyncio.to_thread(self._copy_in, record, files)
        return await self._advance(record, Event.UNPACKED, installed=installed), test

    def _copy_in(self, record: UpdateRecord, files: Mapping[str, Path]) -> bool:
        """Copy ``files`` into staging, then install them as the record's version folder;
        whether a folder was created. Blocking."""
        assert record.to_version is not None
        model_dir = self.repository / record.model
        folder = staging_dir(model_dir) / f"fine-tune-{record.id}"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        staged = {}
        for name, src in files.items():
            shutil.copyfile(src, folder / name)
            staged[name] = folder / name
        pin_active(model_dir, _versions(record.from_version))
        return install_version(model_dir, record.to_version, staged)

    async def _run(
        self,
        record: UpdateRecord,
        stage: Callable[[UpdateRecord], Awaitable[tuple[UpdateRecord, SelfTest | None]]],
    ) -> UpdateRecord:
        """From DOWNLOADING: ``stage`` puts the version folder in place (-> STAGED), then
        the one path every new version takes: load, self-test, switch, health window, commit
        or roll back."""
        model_dir = self.repository / record.model
        try:
            await self._pause(record)  # DOWNLOADING was persisted by store.begin
            record, test = await stage(record)
            self._check_abort(record.model)
            record = await self._activate(record, test)
            if record.state is State.ACTIVE_TRIAL:
                record = await self._trial(record)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            # the stage that failed may have advanced the record: carry on from what is
            # persisted, not from this function's last copy
            record = await self._stored(record)
            if isinstance(e, _Aborted):
                reason = str(e)
            else:
                reason = describe_error(e)
                log.warning(
                    "ota_stage_failed", model=record.model, state=str(record.state), error=reason
                )
            record = await self._settle(record, reason)
        finally:
            await asyncio.to_thread(clear_staging, model_dir)
        return record

    async def _stored(self, record: UpdateRecord) -> UpdateRecord:
        """``record`` as last persisted (the store is the truth; a stage advances its own
        copy), or ``record`` itself if the store cannot say."""
        try:
            stored = await asyncio.to_thread(self.store.get, record.id)
        except Exception as e:
            log.warning("ota_state_unreadable", model=record.model, error=describe_error(e))
            return record
        return stored if stored is not None else record

    async def _settle(self, record: UpdateRecord, reason: str) -> UpdateRecord:
        """Bring an update that failed in any stage to a terminal state (FAILED or
        ROLLED_BACK), so that the model is free for the next update. Undoing is tried twice,
        from the persisted state each time; what fails is logged and added to the reason."""
        for _ in range(2):
            try:
                return await self._fail(record, reason)
            except Exception as e:
                log.exception(
                    "ota_undo_failed",
                    model=record.model,
                    state=str(record.state),
                    error=describe_error(e),
                )
                reason = f"{reason}; undoing it failed: {describe_error(e)}"
                record = await self._stored(record)
                if record.state in AT_REST:
                    return record
        return record

    async def _fail(self, record: UpdateRecord, reason: str) -> UpdateRecord:
        """Undo an update that went wrong in ``record.state``."""
        if record.state is State.ACTIVE_TRIAL:
            return await self._roll_back(await self._advance(record, Event.ROLLBACK, reason))
        if record.state is State.ROLLING_BACK:
            return await self._advance(record, Event.FAIL, f"rollback failed: {reason}")
        if record.state in AT_REST:
            return record
        await self._discard(record)
        return await self._advance(record, Event.FAIL, reason)

    async def _discard(self, record: UpdateRecord) -> None:
        """Undo, while serving runs, an update that never recorded its switch: the version
        folder it installed goes. Serving wrote ACTIVE only if it switched (and then the
        SWITCHED record was lost): only then is it asked to serve the committed version
        again, through its swap."""
        model_dir = self.repository / record.model
        to_version = record.to_version
        switched = (
            record.state is State.WARMING
            and to_version is not None
            and self._served_version(record.model) == to_version
        )
        if switched and record.from_version is not None:
            await self.manager.serve(record.model, [record.from_version])
        if record.installed and to_version is not None:
            await asyncio.to_thread(remove_version, model_dir, to_version)
        if switched and record.from_version is None:
            await self.manager.serve(record.model, None)  # the version policy, folder gone

    def _discard_files(self, record: UpdateRecord) -> None:
        """At start-up, before anything serves: undo the files of an update that never
        served: ACTIVE back to the committed version (once it may have been rewritten), the
        version folder it installed removed. Blocking."""
        model_dir = self.repository / record.model
        if record.state in (State.STAGED, State.WARMING):
            write_active(model_dir, _versions(record.from_version))
        if record.installed and record.to_version is not None:
            remove_version(model_dir, record.to_version)

    async def _download(self, record: UpdateRecord) -> UpdateRecord:
        assert self.tuf is not None
        assert record.to_version is not None
        spec = await asyncio.to_thread(read_model_spec, self.repository / record.model)
        local = await asyncio.to_thread(
            self.tuf.fetch, record.model, record.to_version, spec.format, self.config.min_free_bytes
        )
        return await self._advance(record, Event.FETCHED, target_path=str(local))

    async def _stage(self, record: UpdateRecord) -> tuple[UpdateRecord, SelfTest | None]:
        """VERIFIED -> STAGED: the downloaded bundle unpacked, checked and installed."""
        installed, test = await asyncio.to_thread(self._unpack, record)
        # the archive is no longer needed; staging leftovers go when the update ends
        await asyncio.to_thread(Path(record.target_path).unlink, missing_ok=True)
        return await self._advance(record, Event.UNPACKED, installed=installed), test

    def _unpack(self, record: UpdateRecord) -> tuple[bool, SelfTest | None]:
        """Scan and unpack the bundle into staging, check it against the request and
        model.toml, install its version folder; whether a folder was created, and the
        bundle's self-test (None: it carries no test vectors). Blocking."""
        assert record.to_version is not None
        model_dir = self.repository / record.model
        version = record.to_version
        spec = read_model_spec(model_dir)
        clear_staging(model_dir)
        staging_parent = staging_dir(model_dir)
        staging_parent.mkdir()
        limits = archive.Limits(
            max_bytes=self.config.max_unpacked_bytes,
            max_files=self.config.max_bundle_files,
        )
        listing = archive.scan(Path(record.target_path), limits)
        if not archive.free_space_ok(model_dir, listing.total_bytes, self.config.min_free_bytes):
            raise OtaError(
                f"unpacking {listing.total_bytes} bytes would leave less than "
                f"ota.min_free_bytes ({self.config.min_free_bytes}) free in {model_dir}"
            )
        folder = archive.extract(Path(record.target_path), staging_parent, limits)
        manifest = bundle.read_manifest(folder)
        bundle.check_for_model(manifest, record.model, version, spec)
        test = None  # no test vectors: the reference sample of the served version
        if manifest.selftest_file:
            inputs, expected = bundle.load_selftest(folder / manifest.selftest_file)
            check = None
            if (evidence := manifest.optimize) is not None:
                held, parent = bundle.load_optimize_check(folder / evidence.file)
                check = OptimizeCheck(held, parent, evidence)
            test = SelfTest(inputs, expected, manifest.rtol, manifest.atol, check)
        pin_active(model_dir, _versions(record.from_version))
        files = {name: folder / name for name in manifest.artifacts}
        return install_version(model_dir, version, files), test

    def _reference(self, model: str) -> tuple[Sample, dict[str, Array]] | None:
        """The reference sample of the version ``model`` serves, and its answers to it."""
        try:
            served = self.manager.get(model)
        except EdgedError:
            return None
        if served.reference is None:
            return None
        return served.reference, dict(served.reference_outputs)

    async def _activate(self, record: UpdateRecord, test: SelfTest | None) -> UpdateRecord:
        assert record.to_version is not None
        version = record.to_version
        record = await self._advance(record, Event.ACTIVATE)
        reference = self._reference(record.model) if test is None else None
        labels = {"model": record.model, "version": version}
        if test is None and reference is None:
            log.warning(
                "ota_selftest_skipped",
                **labels,
                reason="the bundle carries no test vectors and the served version has no "
                "reference sample yet (no warm-up sample ran, no request succeeded)",
            )
        elif test is None and reference is not None:
            log.info("ota_selftest_reference", **labels, sample=reference[0].source)
        slack = (self.config.optimize_agreement_slack, self.config.optimize_error_slack)
        selftest = _SelfTestGate(record, version, test, reference, slack)
        started = time.monotonic()
        try:
            # serving loads it beside, runs the gate, writes ACTIVE, switches, drains
            await self.manager.serve(record.model, [version], gate=selftest)
        except (ModelLoadError, ModelNotFoundError) as e:
            reason = (
                f"self-test failed: {describe_error(selftest.refusal)}"
                if selftest.refusal is not None
                else describe_error(e)
            )
            return await self._fail(record, reason)
        seconds = time.monotonic() - started
        self.last_swap_seconds = {**self.last_swap_seconds, record.model: seconds}
        log.info(
            "ota_switched", model=record.model, version=version, swap_seconds=round(seconds, 4)
        )
        return await self._advance(record, Event.SWITCHED)

    async def _trial(self, record: UpdateRecord) -> UpdateRecord:
        assert record.to_version is not None
        version = str(record.to_version)
        running = self._running.get(record.model)
        mv = self.manager.get(record.model, version)
        baseline = health_sample(mv.stats)
        started = self._monotonic()
        step = max(0.05, min(0.5, self.policy.window_s / 20))
        while True:
            if running is not None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(running.abort.wait(), step)
                if running.abort.is_set():
                    reason = running.abort_reason
                    break
            else:
                await asyncio.sleep(step)
            try:
                mv = self.manager.get(record.model, version)
            except Exception as e:
                reason = f"version {version} stopped serving during its health window: {e}"
                break
            judgement = judge_health(
                self.policy, health_sample(mv.stats).minus(baseline), self._monotonic() - started
            )
            if judgement.verdict is Verdict.WAIT:
                continue
            log.info(
                "ota_health",
                model=record.model,
                version=version,
                verdict=str(judgement.verdict),
                reason=judgement.reason,
                requests=judgement.requests,
                error_rate=round(judgement.error_rate, 4),
                p99_ms=round(judgement.p99_s * 1000, 2)
                if judgement.p99_s != float("inf")
                else None,
            )
            if judgement.verdict is Verdict.HEALTHY:
                return await self._advance(record, Event.HEALTHY)
            reason = f"health window: {judgement.reason}"
            break
        return await self._roll_back(await self._advance(record, Event.ROLLBACK, reason))

    async def _roll_back(self, record: UpdateRecord) -> UpdateRecord:
        """ROLLING_BACK -> ROLLED_BACK: serving serves the target through the one swap path,
        which rewrites ACTIVE at its switch (requests in flight on the version left finish
        there); then the version folder this update installed goes."""
        target = rollback_target(record)
        model_dir = self.repository / record.model
        try:
            await self.manager.serve(record.model, _versions(target))
            if (
                record.kind is not Kind.ROLLBACK
                and record.installed
                and record.to_version is not None
            ):
                await asyncio.to_thread(remove_version, model_dir, record.to_version)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            return await self._advance(record, Event.FAIL, f"rollback failed: {describe_error(e)}")
        return await self._advance(record, Event.ROLLED_BACK)

    # -- polling ---------------------------------------------------------------------------

    async def poll_once(self) -> list[str]:
        """Start an update of every served model with a newer version in the repository;
        returns the models started."""
        assert self.tuf is not None
        available = await asyncio.to_thread(self.tuf.versions)
        started = []
        for model in self.manager.wanted():
            versions = available.get(model)
            if not versions or model in self._running:
                continue
            committed = await self._committed_version(model)
            newest = max(versions)
            if committed is not None and newest <= committed:
                continue
            try:
                await self.start_update(model, str(newest))
                started.append(model)
            except (AlreadyExistsError, InvalidInputError, ModelNotFoundError) as e:
                log.info("ota_poll_skipped", model=model, reason=str(e))
        return started

    async def _poll(self) -> None:
        while True:
            try:
                started = await self.poll_once()
                self.last_poll_success = self._clock()
                if started:
                    log.info("ota_poll_started", models=started)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                self.poll_failures += 1
                log.warning("ota_poll_failed", error=describe_error(e))
            await asyncio.sleep(self.config.poll_interval_s)
