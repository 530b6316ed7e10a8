"""Section 5b, the check of a pet's base before every start, against sha256sum of the base."""

import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from bench.runner import make_image
from bench.table import Figure, Results
from tests.harness.pod import runner_env
from vmrunner.config import load
from vmrunner.pet import disk
from vmrunner.pet.binding import check_bound, prepare


def bench_check(res: Results, size: int, runs: int) -> None:
    """The check of a pet's base at every start (cheap: identity and re-vet) and a full re-hash, for ``size``."""
    sec = "5b. base check at start"
    root = Path(tempfile.mkdtemp(prefix="podvm-bench-check-"))
    try:
        image = root / "base.raw"
        make_image(image, size)
        for name in ("image", "vm", "run"):
            (root / name).mkdir()
        env = runner_env(root, IMG_SOURCE=str(image), IMG_FORMAT="raw", LOG_LEVEL="WARNING")
        cfg = load(env)
        prepare(cfg)
        info = disk.info(cfg, cfg.pet_path)
        cheap, full, sums = [], [], []
        for _ in range(runs):
            begin = time.perf_counter()
            check_bound(cfg, info, restore=False)
            cheap.append((time.perf_counter() - begin) * 1000)
            begin = time.perf_counter()
            check_bound(load({**env, "VERIFY_BASE": "always"}), info, restore=False)
            full.append(time.perf_counter() - begin)
            begin = time.perf_counter()
            subprocess.run(["sha256sum", str(image)], capture_output=True, check=True)
            sums.append(time.perf_counter() - begin)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    gib = size / (1 << 30)
    res.add(Figure(sec, f"every start: identity + re-vet + reference, {gib:.0f} GiB base", "ms", cheap,
                   note="target < 100 ms"))  # fmt: skip
    ref = f"sha256sum of the {gib:.0f} GiB base"
    res.add(Figure(sec, ref, "s", sums))
    res.add(Figure(sec, "full re-hash + vet (changed base or VERIFY_BASE=always)", "s", full, ref))
