"""Wiring: the model manager, the gRPC and ZeroMQ frontends, and their lifecycle.

``start`` binds the gRPC port first, so ServerLive answers while models are still loading;
each model answers ModelReady only once it has loaded and warmed up. With OTA state (an
``[ota]`` repository, or a state database left by one), a crashed update is finished or undone
before the repository loads, so the daemon starts on committed versions; fine-tune jobs a
restart interrupted are settled after that. ``stop`` runs in a fixed order: stop learning jobs
-> stop OTA -> stop intake -> let in-flight requests finish (bounded grace) -> stop the server
-> unload models -> close the OTA and learning state.

The devices are probed once (``hal.probe()``, in a worker thread) before the repository
loads; every load, at start-up or by RepositoryModelLoad, places models with those reports.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import os
import signal
import socket
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path

import structlog

from edged import logs
from edged.config import Config, OtaConfig
from edged.controlplane import ControlPlane
from edged.core.errors import ConfigError
from edged.core.limits import RequestLimits
from edged.federated.devices import FederatedClients
from edged.frontends import management
from edged.frontends.grpc import HealthPublisher, build_server
from edged.frontends.grpc_server import GrpcServer, Services
from edged.frontends.http import HttpFrontend
from edged.frontends.metrics import MetricsEndpoint
from edged.frontends.security import Security
from edged.frontends.zmq import ZmqFrontend
from edged.learn.jobs import LearnManager
from edged.learn.metrics import LearnCollector
from edged.learn.store import LearnStore
from edged.lifecycle import Notifier, ReloadHooks, Watchdog, watchdog_interval
from edged.ota.metrics import OtaCollector
from edged.ota.store import FILE_NAME as OTA_STATE_FILE
from edged.ota.store import StoreError, UpdateStore
from edged.ota.tuf_client import TufClient
from edged.ota.updater import UpdateManager
from edged.security.access import AccessCollector
from edged.serving.dataplane import DataPlane
from edged.serving.manager import ModelManager
from edged.serving.shared_memory import SharedMemoryRegistry, ShmLimits
from hal.placement import BreakerPolicy

log = structlog.get_logger("edged.daemon")


def _bind_error(address: str) -> str:
    """Why a TCP listener cannot bind ``address`` ("address already in use", "permission
    denied", ...), from the operating system: gRPC's own error only says that it failed."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    try:
        infos = socket.getaddrinfo(host or None, int(port), type=socket.SOCK_STREAM)
    except (OSError, ValueError) as e:
        return f"cannot resolve {host!r}: {e}"
    for family, kind, proto, _, sockaddr in infos:
        with socket.socket(family, kind, proto) as probe:
            try:
                probe.bind(sockaddr)
            except OSError as e:
                reason = (e.strerror or str(e)).lower()
                if e.errno == errno.EADDRINUSE:
                    reason += " (another process listens there)"
                return reason
    return ""


def _state_dir(ota: OtaConfig, env: Mapping[str, str]) -> tuple[Path, bool]:
    """``ota.state_dir`` resolved, and whether it exists yet.

    It must lie inside one of ``ota.state_roots`` or the folders systemd names in
    ``$STATE_DIRECTORY`` (StateDirectory=), so that a mistyped or default path never makes a
    daemon running as root create state somewhere on the host unasked.

    Raises:
        ConfigError: it lies outside every root.
    """
    state_dir = Path(ota.state_dir).resolve()
    systemd = [p for p in env.get("STATE_DIRECTORY", "").split(":") if p]
    roots = [Path(r).resolve() for r in (*ota.state_roots, *systemd)]
    if not any(state_dir == root or root in state_dir.parents for root in roots):
        raise ConfigError(
            f"config key 'ota.state_dir': {state_dir} is outside the allowed state roots "
            f"({', '.join(map(str, roots)) or 'none'}); set ota.state_dir inside one, or add "
            f"its folder to ota.state_roots (EDGED_OTA_STATE_ROOTS)"
        )
    return state_dir, state_dir.is_dir()


class Daemon:
    """One edged process's serving machinery.

    ``reload_config`` reads the configuration again (file and environment) for SIGHUP; without
    it SIGHUP runs the other reload hooks only.
    """

    def __init__(
        self, config: Config, *, reload_config: Callable[[], Config] | None = None
    ) -> None:
        self.config = config
        self._reload_config = reload_config
        self.reloads = ReloadHooks()
        """What SIGHUP reloads; other parts add their hooks (``reloads.add``)."""
        if reload_config is not None:
            self.reloads.add("log.level", self._reload_log_level)
        self.notifier = Notifier()
        self.manager = ModelManager(
            Path(config.models.repository),
            default_max_batch_size=config.models.default_max_batch_size,
            default_instances=config.models.instances,
            default_threads=config.models.threads,
            load_timeout_s=config.models.load_timeout_s,
            drain_timeout_s=config.server.shutdown_grace_s,
            breaker=BreakerPolicy(
                failure_threshold=config.executors.failure_threshold,
                retry_after_s=config.executors.retry_after_s,
            ),
            inference_timeout_s=config.executors.inference_timeout_s,
        )
        lim = config.limits
        self.limits = RequestLimits(lim.max_inputs, lim.max_outputs, lim.max_parameters)
        self.regions = (
            SharedMemoryRegistry(
                limits=ShmLimits(
                    lim.shm_max_regions,
                    lim.shm_max_regions_per_connection,
                    lim.shm_max_bytes,
                    lim.shm_max_bytes_per_connection,
                )
            )
            if config.server.shared_memory
            else None
        )
        self.plane = DataPlane(
            self.manager, is_ready=self.is_ready, regions=self.regions, limits=self.limits
        )
        self.grpc_port: int | None = None
        self.management_port: int | None = None
        self._server: GrpcServer | None = None
        self._management_server: GrpcServer | None = None
        self._security: Security | None = None
        self._health: HealthPublisher | None = None
        self._zmq: ZmqFrontend | None = None
        self._http: HttpFrontend | None = None
        self.http_address = ""
        self._metrics: MetricsEndpoint | None = None
        self.metrics_address = ""
        self.zmq_endpoints: list[str] = []
        self._startup: asyncio.Task[None] | None = None
        self._loaded = False
        self._failed: dict[str, str] = {}
        self._stopping = False
        self._store: UpdateStore | None = None
        self.updates: UpdateManager | None = None
        self._learn_store: LearnStore | None = None
        self.learn: LearnManager | None = None
        #: updates and learning as the frontends see them (both off until _open_ota)
        self.control = ControlPlane()
        self.federated: FederatedClients | None = None

    def is_ready(self) -> bool:
        """ServerReady: start-up loading is done and, with strict readiness, every model asked
        to serve (at start-up or by RepositoryModelLoad, and not unloaded since) is serving."""
        if self._stopping or not self._loaded:
            return False
        if self.config.models.strict_readiness:
            return all(self.manager.is_ready(n) for n in self.manager.wanted())
        return True

    async def start(self) -> None:
        """Bind and serve, then load the repository in the background.

        Raises:
            ConfigError: the repository folder is missing or the address cannot be bound.
        """
        repo = Path(self.config.models.repository)
        if not await asyncio.to_thread(repo.is_dir):
            raise ConfigError(f"config key 'models.repository': {repo} is not a folder")
        await self._open_ota()
        self._security = security = await asyncio.to_thread(Security.from_config, self.config)
        if security.reloadable:
            self.reloads.add("auth", security.reload)
        separate = bool(self.config.server.management_address)
        self.control = ControlPlane(self.updates, self.learn)
        management_service = management.service(self.control, self.limits)
        server, health = build_server(
            self.plane,
            max_request_bytes=self.config.server.max_request_bytes,
            stream_max_in_flight=self.config.server.stream_max_in_flight,
            threads=self.config.server.grpc_threads,
            services=[] if separate else [management_service],
            interceptors=[security.interceptor(management=not separate)],
        )
        address = self.config.server.grpc_address
        port = await self._bind(server, address, "server.grpc_address", not separate)
        await server.start()
        self._server, self._health, self.grpc_port = server, health, port
        if separate:
            await self._start_management(security, health, management_service)
        health.server_changed(False)
        if self.config.zmq.enabled:
            self._zmq = ZmqFrontend(
                self.plane,
                self.config.zmq.addresses,
                max_message_bytes=self.config.zmq.max_message_bytes,
                max_in_flight=self.config.zmq.max_in_flight,
                control=self.control,
                access=security.access,
                curve=security.curve_files,
            )
            try:
                self.zmq_endpoints = self._zmq.start()
            except ConfigError:
                self._zmq = None
                await self._stop_frontends(0.0)
                raise
        if self.config.server.http_address:
            await self._start_http(security)
        if self.config.metrics.enabled:
            self._metrics = MetricsEndpoint(self.plane)
            if self.updates is not None:
                self._metrics.registry.register(OtaCollector(self.updates))
            if self.learn is not None:
                self._metrics.registry.register(LearnCollector(self.learn))
            self._metrics.registry.register(AccessCollector(security.access))
            metrics_host = self.config.metrics.address.rpartition(":")[0]
            try:
                metrics_port = await asyncio.to_thread(
                    self._metrics.start, self.config.metrics.address
                )
            except OSError as e:
                await self._stop_frontends(0.0)
                raise ConfigError(
                    f"config key 'metrics.address': cannot bind {self.config.metrics.address}: {e}"
                ) from e
            self.metrics_address = f"{metrics_host}:{metrics_port}"
        host = address.rpartition(":")[0]
        security.log_policy(self.zmq_endpoints)
        security.start_reloading(self._zmq.curve if self._zmq is not None else None)
        log.info(
            "server_live",
            grpc_address=f"{host}:{port}",
            management_address=self._management_address(),
            zmq_endpoints=self.zmq_endpoints,
            http_address=self.http_address,
            metrics_address=self.metrics_address,
            repository=str(repo),
        )
        self._startup = asyncio.create_task(self._load_repository())

    async def _start_http(self, security: Security) -> None:
        """The KServe v2 HTTP/REST listener (server.http_address), TLS as [tls] says.

        Raises:
            ConfigError: the address cannot be bound or the certificates loaded.
        """
        address = self.config.server.http_address
        try:
            context = await asyncio.to_thread(security.http_ssl_context)
            self._http = HttpFrontend(
                self.plane,
                address,
                access=security.access,
                max_request_bytes=self.config.server.max_request_bytes,
                ssl_context=context,
            )
            port = await self._http.start()
        except ConfigError:
            self._http = None
            await self._stop_frontends(0.0)
            raise
        security.note_listener(address, tls=context is not None)
        self.http_address = f"{address.rpartition(':')[0]}:{port}"

    async def _bind(self, server: GrpcServer, address: str, key: str, management: bool) -> int:
        """Add a listener (TLS or not, as ``[tls]`` says); return its port.

        Raises:
            ConfigError: it cannot be bound, naming ``key`` and the operating system's reason.
        """
        assert self._security is not None
        try:
            return self._security.bind(server, address, key, management=management)
        except ConfigError as e:
            why = await asyncio.to_thread(_bind_error, address)
            if not why:
                raise
            raise ConfigError(f"config key '{key}': cannot bind {address}: {why}") from e

    async def _start_management(
        self,
        security: Security,
        health: HealthPublisher,
        service: tuple[str, Callable[[Services], None]],
    ) -> None:
        """The second listener, serving Management (server.management_address)."""
        mserver, _ = build_server(
            self.plane,
            max_request_bytes=self.config.server.max_request_bytes,
            stream_max_in_flight=self.config.server.stream_max_in_flight,
            threads=self.config.server.grpc_threads,
            services=[service],
            interceptors=[security.interceptor(management=True)],
            health=health,
        )
        maddress = self.config.server.management_address
        try:
            self.management_port = await self._bind(
                mserver, maddress, "server.management_address", True
            )
        except ConfigError:
            await self._stop_frontends(0.0)
            raise
        await mserver.start()
        self._management_server = mserver

    def _management_address(self) -> str:
        if self.management_port is None:
            return ""
        return f"{self.config.server.management_address.rpartition(':')[0]}:{self.management_port}"

    async def _open_ota(self) -> None:
        """Open the OTA state when OTA or learning is on, or when an earlier run left state to
        recover; with learning on, the sample store too (a fine-tuned version is published
        through the update path, so learning needs the OTA state)."""
        ota, learn = self.config.ota, self.config.learn
        state_dir = Path(ota.state_dir)
        if (
            not ota.enabled
            and not learn.enabled
            and not await asyncio.to_thread((state_dir / OTA_STATE_FILE).exists)
        ):
            return
        state_dir, existed = await asyncio.to_thread(_state_dir, ota, os.environ)
        # say where state goes; a folder created outside systemd's StateDirectory is worth a
        # look (a root shell on a development host creating /var/lib/edged/state, say)
        (log.info if existed or os.environ.get("STATE_DIRECTORY") else log.warning)(
            "state_directory",
            path=str(state_dir),
            created=not existed,
            used_by=[n for n, on in (("ota", True), ("learn", learn.enabled)) if on],
        )
        try:
            self._store = await asyncio.to_thread(
                UpdateStore, state_dir, history_limit=ota.history_limit
            )
            if learn.enabled:
                self._learn_store = await asyncio.to_thread(
                    lambda: LearnStore(
                        state_dir,
                        max_samples=learn.max_samples,
                        max_bytes=learn.max_store_bytes,
                        holdout_share=learn.holdout_share,
                        history_limit=learn.history_limit,
                    )
                )
        except (StoreError, OSError) as e:
            raise ConfigError(f"config key 'ota.state_dir': {e}") from e
        self.updates = UpdateManager(
            self.manager, ota, self._store, tuf=TufClient(ota) if ota.enabled else None
        )
        if self._learn_store is not None:
            self.learn = LearnManager(
                self.manager, self.updates, learn, self._learn_store, state_dir
            )

    async def _load_repository(self) -> None:
        started = time.monotonic()
        devices = await self.manager.devices()  # hal.probe(), once, in a worker thread
        log.info(
            "devices_probed",
            present=[d.kind for d in devices if d.present],
            absent={d.kind: d.reason for d in devices if not d.present},
            seconds=round(time.monotonic() - started, 3),
        )
        recovered = False
        if self.updates is not None:
            try:
                await asyncio.to_thread(self.updates.recover)
                recovered = True
            except Exception as e:
                log.exception("ota_recovery_failed", error=f"{type(e).__name__}: {e}")
        if self.learn is not None and recovered:
            try:
                await asyncio.to_thread(self.learn.recover)
            except Exception as e:
                log.exception("learn_recovery_failed", error=f"{type(e).__name__}: {e}")
        self._failed = await self.manager.load_all()
        for model, error in self._failed.items():
            log.error("model_load_failed", model=model, error=error)
        served = len(self.manager.ready_models())
        if not served and not self._failed:
            log.warning(
                "repository_empty",
                repository=self.config.models.repository,
                hint="no <model>/<version>/ folder with a model file: nothing is served "
                "until one is added and loaded (RepositoryModelLoad) or an update installs one",
            )
        self._loaded = True
        assert self._health is not None
        self._health.server_changed(self.is_ready())
        (log.warning if self._failed or not served else log.info)(
            "server_ready" if self.is_ready() else "server_not_ready",
            models=served,
            failed=sorted(self._failed),
            seconds=round(time.monotonic() - started, 3),
        )
        if self.updates is not None and recovered:
            await self.updates.start()
            if self.learn is not None:
                await self.learn.start()
                if self.config.federated.enabled:
                    self.federated = FederatedClients(self.learn, self.config.federated)
                    await self.federated.start()

    async def wait_loaded(self) -> None:
        """Return once start-up loading has finished (for tests and `edged serve`)."""
        if self._startup is not None:
            await asyncio.shield(self._startup)

    async def stop(self) -> None:
        """Stop intake, drain, stop the server, unload models. Idempotent.

        The frontends stop taking new requests first (gRPC refuses new calls, the ZeroMQ
        socket stops receiving, streams stop reading) while every request they had already
        received runs to its answer, bounded by ``server.shutdown_grace_s``; only then does
        the model manager refuse requests, drain and unload.
        """
        if self._stopping:
            return
        self._stopping = True
        if self.federated is not None:
            await self.federated.stop()
        if self.learn is not None:
            await self.learn.stop()
        if self.updates is not None:
            await self.updates.stop()
        grace = self.config.server.shutdown_grace_s
        if self._startup is not None and not self._startup.done():
            self._startup.cancel()
        if self._health is not None:
            await self._health.shutdown()
        deadline = time.monotonic() + grace
        frontends = asyncio.ensure_future(self._stop_frontends(grace))
        # two turns of the loop: _stop_frontends starts each frontend's stop, and each stop
        # runs to its first wait, by which time gRPC refuses new calls (Server.stop "stops
        # servicing new RPCs immediately") and the ZeroMQ receiver is cancelled
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        log.info("shutdown_started", in_flight=self.manager.in_flight(), grace_s=grace)
        await frontends
        self.manager.stop_intake()
        drained = await self.manager.drain(max(0.0, deadline - time.monotonic()))
        if not drained:
            log.warning("shutdown_drain_timeout", in_flight=self.manager.in_flight())
        await self.manager.unload_all()
        if self.regions is not None:
            await asyncio.to_thread(self.regions.close)
        if self._store is not None:
            await asyncio.to_thread(self._store.close)
        if self._learn_store is not None:
            await asyncio.to_thread(self._learn_store.close)
        log.info("shutdown_complete")

    async def _stop_frontends(self, grace_s: float) -> None:
        """Every frontend at once: no new requests, those received answered within
        ``grace_s``."""
        if self._security is not None:
            await self._security.stop_reloading()
        stops: list[Awaitable[None]] = []
        if self._zmq is not None:
            stops.append(self._zmq.stop(grace_s))
        if self._http is not None:
            stops.append(self._http.stop(grace_s))
        if self._management_server is not None:
            stops.append(self._management_server.stop(grace_s))
        if self._server is not None:
            stops.append(self._server.stop(grace_s))
        await asyncio.gather(*stops)
        if self._metrics is not None:
            await asyncio.to_thread(self._metrics.stop)

    # -- SIGHUP ----------------------------------------------------------------------------

    async def _reload_log_level(self) -> None:
        assert self._reload_config is not None
        fresh = await asyncio.to_thread(self._reload_config)
        if fresh.log.level != self.config.log.level:
            logs.set_level(fresh.log.level)
            log.warning("log_level_changed", before=self.config.log.level, after=fresh.log.level)
            self.config = dataclasses.replace(self.config, log=fresh.log)

    async def reload(self) -> dict[str, str]:
        """What SIGHUP does: run every reload hook; never raises."""
        log.info("reload_started", hooks=self.reloads.names())
        results = await self.reloads.run()
        log.info("reload_finished", results=results)
        return results

    # -- the process -----------------------------------------------------------------------

    async def run_until_signalled(self) -> None:
        """Start, serve until SIGTERM or SIGINT, then stop; SIGHUP reloads. With systemd
        (``$NOTIFY_SOCKET``): READY=1 once the listeners are bound, STATUS= as models load,
        WATCHDOG=1 from the event loop every half ``$WATCHDOG_USEC``, STOPPING=1 on the way
        out."""
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        reloading: set[asyncio.Task[dict[str, str]]] = set()

        def on_sighup() -> None:
            if self._stopping or reloading:
                log.info("reload_skipped", reason="stopping" if self._stopping else "running")
                return
            task = loop.create_task(self.reload())
            reloading.add(task)
            task.add_done_callback(reloading.discard)

        loop.add_signal_handler(signal.SIGHUP, on_sighup)
        interval = watchdog_interval()
        watchdog = Watchdog(self.notifier, interval) if interval else None
        try:
            await self.start()
            self.notifier.ready(status="serving; loading models")
            if watchdog is not None:
                watchdog.start()
                log.info("watchdog_started", interval_s=interval)
            loaded = loop.create_task(self._report_loaded())
            await stop.wait()
            loaded.cancel()
            self.notifier.stopping(status="draining")
            await self.stop()
        finally:
            if watchdog is not None:
                watchdog.stop()
            self.notifier.close()
            loop.remove_signal_handler(signal.SIGHUP)

    async def _report_loaded(self) -> None:
        await self.wait_loaded()
        ready = len(self.manager.ready_models())
        failed = len(self._failed)
        self.notifier.status(
            f"serving {ready} model version(s)" + (f"; {failed} failed to load" if failed else "")
        )
