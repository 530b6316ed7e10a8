"""``make bench``: every measurement on the namespace test bed, one table, JSON in bench/results/latest.json.

Run as root from the project root: ``.venv/bin/python bench/suite.py [--quick] [--only SECTION ...]``.
Sections, each in the module of its name: ready, packets, footprint, metrics, scale, overhead, console, fetch,
convert, check, coldstart, backup, firmware, suspend (the pod with a VM stand-in several share is in ``pods``, the
runner's helpers in ``runner``). Each figure is compared with a reference measured in the same run (ratio = median /
reference median). A section that fails is reported and the rest still run.
"""

import argparse
import os
import platform
import signal
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import (
    backup,
    check,
    coldstart,
    console,
    convert,
    fetch,
    firmware,
    footprint,
    metrics,
    overhead,
    packets,
    ready,
    scale,
    suspend,
)
from bench.pods import Pod
from bench.table import Results

RESULTS = Path(__file__).resolve().parent / "results" / "latest.json"
SECTIONS = (
    "ready",
    "packets",
    "footprint",
    "metrics",
    "scale",
    "overhead",
    "console",
    "fetch",
    "convert",
    "check",
    "coldstart",
    "backup",
    "firmware",
    "suspend",
)


def facts() -> dict[str, object]:
    """The machine the figures come from."""
    return {
        "nproc": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def main() -> int:
    """Run the chosen sections, print the table, save the JSON; exit 1 if a section failed."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--only", nargs="*", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (a smoke run)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("make bench needs root (network namespaces)", file=sys.stderr)
        return 2
    # SIGTERM unwinds like Ctrl-C, so every namespace and process made so far is removed on the way out.
    signal.signal(signal.SIGTERM, lambda _sig, _frame: sys.exit(143))
    quick = args.quick
    res = Results()
    res.facts = facts()
    begin = time.monotonic()
    pod: Pod | None = None
    steps = {
        "ready": lambda: ready.bench_ready(res, 3 if quick else 10),
        "metrics": lambda: metrics.bench(res, 1 if quick else 2, 10.0 if quick else 20.0),
        "scale": lambda: scale.bench_scale(res, (1, 4) if quick else (1, 4, 16), 1 if quick else 2),
        "overhead": lambda: overhead.bench_overhead(res, 3 if quick else 7),
        "console": lambda: console.bench_console(res, 3 if quick else 6),
        "fetch": lambda: fetch.bench_fetch(res, (256 << 20) if quick else (1 << 30), 1 if quick else 3),
        "convert": lambda: convert.bench_convert(res, (256 << 20) if quick else (1 << 30), 1 if quick else 3),
        "check": lambda: check.bench_check(res, (256 << 20) if quick else (1 << 30), 3 if quick else 7),
        "coldstart": lambda: coldstart.bench_coldstart(res, 1 if quick else 2),
        "backup": lambda: backup.bench(res, 1 if quick else 3),
        "firmware": lambda: firmware.bench_firmware(res, 1 if quick else 3),
        "suspend": lambda: suspend.bench_suspend(res, 1 if quick else 3),
    }
    try:
        for name in SECTIONS:
            if name not in args.only:
                continue
            print(f"bench: {name} ...", file=sys.stderr, flush=True)
            try:
                if name == "packets":
                    pod = packets.bench_packets(res, 1 if quick else 3, 1 if quick else 2)
                elif name == "footprint":
                    if pod is None:
                        pod = Pod()
                        pod.up()
                    footprint.bench_footprint(res, pod)
                else:
                    if pod is not None:
                        pod.close()
                        pod = None
                    steps[name]()
            except Exception as err:
                traceback.print_exc()
                res.errors.append(f"{name}: {type(err).__name__}: {err}".splitlines()[0])
    finally:
        if pod is not None:
            pod.close()
    res.facts["wall_seconds"] = round(time.monotonic() - begin, 1)
    res.save(args.out)
    f = res.facts
    print(f"podvm bench: nproc {f['nproc']}, kernel {f['kernel']}, python {f['python']}, {f['date']}, "
          f"{f['wall_seconds']} s")  # fmt: skip
    print(res.table())
    print(f"(saved {args.out})")
    return 1 if res.errors else 0


if __name__ == "__main__":
    sys.exit(main())
