"""One boot from a foreign disk end to end: the tiny guest as a stream-optimized vmdk inside an OVA, served by the
pod's image server, fetched, vetted and converted by the real runner (uid 10001, no capabilities, TCG), answers on
the pod IP. The other formats are proven without a boot in tests/vm/test_vm_formats.py."""

import hashlib
import json
import subprocess
from pathlib import Path

import pytest

from tests.guest.build import ensure_guest
from tests.harness import foreign
from tests.harness import pod as harness
from tests.harness.scenario import IMAGE_PORT, pod_scenario

pytestmark = pytest.mark.guest


def test_the_guest_from_an_ova_boots_and_answers_on_the_pod_ip(tmp_path: Path) -> None:
    vmdk = foreign.convert(ensure_guest(), "vmdk-stream", tmp_path / "guest.vmdk")
    with pod_scenario("e2e-ova", hostname="pet-ova", image=None) as pod:
        ova = foreign.ova_of(vmdk, pod.dirs["srv"] / "guest.ova")
        with open(ova, "rb") as f:
            checksum = hashlib.file_digest(f, "sha256").hexdigest()
        env = pod.env(IMG_SOURCE=f"http://127.0.0.1:{IMAGE_PORT}/guest.ova", IMG_FORMAT="ova",
                      IMG_CHECKSUM=f"sha256:{checksum}")  # fmt: skip
        runner = pod.boot("ova.log", env)
        page = harness.guest_page(pod.net)
        assert page["ip"] == pod.handshake.vm_ip, pod.report()
        assert pod.stop(runner) == 0, pod.report()
        log = runner.text()
        assert "system disk vmdisk1 (disk1.vmdk) taken from the OVA" in log and "converted " in log, log
        pet = pod.dirs["vm"] / "pet-ova.qcow2"
        info = subprocess.run(["qemu-img", "info", "-U", "-f", "qcow2", "--output=json", str(pet)],
                              capture_output=True, text=True, check=True)  # fmt: skip
        found = json.loads(info.stdout)
        assert found["backing-filename-format"] == "qcow2", "the pet is on the converted qcow2 base"
        assert found["backing-filename"].startswith(f"{pod.dirs['image']}/sha256/")
