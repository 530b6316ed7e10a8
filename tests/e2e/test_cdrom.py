"""CD-ROMs end to end, one boot: the real sidecar, the real runner (uid 10001, TCG) and the tiny guest, which reads
each drive's volume label from the disc itself. An ISO served by the pod's image server (with its checksum) is in
slot 1 at start and the guest reads its label; ``vmrunner cdrom eject`` empties the drive and ``insert`` puts a local
ISO there on the running VM, which the guest then reads; a file that is not an ISO is refused in one line and the
drive keeps its disc; ``status`` shows what each slot holds and gc keeps what is in a drive."""

import hashlib
import io
import json
from pathlib import Path

import pycdlib
import pytest

from tests.guest.build import ensure_guest
from tests.harness import pod as harness
from tests.harness.scenario import IMAGE_PORT, Scenario, pod_scenario
from tests.harness.wait import until

pytestmark = pytest.mark.guest


def make_iso(path: Path, label: str) -> Path:
    disc = pycdlib.PyCdlib()
    disc.new(interchange_level=3, vol_ident=label, joliet=3, rock_ridge="1.09")
    disc.add_fp(io.BytesIO(label.encode()), len(label), "/LABEL.TXT;1", rr_name="label.txt", joliet_path="/label.txt")
    disc.write(str(path))
    disc.close()
    path.chmod(0o644)
    return path


def cdroms(s: Scenario) -> list[str]:
    """The labels of the discs the guest reads now, one per drive ("-" for an empty drive), sorted."""
    argv = ["curl", "-sf", "--max-time", "20", f"http://{s.net.pod_ip}/cgi-bin/cdroms"]
    done = harness.in_ns(s.bed.client.ns, argv, timeout=30)
    assert done.returncode == 0, done.stderr
    line = done.stdout.decode().strip().removeprefix("cdroms=")
    return sorted(entry.split(":", 1)[1] for entry in line.split(",") if ":" in entry)


def seen(s: Scenario, wanted: str | None = None, gone: str | None = None) -> list[str]:
    """The guest's labels once ``wanted`` is among them and ``gone`` is not."""

    def check() -> list[str] | None:
        found = cdroms(s)
        return found if (wanted is None or wanted in found) and gone not in found else None

    return until(f"the guest to read {wanted} and not {gone}", check, 30, 0.5)


def test_a_cdrom_at_start_then_ejected_and_another_inserted_on_the_running_vm(tmp_path: Path) -> None:
    with pod_scenario("e2e-cdrom", hostname="pet-cdrom", image=ensure_guest()) as s:
        first = make_iso(s.dirs["srv"] / "first.iso", "PODVMCDA")
        digest = hashlib.sha256(first.read_bytes()).hexdigest()
        isos = s.base / "isos"
        isos.mkdir(mode=0o755)
        second = make_iso(isos / "second.iso", "PODVMCDB")
        not_iso = isos / "disk.iso"
        not_iso.write_bytes(b"QFI\xfb" + bytes(200_000))
        not_iso.chmod(0o644)
        url = f"http://127.0.0.1:{IMAGE_PORT}/first.iso"
        env = s.env(VM_CDROMS=f"{url} sha256:{digest} empty")

        runner = s.boot("cdrom.log", env)
        at_start = seen(s, "PODVMCDA")
        status = json.loads(s.vmrunner(env, "status").stdout)

        ejected = s.vmrunner(env, "cdrom", "eject", "1")
        after_eject = seen(s, gone="PODVMCDA")
        inserted = s.vmrunner(env, "cdrom", "insert", "1", str(second))
        after_insert = seen(s, "PODVMCDB")
        refused = s.vmrunner(env, "cdrom", "insert", "1", str(not_iso))
        still = cdroms(s)
        again = s.vmrunner(env, "cdrom", "insert", "2", url, "--checksum", f"sha256:{digest}")
        both = seen(s, "PODVMCDA")
        status_after = json.loads(s.vmrunner(env, "status").stdout)
        gc = json.loads(s.vmrunner(env, "gc", "--dry-run", "--grace", "0s").stdout)
        assert s.stop(runner) == 0, s.report()
        log = runner.text()

    assert at_start == ["-", "PODVMCDA"], at_start  # slot 2 is a drive without a disc; no config drive here
    assert status["cdroms"][0] == {"slot": 1, "tray_open": False, "inserted": True, "digest": f"sha256:{digest}",
                                   "label": "PODVMCDA"}  # fmt: skip
    assert status["cdroms"][1]["inserted"] is False
    assert ejected.returncode == 0, ejected.stderr
    assert after_eject == ["-", "-"], after_eject
    assert inserted.returncode == 0, inserted.stderr
    assert json.loads(inserted.stdout)["label"] == "PODVMCDB"
    assert after_insert == ["-", "PODVMCDB"], after_insert
    assert refused.returncode != 0
    assert "not an ISO 9660 or UDF image" in refused.stderr, refused.stderr
    assert still == ["-", "PODVMCDB"], still  # the refused file never reached the drive
    assert again.returncode == 0, again.stderr
    assert both == ["PODVMCDA", "PODVMCDB"], both
    assert [slot["label"] for slot in status_after["cdroms"]] == ["PODVMCDB", "PODVMCDA"]
    kept = {entry["digest"] for entry in gc["kept"]}
    assert {f"sha256:{digest}", status_after["cdroms"][0]["digest"]} <= kept, gc
    assert "CD-ROM 1: " in log and "PODVMCDA" in log, log
