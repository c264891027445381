"""Run Signalbox in-process: the embedded server plus any set of services.

This is the composition root behind ``signalbox up``, ``signalbox demo`` and
``python -m services.<name>``; it may import every service (services never
import each other).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
from opentelemetry.trace import TracerProvider

from broker.diagnostics import cancel_and_wait, finish_within
from broker.runtime import otel
from broker.runtime.identity import ServerSecrets, resolve_secrets_dir
from broker.runtime.permissions import auth_config
from broker.runtime.server import EmbeddedServer
from broker.runtime.service import Service
from broker.settings import Settings
from broker.subjects import Subjects
from services.cost.service import CostService
from services.policy.service import PolicyService
from services.registry.service import RegistryService
from services.tracing.service import TracingService

__all__ = ["SERVICES", "Stack", "run_one", "wait_for_signal"]

log = logging.getLogger(__name__)

#: Seconds between checks that the embedded server is alive.
SUPERVISE_INTERVAL = 0.25

#: Every service by name, in start order (the sequencer first, so audit
#: events emitted while the others start are chained right away).
SERVICES: dict[str, type[Service]] = {
    "tracing": TracingService,
    "registry": RegistryService,
    "policy": PolicyService,
    "cost": CostService,
}


class Stack:
    """The embedded server (unless ``settings.nats_url`` is set) and services, started together.

    Args:
        settings: Settings; ``nats_url`` unset means start an embedded server.
        services: Names of the services to run (default: all four).
        tracer_provider: Where the services' spans go; default: built from the
            settings' ``otel_*`` fields (:func:`broker.telemetry.tracer_provider`),
            and then shut down (flushed) by :meth:`stop`.

    Example::

        async with Stack(Settings(data_dir=tmp)) as stack:
            print(stack.settings.nats_url)
    """

    def __init__(
        self,
        settings: Settings,
        services: Sequence[str] = tuple(SERVICES),
        *,
        tracer_provider: TracerProvider | None = None,
    ) -> None:
        unknown = sorted(set(services) - set(SERVICES))
        if unknown:
            raise ValueError(f"unknown services {unknown}; choose from {sorted(SERVICES)}")
        self.settings = settings
        #: The services' tracer provider (the one given, else one from the settings).
        self.tracer_provider = tracer_provider
        self._owns_provider = tracer_provider is None
        self.names = [n for n in SERVICES if n in services]
        self.server: EmbeddedServer | None = None
        self.services: dict[str, Service] = {}
        #: Set (with the reason) when the embedded server died more often than
        #: ``server_restart_attempts`` allow: ``signalbox up`` then exits non-zero.
        self.failed: asyncio.Future[str] | None = None
        #: Restarts of the embedded server so far.
        self.server_restarts = 0
        self._restarts: list[float] = []
        self._supervisor: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Start the server (if embedded) and the services."""
        if self.settings.nats_url is None:
            # Identity on: secrets generated on first start (0600 files), the
            # server configured for the registry's auth callout.
            secrets = ServerSecrets.load_or_create(resolve_secrets_dir(self.settings))
            self.server = EmbeddedServer(
                self.settings.data_dir / "nats",
                host=self.settings.nats_host,
                port=self.settings.nats_port,
                sync_always=self.settings.nats_sync_always,
                max_payload=self.settings.nats_max_payload,
                start_timeout=self.settings.server_start_timeout,
                auth=auth_config(secrets, Subjects(self.settings.subject_prefix)),
            )
            # In this (long-lived) thread, not a worker thread: the server is
            # tied to the thread that starts it (see EmbeddedServer); start-up
            # blocks only until the server logs readiness (~100 ms).
            url = self.server.start()
            self.settings = self.settings.model_copy(update={"nats_url": url})
            self.failed = asyncio.get_running_loop().create_future()
            self._supervisor = asyncio.ensure_future(self._supervise(self.server))
        if self.tracer_provider is None:
            self.tracer_provider = otel.tracer_provider(self.settings)
        try:
            for name in self.names:
                service = SERVICES[name](self.settings)
                service.use_tracer_provider(self.tracer_provider)
                await service.start()
                self.services[name] = service
        except BaseException:
            await self.stop()
            raise

    async def _supervise(self, server: EmbeddedServer) -> None:
        """Restart the embedded server when it dies (same store, same port), at most
        ``server_restart_attempts`` times per ``server_restart_window``; past that,
        resolve :attr:`failed` so the owner exits non-zero. The services reconnect to
        the same URL by themselves."""
        s = self.settings
        while True:
            await asyncio.sleep(SUPERVISE_INTERVAL)
            code = server.exited()  # reaps the process: no zombie
            if code is None:
                continue
            how = f"signal {-code}" if code < 0 else f"exit status {code}"
            now = time.monotonic()
            self._restarts = [t for t in self._restarts if now - t < s.server_restart_window]
            if len(self._restarts) >= s.server_restart_attempts:
                reason = (
                    f"the embedded nats-server died ({how}) after {len(self._restarts)} "
                    f"restart(s) within {s.server_restart_window:g}s; giving up (see "
                    f"{server.log_path})"
                )
                log.error("%s", reason)
                if self.failed is not None and not self.failed.done():
                    self.failed.set_result(reason)
                return
            self._restarts.append(now)
            log.warning(
                "the embedded nats-server died (%s); restarting it on the same store "
                "(restart %d of at most %d per %gs)",
                how, len(self._restarts), s.server_restart_attempts, s.server_restart_window,
            )  # fmt: skip
            try:
                # In the loop's thread, not a worker: the server dies with the thread
                # that started it (EmbeddedServer); start-up waits ~100 ms for readiness.
                server.restart()
            except Exception as exc:
                log.error("restarting the embedded nats-server failed: %s", exc)
                continue  # counted: the next round tries again, or gives up
            self.server_restarts += 1
            log.warning("the embedded nats-server is back at %s", server.url)

    async def stop(self) -> None:
        """Stop services in reverse order, then the embedded server."""
        await cancel_and_wait(self._supervisor, "the embedded server's supervisor")
        self._supervisor = None
        for name in reversed(list(self.services)):
            service = self.services.pop(name)
            await finish_within(service.stop(), self.settings.shutdown_timeout, f"stopping {name}")
        if self.server is not None:
            await asyncio.to_thread(self.server.stop)
            self.server = None
        provider, self.tracer_provider = self.tracer_provider, None
        if self._owns_provider and isinstance(provider, SdkTracerProvider):
            await asyncio.to_thread(provider.shutdown)  # exports what is batched

    async def __aenter__(self) -> Stack:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()


