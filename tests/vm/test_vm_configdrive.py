"""The config drive read back by pycdlib and by cloud-init's own config-drive reader (from Debian's package)."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pycdlib
import pytest

from shared.env import parse_size
from shared.handshake import Ipv6
from tests.harness import samples
from tests.harness.paths import REPO, VMRUNNER
from tests.harness.pod import require, runner_env
from vmrunner.run import configdrive

CLOUD_INIT_CACHE = REPO / ".cache" / "cloud-init"
RUN_DIR_SIZE = parse_size("2Mi")  # the run volume's sizeLimit in deploy/ (tests/unit/test_manifests.py checks it)


@pytest.fixture(scope="session")
def cloud_init() -> Path:
    """Debian's cloud-init unpacked (not installed) once into .cache; its python path."""
    site = CLOUD_INIT_CACHE / "root" / "usr" / "lib" / "python3" / "dist-packages"
    if not (site / "cloudinit").is_dir():
        require("apt-get")
        CLOUD_INIT_CACHE.mkdir(parents=True, exist_ok=True)
        for old in CLOUD_INIT_CACHE.glob("*.deb"):
            old.unlink()
        got = subprocess.run(
            ["apt-get", "download", "cloud-init"], cwd=CLOUD_INIT_CACHE, capture_output=True, text=True, check=False
        )
        if got.returncode != 0:
            pytest.fail(f"apt-get download cloud-init failed: {got.stderr.strip()}")
        (deb,) = CLOUD_INIT_CACHE.glob("cloud-init_*.deb")
        subprocess.run(["dpkg", "-x", str(deb), str(CLOUD_INIT_CACHE / "root")], check=True)
    return site


def extract(iso_path: Path, into: Path) -> dict[str, bytes]:
    """Every file of the ISO by its Rock Ridge name, also written under ``into`` (this kernel cannot mount it)."""
    iso = pycdlib.PyCdlib()
    iso.open(str(iso_path))
    files: dict[str, bytes] = {}
    try:
        for root, _dirs, names in iso.walk(rr_path="/"):
            for name in names:
                path = f"{root.rstrip('/')}/{name}"
                out = io.BytesIO()
                iso.get_file_from_iso_fp(out, rr_path=path)
                files[path] = out.getvalue()
                target = into / path.lstrip("/")
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(out.getvalue())
        label = iso.pvd.volume_identifier.decode().strip()
    finally:
        iso.close()
    files["label"] = label.encode()
    return files


def read_with_cloud_init(drive: Path, cloud_init: Path) -> dict[str, Any]:
    """What cloud-init's own reader (``ConfigDriveReader.read_v2``) makes of an extracted config-2 drive."""
    reader = (
        "import json, sys\n"
        "from cloudinit.sources.helpers.openstack import ConfigDriveReader\n"
        "r = ConfigDriveReader(sys.argv[1]).read_v2()\n"
        "print(json.dumps({'meta': r['metadata'], 'ud': r['userdata'].decode(), 'version': r['version']}))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", reader, str(drive)],
        env={**os.environ, "PYTHONPATH": str(cloud_init)},
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def test_config2_drive_is_read_by_cloud_init(tmp_path: Path, shared_dir: Path, cloud_init: Path) -> None:
    (shared_dir / "metadata").write_text("name: db-server\nmeta:\n  role: db\npublic_keys:\n  k: ssh-ed25519 AAAA x\n")
    userdata = b"#cloud-config\nruncmd:\n  - [touch, /tmp/ok]\n"
    (shared_dir / "userdata").write_bytes(userdata)
    iso = tmp_path / "drive.iso"
    env = runner_env(shared_dir, IMG_SOURCE="/unused.qcow2")
    subprocess.run([*VMRUNNER, "configdrive", str(iso)], env=env, check=True)
    assert iso.stat().st_mode & 0o777 == 0o600
    files = extract(iso, tmp_path / "drive")
    assert files["label"] == b"config-2"
    result = read_with_cloud_init(tmp_path / "drive", cloud_init)
    assert result["version"] == 2
    assert result["ud"] == userdata.decode()
    meta = result["meta"]
    assert (meta["hostname"], meta["name"], meta["meta"]) == ("vm-0", "db-server", {"role": "db"})
    assert meta["public_keys"] == {"k": "ssh-ed25519 AAAA x"}
    first_uuid = meta["uuid"]
    subprocess.run([*VMRUNNER, "configdrive", str(iso)], env=env, check=True)
    again = extract(iso, tmp_path / "again")
    assert json.loads(again["/openstack/latest/meta_data.json"])["uuid"] == first_uuid
    assert "/openstack/2012-08-10/meta_data.json" in again


