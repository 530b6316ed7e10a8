"""The saved state's binding, as data: what counts as hardware, how the machine is pinned, what refuses a resume."""

import json

import pytest

from vmrunner.run import suspend

ARGV = (
    "qemu-system-x86_64",
    "-name",
    "vm-0,debug-threads=on",
    "-machine",
    "q35,smm=on",
    "-m",
    "256M",
    "-vnc",
    ":0",
    "-chardev",
    "socket,id=qmp,path=/run/podvm/qmp.sock",
    "-device",
    "virtio-net-pci,netdev=net0,mac=02:00:00:00:00:01",
)


def record(**change: object) -> suspend.Record:
    digest, machine = suspend.hardware_digest(ARGV)
    fields: dict[str, object] = {
        "version": 1,
        "sha256": "0" * 64,
        "size": 10,
        "hardware": digest,
        "machine": machine,
        "pinned": "pc-q35-7.2",
        "saved": 0.0,
        "seconds": 1.0,
        "own": {"vm-0.qcow2": [1, 2, 3, 4]},
        **change,
    }
    return suspend.Record(**fields)  # type: ignore[arg-type]


def test_what_differs_between_two_pods_is_not_hardware_but_memory_and_devices_are() -> None:
    digest, machine = suspend.hardware_digest(ARGV)
    assert machine == "q35,smm=on"
    other_pod = tuple(":1" if a == ":0" else a.replace("/run/podvm", "/run/other") for a in ARGV)
    assert suspend.hardware_digest(other_pod)[0] == digest
    more_memory = tuple("320M" if a == "256M" else a for a in ARGV)
    assert suspend.hardware_digest(more_memory)[0] != digest
    other_mac = tuple(a.replace("02:00:00:00:00:01", "02:00:00:00:00:02") for a in ARGV)
    assert suspend.hardware_digest(other_mac)[0] != digest
    resumed = (*ARGV, "-S", "-incoming", "fd:7")
    assert suspend.hardware_digest(resumed)[0] == digest


def test_a_state_saved_on_an_alias_resumes_on_its_versioned_name_with_its_options() -> None:
    assert suspend.runs_on(record()) == "pc-q35-7.2,smm=on"
    digest = suspend.hardware_digest(ARGV)[0]
    own = {"vm-0.qcow2": [1, 2, 3, 4]}
    assert suspend.judge(record(), own, digest, "pc-q35-7.2,smm=on") is None
    assert suspend.judge(record(), own, digest, "pc-q35-8.2,smm=on") is not None


def test_anything_changed_since_the_save_refuses_the_resume() -> None:
    digest, machine = suspend.hardware_digest(ARGV)
    own = {"vm-0.qcow2": [1, 2, 3, 4]}
    assert suspend.judge(record(), own, digest, machine) is None
    why = suspend.judge(record(), {"vm-0.qcow2": [1, 2, 3, 5]}, digest, machine)
    assert why == "vm-0.qcow2 changed since the save (written, restored or rebased)"
    grown = suspend.judge(record(), {**own, "vm-0.efivars.fd": [9, 9, 9, 9]}, digest, machine)
    assert grown is not None and "vm-0.efivars.fd" in grown
    assert (
        suspend.judge(record(), own, digest, "pc")
        == "the machine is 'pc' now, the state was saved on 'pc-q35-7.2,smm=on'"
    )
    assert suspend.judge(record(), own, "other", machine) is not None


def test_a_record_is_checked_field_by_field() -> None:
    good = suspend.record_document(record())
    assert suspend.parse_record(good) == record()
    doc = json.loads(good)
    for bad in ({"own": {"x": [1, 2]}}, {"sha256": "short"}, {"extra": 1}, {"version": 2}):
        with pytest.raises(ValueError):
            suspend.parse_record(json.dumps({**doc, **bad}).encode())
