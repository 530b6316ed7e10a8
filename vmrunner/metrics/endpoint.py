"""The pod's one metrics endpoint (``METRICS_PORT``), serving :func:`vmrunner.metrics.sources.gather` at each scrape."""

import logging
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

from shared import figures
from shared.errors import PodvmError, reason
from shared.figures import Figure
from vmrunner.metrics.sources import GATHER_EVERY, gather
from vmrunner.metrics.tracker import Tracker

log = logging.getLogger("vmrunner")

SERVE_AFTER = 1.0  # seconds into a start that qemu has not reached yet (a fetch) after which the server loads anyway


def _values(spec: figures.Spec, sample: Figure) -> list[str]:
    labels = dict(sample.labels)
    return [labels[name] for name in spec.labels]


class Collector:
    """prometheus_client's view of :func:`gather`: one metric family per catalog entry that has samples.

    The endpoint answers anyone who reaches the pod IP, so scrapes are served one at a time and the figures are
    gathered at most once per GATHER_EVERY: a flood of requests costs neither qemu's monitor nor the runner more.
    """

    def __init__(self, tracker: Tracker) -> None:
        self.tracker = tracker
        self._lock = threading.Lock()
        self._last: tuple[float, list[Figure]] = (0.0, [])

    def _figures(self) -> list[Figure]:
        with self._lock:
            when, items = self._last
            if not items or time.monotonic() - when >= GATHER_EVERY:
                items = gather(self.tracker.state, self.tracker.sources, self.tracker.cache_size())
                self._last = (time.monotonic(), items)
            return items

    def collect(self) -> Iterator[Any]:
        """Families with their help, type and samples, in catalog order."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily

        items = self._figures()
        by_name: dict[str, list[Figure]] = {}
        for item in items:
            by_name.setdefault(item.name, []).append(item)
        for name, spec in figures.CATALOG.items():
            samples = by_name.get(name)
            if not samples:
                continue
            family: Any
            if spec.kind == "info":
                family = InfoMetricFamily(name, spec.help, labels=spec.labels)
                for sample in samples:
                    family.add_metric(_values(spec, sample), {})
            elif spec.kind == "counter":
                family = CounterMetricFamily(name, spec.help, labels=spec.labels)
                for sample in samples:
                    family.add_metric(_values(spec, sample), sample.value)
            else:
                family = GaugeMetricFamily(name, spec.help, labels=spec.labels)
                for sample in samples:
                    family.add_metric(_values(spec, sample), sample.value)
            yield family


def serve(port: int, tracker: Tracker) -> None:
    """Listen on ``port`` of every address of the pod, IPv4 and IPv6, and serve the endpoint there on aiohttp (the
    console's HTTP stack too) in a thread and event loop of its own: it answers from before the fetch to the end,
    whatever qemu's supervision waits on, and a slow scrape (qemu's monitor) holds up only the next scrape.

    The port is bound here, so that a taken one fails the start in one line; the server is loaded once qemu runs, or
    SERVE_AFTER into a longer start. Loading aiohttp costs about 100 ms of the one interpreter lock, which would
    otherwise stand between the start and qemu; the kernel queues a scrape that comes meanwhile.

    :raise PodvmError: when the port cannot be bound.
    """
    try:
        listener = _listen(port)
    except OSError as err:
        raise PodvmError(f"METRICS_PORT={port}: cannot listen: {reason(err)}") from None
    threading.Thread(target=_serve, args=(listener, tracker), name="metrics", daemon=True).start()
    log.info("metrics on TCP port %d", port)


def _listen(port: int) -> socket.socket:
    """One socket for both families where the kernel has IPv6 (an IPv6-only pod is scraped too), else IPv4's."""
    if socket.has_dualstack_ipv6():
        return socket.create_server(("::", port), family=socket.AF_INET6, dualstack_ipv6=True)
    return socket.create_server(("0.0.0.0", port))  # noqa: S104 - scraped on the pod IP


def _serve(listener: socket.socket, tracker: Tracker) -> None:
    tracker.spawned.wait(SERVE_AFTER)
    import asyncio

    from aiohttp import web
    from prometheus_client import CollectorRegistry
    from prometheus_client.exposition import choose_encoder

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Collector(tracker))

    async def scrape(request: web.Request) -> web.Response:
        encode, content_type = choose_encoder(request.headers.get("Accept", ""))  # OpenMetrics when asked for
        body = await asyncio.to_thread(encode, registry)  # gathering asks qemu's monitor with an event loop of its own
        return web.Response(body=body, headers={"Content-Type": content_type})

    app = web.Application()
    app.router.add_get("/", scrape)
    app.router.add_get("/metrics", scrape)

    async def listen() -> None:
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        await web.SockSite(runner, listener).start()
        await asyncio.Event().wait()

    try:
        asyncio.run(listen())
    except Exception as err:  # the endpoint's loss must not stop the VM; it is said, with the traceback at DEBUG
        log.error("metrics endpoint stopped: %s", err)
        log.debug("metrics endpoint stopped", exc_info=True)
