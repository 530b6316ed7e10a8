"""The pod's one metrics endpoint (``METRICS_PORT``), serving :func:`vmrunner.metrics.sources.gather` at each scrape."""

import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

from shared import figures
from shared.errors import PodvmError
from shared.figures import Figure
from vmrunner.metrics.sources import GATHER_EVERY, gather
from vmrunner.metrics.tracker import Tracker

log = logging.getLogger("vmrunner")


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
    """Serve the endpoint on ``port`` of every address of the pod, in a thread of its own.

    :raise PodvmError: when the port cannot be bound.
    """
    from prometheus_client import CollectorRegistry, start_http_server

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Collector(tracker))
    try:
        start_http_server(port, addr="0.0.0.0", registry=registry)  # noqa: S104 - scraped on the pod IP
    except OSError as err:
        raise PodvmError(f"METRICS_PORT={port}: cannot listen: {err.strerror}") from None
    log.info("metrics on TCP port %d", port)
