"""Section 4, scale: 1, 4, 16 pods set up at once, each checked for its own lease and its own DNAT rule."""

import threading
import time
from collections.abc import Callable

from bench.pods import Pod
from bench.table import Figure, Results
from tests.harness.netbed import ns_run


def _parallel(items: list[Pod], action: Callable[[Pod], None]) -> list[BaseException]:
    errors: list[BaseException] = []

    def run(pod: Pod) -> None:
        try:
            action(pod)
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=run, args=(p,)) for p in items]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


def bench_scale(res: Results, counts: tuple[int, ...], rounds: int) -> None:
    """N beds built first, then N sidecars plus stand-ins started at once: time until every lease is taken."""
    for _ in range(rounds):
        for count in counts:
            _scale_once(res, count)


def _scale_once(res: Results, count: int) -> None:
    sec = "4. scale (pods set up in parallel)"
    pods = [Pod() for _ in range(count)]
    try:
        errors = _parallel(pods, lambda p: p.bed.setup())
        if errors:
            raise RuntimeError(f"{count} beds: {errors[0]}")
        begin = time.monotonic()
        errors = _parallel(pods, Pod.start)
        elapsed = (time.monotonic() - begin) * 1000
        if errors:
            raise RuntimeError(f"{count} pods: {errors[0]}")
        own = sum(1 for p in pods if p.lease.get("ip") == p.vm_ip and _own_rules(p))
        name = f"{count} pod{'s' if count > 1 else ''}: sidecars + leases ready"
        ref = "1 pod: sidecars + leases ready" if count > 1 else None
        fig = res.find(sec, name) or res.add(Figure(sec, name, "ms", [], ref))
        fig.values.append(elapsed)
        owned = [*_ints(fig.extra.get("own_lease_and_rules")), own]
        fig.extra["own_lease_and_rules"] = owned
        fig.note = f"pods with own lease and rules, per run: {'/'.join(map(str, owned))} of {count}"
    finally:
        _parallel(pods, Pod.close)


def _ints(value: object) -> list[int]:
    return [int(v) for v in value] if isinstance(value, list) else []


def _own_rules(pod: Pod) -> bool:
    """The pod's table DNATs its own pod IP (not another pod's)."""
    out = ns_run(pod.bed.pod.ns, "nft", "list", "table", "ip", "podvm").stdout
    return f"ip daddr {pod.bed.pod_ip}" in out and "dnat to 192.168.254.2" in out