# cloud-init's own reading of the network files: config-2 through its OpenStack converter (the MAC mapped to the
# guest's NIC name), NoCloud's version 2 through its parser; both rendered by its ifupdown renderer.
NETWORK_READER = """\
import json, sys, yaml
from cloudinit.net import eni, network_state
from cloudinit.sources.helpers.openstack import ConfigDriveReader, convert_net_json
root, kind, mac = sys.argv[1:4]
if kind == "config-2":
    config = convert_net_json(ConfigDriveReader(root).read_v2()["networkdata"], known_macs={mac: "ens3"})
else:
    config = yaml.safe_load(open(root + "/network-config"))
print(eni.Renderer()._render_interfaces(network_state.parse_net_config_data(config, skip_broken=False)))
"""


@pytest.mark.parametrize("kind", ["config-2", "nocloud"])
def test_ipv6_network_config_is_read_by_cloud_init(
    kind: str, tmp_path: Path, shared_dir: Path, cloud_init: Path
) -> None:
    """With a dual-stack handshake in RUN_DIR the drive tells cloud-init the VM's IPv6 address, its gateway and
    the nameservers, so the guest has them even without DHCPv6; IPv4 stays on DHCP."""
    (shared_dir / "userdata").write_text("#cloud-config\n{}\n")
    (shared_dir / "run").mkdir(exist_ok=True)
    ipv6 = Ipv6("fd70:6f64:766d::ff:fe00:aa", "fd70:6f64:766d::1", "fe80::1", 64, "fd00::5", ("fd00::10",))
    hs = samples.handshake(families=("ipv4", "ipv6"), ipv6=ipv6)
    hs.write(shared_dir / "run")
    iso = tmp_path / "drive.iso"
    env = runner_env(shared_dir, IMG_SOURCE="/unused.qcow2", CONFIG_DRIVE=kind)
    subprocess.run([*VMRUNNER, "configdrive", str(iso)], env=env, check=True)
    extract(iso, tmp_path / "drive")
    done = subprocess.run(
        [sys.executable, "-c", NETWORK_READER, str(tmp_path / "drive"), kind, hs.mac],
        env={**os.environ, "PYTHONPATH": str(cloud_init)},
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    name = "ens3" if kind == "config-2" else "eth0"
    assert f"iface {name} inet dhcp" in done.stdout, done.stdout
    assert f"iface {name} inet6 static" in done.stdout and f"address {ipv6.vm_ip}/64" in done.stdout
    assert ipv6.gateway in done.stdout and "fd00::10" in done.stdout and "mtu 1440" in done.stdout


def test_nocloud_drive(tmp_path: Path, shared_dir: Path) -> None:
    (shared_dir / "userdata").write_text("#cloud-config\n{}\n")
    iso = tmp_path / "drive.iso"
    env = runner_env(shared_dir, IMG_SOURCE="/unused.qcow2", CONFIG_DRIVE="nocloud")
    subprocess.run([*VMRUNNER, "configdrive", str(iso)], env=env, check=True)
    files = extract(iso, tmp_path / "drive")
    assert files["label"] == b"cidata"
    assert files["/user-data"] == b"#cloud-config\n{}\n"
    assert b"instance-id: " in files["/meta-data"] and b"local-hostname: vm-0" in files["/meta-data"]


def test_invalid_metadata_fails_with_one_line_and_writes_nothing(tmp_path: Path, shared_dir: Path) -> None:
    (shared_dir / "metadata").write_text("name: x\n  bad: indent\n")
    iso = tmp_path / "drive.iso"
    done = subprocess.run(
        [*VMRUNNER, "configdrive", str(iso)],
        env=runner_env(shared_dir, IMG_SOURCE="/unused.qcow2"),
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 2
    assert f"METADATA={shared_dir}/metadata: invalid YAML at line 2" in done.stderr
    assert not iso.exists() and not list(tmp_path.glob(".drive.iso*"))


def test_a_full_disk_is_one_line_naming_the_directory_and_leaves_nothing(shared_dir: Path) -> None:
    """A real small file system: the drive for a 16 KiB tmpfs in a private mount namespace is refused up front."""
    (shared_dir / "metadata").write_text("name: full\n")
    full = shared_dir / "full"
    full.mkdir()
    script = 'mount -t tmpfs -o size=16k tmpfs "$1" && shift && "$@"; status=$?; ls -A "$0"; exit $status'
    done = subprocess.run(
        [
            *("unshare", "--mount", "--propagation", "private", "sh", "-c", script, str(full), str(full)),
            *(*VMRUNNER, "configdrive", str(full / "drive.iso")),
        ],
        env=runner_env(shared_dir, IMG_SOURCE="/image/base.qcow2"),
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [done.stderr.strip()], "one line, no traceback"
    assert f"{full}: 16 KiB free, the config drive needs " in done.stderr
    assert done.stdout == ""  # nothing left on the full file system, not even the temporary file


def largest_inputs(root: Path) -> tuple[bytes, bytes]:
    """METADATA and USERDATA of exactly the documented maxima (valid YAML both), written under ``root``."""
    head = b"meta:\n  filler: "
    metadata = head + b"m" * (configdrive.MAX_SIZES["METADATA"] - len(head) - 1) + b"\n"
    head = b"#cloud-config\n# "
    userdata = head + b"u" * (configdrive.MAX_SIZES["USERDATA"] - len(head) - 1) + b"\n"
    (root / "metadata").write_bytes(metadata)
    (root / "userdata").write_bytes(userdata)
    return metadata, userdata


def test_a_drive_at_the_documented_maxima_builds_and_cloud_init_reads_it(
    tmp_path: Path, shared_dir: Path, cloud_init: Path
) -> None:
    metadata, userdata = largest_inputs(shared_dir)
    iso = tmp_path / "drive.iso"
    subprocess.run([*VMRUNNER, "configdrive", str(iso)], env=runner_env(shared_dir, IMG_SOURCE="/x.qcow2"), check=True)
    extract(iso, tmp_path / "drive")
    result = read_with_cloud_init(tmp_path / "drive", cloud_init)
    assert len(result["ud"].encode()) == len(userdata)
    assert b"filler: " + result["meta"]["meta"]["filler"].encode() + b"\n" == metadata.split(b"\n  ", 1)[1]
    assert iso.stat().st_size + configdrive.RUN_DIR_ROOM <= RUN_DIR_SIZE, "the manifests' RUN_DIR holds it"


@pytest.mark.parametrize("variable", ["METADATA", "USERDATA"])
def test_one_byte_over_the_maximum_is_one_line_naming_the_variable(
    tmp_path: Path, shared_dir: Path, variable: str
) -> None:
    largest_inputs(shared_dir)
    name = variable.lower()
    (shared_dir / name).write_bytes((shared_dir / name).read_bytes() + b"#")
    iso = tmp_path / "drive.iso"
    done = subprocess.run(
        [*VMRUNNER, "configdrive", str(iso)],
        env=runner_env(shared_dir, IMG_SOURCE="/x.qcow2"),
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [done.stderr.strip()], "one line, no traceback"
    limit = configdrive.MAX_SIZES[variable] >> 10
    assert f"{variable}={shared_dir}/{name}: larger than {limit} KiB, the most a config drive carries" in done.stderr
    assert not iso.exists()


def test_run_refuses_a_drive_its_small_run_dir_cannot_hold_before_qemu(shared_dir: Path, qcow2_bytes: bytes) -> None:
    """``vmrunner run`` with RUN_DIR on a real 256 KiB tmpfs and user data at the maximum: one line naming RUN_DIR,
    exit 2, no ISO and no qemu (the handshake and the image are there, so it gets as far as the drive)."""
    largest_inputs(shared_dir)
    (shared_dir / "base.qcow2").write_bytes(qcow2_bytes)
    staged = shared_dir / "staged"
    staged.mkdir()
    samples.handshake().write(staged)
    run_dir = shared_dir / "run"
    script = (
        'mount -t tmpfs -o size=256k tmpfs "$1" && cp "$2/network.json" "$1/" && shift 2 && "$@"; status=$?; '
        'ls -A "$0" >&2; exit $status'
    )
    done = subprocess.run(
        [
            *("unshare", "--mount", "--propagation", "private", "sh", "-c", script, str(run_dir), str(run_dir)),
            *(str(staged), *VMRUNNER, "run"),
        ],
        env=runner_env(shared_dir, IMG_SOURCE=str(shared_dir / "base.qcow2"), QEMU="/nonexistent/qemu"),
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and f"RUN_DIR={run_dir}: " in errors[0], done.stderr
    assert "the config drive needs" in errors[0] and "KiB for its other files" in errors[0]
    listed = [line for line in done.stderr.splitlines() if " vmrunner: " not in line]  # ls of RUN_DIR
    assert "network.json" in listed and not [n for n in listed if "config-drive" in n], "no ISO, not even a temporary"
    assert "Traceback" not in done.stderr