async def wait_for_signal() -> None:
    """Return on SIGINT or SIGTERM."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    await stop.wait()


def configure_logging(level: str) -> None:
    """Plain, readable log lines on stderr."""
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def run_one(name: str, argv: Sequence[str] | None = None) -> None:
    """Entry point of ``python -m services.<name>``: run one service until a signal."""
    import argparse

    import uvloop

    parser = argparse.ArgumentParser(
        prog=f"python -m services.{name}",
        description=f"Run the Signalbox {name} service against an existing NATS server.",
    )
    parser.add_argument("--nats-url", help="NATS URL (default: $SIGNALBOX_NATS_URL)", default=None)
    parser.add_argument("--data-dir", type=Path, default=None, help="data folder")
    args = parser.parse_args(argv)
    overrides: dict[str, object] = {}
    if args.nats_url:
        overrides["nats_url"] = args.nats_url
    if args.data_dir:
        overrides["data_dir"] = args.data_dir
    settings = Settings(**overrides)  # type: ignore[arg-type]
    if not settings.nats_url:
        parser.error("no NATS URL: pass --nats-url or set SIGNALBOX_NATS_URL")
    configure_logging(settings.log_level)

    async def main() -> None:
        async with Stack(settings, [name]):
            await wait_for_signal()

    uvloop.run(main())
