"""Section 5a, runner overhead: `vmrunner run` to qemu running against qemu started alone."""

import shutil
import tempfile
from pathlib import Path

from bench.runner import overhead_samples
from bench.table import Figure, Results


def bench_overhead(res: Results, runs: int) -> None:
    """Start to qemu running with a cached image: ``vmrunner run`` against qemu alone with the same argv."""
    sec = "5a. runner overhead"
    root = Path(tempfile.mkdtemp(prefix="podvm-bench-overhead-"))
    try:
        runner, qemu = overhead_samples(root, runs)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    alone = "qemu alone: start -> running"
    res.add(Figure(sec, alone, "ms", [t * 1000 for t in qemu]))
    res.add(Figure(sec, "vmrunner run: start -> qemu running (cached image)", "ms", [t * 1000 for t in runner], alone))
    overhead = [(r - q) * 1000 for r, q in zip(runner, qemu, strict=True)]
    res.add(Figure(sec, "runner overhead (paired difference)", "ms", overhead, note="target < 500 ms"))
