"""The config drive: ``/metadata`` and ``/userdata`` turned into an ISO the guest's cloud-init reads.

The file tree is planned as plain data (path -> bytes) and then written with pycdlib, with Rock Ridge and Joliet so
names such as ``meta_data.json`` survive. It is rebuilt at every start because the ConfigMaps may have changed.
"""

import io
import json
import os
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from shared.errors import ConfigError
from shared.files import write_atomic
from shared.handshake import Handshake
from vmrunner.config import Config

# The OpenStack metadata versions cloud-init knows; older readers look for a dated folder, newer for ``latest``.
OPENSTACK_VERSIONS = ("2012-08-10", "latest")
LABELS = {"config-2": "config-2", "nocloud": "cidata"}
# The largest METADATA and USERDATA a drive carries (docs/data-safety.md): user data as much as the most generous
# cloud accepts for one value (GCE 256 KiB; AWS takes 16 KiB, Azure and OpenStack 64 KiB), meta data a quarter of it.
# They bound the ISO, and with it RUN_DIR's size: see RUN_DIR_ROOM.
MAX_SIZES = {"METADATA": 64 << 10, "USERDATA": 256 << 10}
# Besides the ISO, RUN_DIR holds the handshake, the run's state and the network figures: a few KiB.
RUN_DIR_ROOM = 64 << 10


@dataclass(frozen=True)
class DrivePlan:
    """The ISO to write: its volume label and its files (absolute paths inside the ISO, contents)."""

    label: str
    files: dict[str, bytes]


def instance_uuid(hostname: str) -> str:
    """A uuid stable for this VM across restarts, so cloud-init does not redo its first boot."""
    return str(uuid.uuid5(uuid.NAMESPACE_DNS, f"{hostname}.podvm"))


MAX_NODES = 100_000  # nested aliases grow exponentially once written out ("billion laughs"); metadata needs far fewer


def _expanded_size(node: "yaml.Node | None", sizes: dict[int, int]) -> int:
    """How many values ``node`` has with every alias written out, each shared node counted once per use but
    measured once; a node that contains itself counts as too many."""
    if node is None or isinstance(node, yaml.ScalarNode):
        return 1
    if id(node) in sizes:
        return sizes[id(node)]
    sizes[id(node)] = MAX_NODES + 1  # while measured: reached again from inside means it contains itself
    children = [part for pair in node.value for part in pair] if isinstance(node, yaml.MappingNode) else node.value
    total = 1
    for child in children:
        total += _expanded_size(child, sizes)
        if total > MAX_NODES:
            break
    sizes[id(node)] = total
    return total


def read_input(path: Path, variable: str) -> bytes | None:
    """The bytes of ``path`` (METADATA or USERDATA), at most ``MAX_SIZES[variable]``; None when it is absent.

    :raise ConfigError: naming the variable when the file cannot be read or is larger than its maximum.
    """
    limit = MAX_SIZES[variable]
    try:
        with path.open("rb") as source:
            data = source.read(limit + 1)
    except FileNotFoundError:
        return None
    except OSError as err:
        raise ConfigError(f"{variable}={path}: cannot read: {err.strerror}") from None
    if len(data) > limit:
        raise ConfigError(f"{variable}={path}: larger than {limit >> 10} KiB, the most a config drive carries")
    return data


def read_yaml(path: Path, variable: str) -> dict[str, Any] | None:
    """The YAML mapping in ``path``; None when the file is absent.

    :raise ConfigError: naming the file and line when it is too large, not valid YAML or not a mapping.
    """
    data = read_input(path, variable)
    return None if data is None else parse_yaml(data, path, variable)


def parse_yaml(data: bytes, path: Path, variable: str) -> dict[str, Any]:
    """The YAML mapping in ``data``, read from ``path``.

    :raise ConfigError: naming the file and line when it is not valid YAML or not a mapping.
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{variable}={path}: not UTF-8 text (byte {err.start})") from None
    try:
        size = _expanded_size(yaml.compose(text, Loader=yaml.SafeLoader), {})
        if size > MAX_NODES:  # the data is written out as JSON, where each alias becomes a copy
            raise ConfigError(f"{variable}={path}: over {MAX_NODES} values once its YAML aliases are expanded")
        document = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or "invalid"
        raise ConfigError(f"{variable}={path}: invalid YAML{where}: {problem}") from None
    except (ValueError, RecursionError) as err:  # a date such as 2021-02-30; nesting deeper than Python's stack
        raise ConfigError(f"{variable}={path}: invalid YAML: {err}") from None
    if document is None:
        return {}
    if not isinstance(document, dict):
        raise ConfigError(f"{variable}={path}: expected a YAML mapping, got {type(document).__name__}")
    return document


def read_userdata(path: Path) -> bytes | None:
    """User data as given; a ``#cloud-config`` document must be valid YAML (cloud-init would ignore it silently)."""
    data = read_input(path, "USERDATA")
    if data is not None and data.startswith(b"#cloud-config"):
        parse_yaml(data, path, "USERDATA")
    return data


def merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``over`` merged into ``base``: mappings merge key by key, anything else replaces."""
    merged = dict(base)
    for key, value in over.items():
        old = merged.get(key)
        merged[key] = merge(old, value) if isinstance(old, Mapping) and isinstance(value, Mapping) else value
    return merged


def meta_data(hostname: str, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """OpenStack meta data: stable uuid, the pod's hostname and name, then the user's YAML on top."""
    defaults = {"uuid": instance_uuid(hostname), "hostname": hostname, "name": hostname, "launch_index": 0}
    return merge(defaults, overrides)


def plan_drive(kind: str, hostname: str, metadata: dict[str, Any] | None, userdata: bytes | None) -> DrivePlan | None:
    """The ISO's files for ``kind`` (config-2 or nocloud); None when there is neither metadata nor user data."""
    if metadata is None and userdata is None:
        return None
    meta = meta_data(hostname, metadata or {})
    if kind == "nocloud":
        nocloud = merge({"instance-id": meta["uuid"], "local-hostname": meta["hostname"]}, metadata or {})
        return DrivePlan(
            LABELS[kind],
            {
                "/meta-data": yaml.safe_dump(nocloud, sort_keys=True).encode(),
                "/user-data": userdata if userdata is not None else b"",
            },
        )
    files: dict[str, bytes] = {}
    document = (json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n").encode()
    for version in OPENSTACK_VERSIONS:
        files[f"/openstack/{version}/meta_data.json"] = document
        if userdata is not None:
            files[f"/openstack/{version}/user_data"] = userdata
    return DrivePlan(LABELS[kind], files)


def _check_keys(data: object, source: str) -> None:
    """Meta data becomes JSON with sorted keys: every mapping key must be a string (YAML reads ``on: x`` as True)."""
    if isinstance(data, dict):
        for key, value in data.items():
            if not isinstance(key, str):
                raise ConfigError(f"{source}: key {key!r} is not a string; quote it")
            _check_keys(value, source)
    elif isinstance(data, list):
        for item in data:
            _check_keys(item, source)


def plan_from_config(cfg: Config) -> DrivePlan | None:
    """Read ``METADATA`` and ``USERDATA`` and plan the drive."""
    metadata = read_yaml(cfg.metadata, "METADATA")
    _check_keys(metadata, f"METADATA={cfg.metadata}")
    return plan_drive(cfg.config_drive, cfg.hostname, metadata, read_userdata(cfg.userdata))


def _network_data(hs: Handshake) -> dict[str, Any]:
    """OpenStack ``network_data.json``: the NIC by its MAC, IPv4 by DHCP as before, IPv6 static."""
    assert hs.ipv6 is not None
    link = {"id": "podvm", "type": "phy", "ethernet_mac_address": hs.mac, "mtu": hs.mtu}
    networks: list[dict[str, Any]] = []
    if hs.vm_ip is not None:
        networks.append({"id": "podvm-ipv4", "type": "ipv4_dhcp", "link": "podvm"})
    networks.append(
        {
            "id": "podvm-ipv6",
            "type": "ipv6",
            "link": "podvm",
            "ip_address": hs.ipv6.vm_ip,
            "netmask": "ffff:ffff:ffff:ffff::",
            "routes": [{"network": "::", "netmask": "::", "gateway": hs.ipv6.gateway}],
        }
    )
    services = [{"type": "dns", "address": address} for address in (*hs.ipv6.dns, *hs.dns)]
    return {"links": [link], "networks": networks, "services": services}


def _network_config(hs: Handshake) -> dict[str, Any]:
    """NoCloud ``network-config`` (version 2): the same as ``_network_data``, with the search list. The NIC found by
    its MAC is named eth0: without ``set-name`` cloud-init's ifupdown renderer would configure an interface that does
    not exist (config-2 needs no name, cloud-init maps the MAC itself)."""
    assert hs.ipv6 is not None
    nic: dict[str, Any] = {
        "match": {"macaddress": hs.mac},
        "set-name": "eth0",
        "mtu": hs.mtu,
        "dhcp4": hs.vm_ip is not None,
        "dhcp6": False,
        "accept-ra": True,
        "addresses": [f"{hs.ipv6.vm_ip}/{hs.ipv6.prefix}"],
        "gateway6": hs.ipv6.gateway,
    }
    if hs.ipv6.dns or hs.dns or hs.search:
        nic["nameservers"] = {"addresses": [*hs.ipv6.dns, *hs.dns], "search": list(hs.search)}
    return {"version": 2, "ethernets": {"eth0": nic}}


def with_network(plan: DrivePlan, hs: Handshake) -> DrivePlan:
    """``plan`` plus the guest's network configuration where the VM has IPv6, so a cloud-init guest configures its
    IPv6 address, route and nameservers even without DHCPv6 (IPv4 stays on DHCP, as without these files)."""
    if hs.ipv6 is None:
        return plan
    files = dict(plan.files)
    if plan.label == LABELS["nocloud"]:
        files["/network-config"] = yaml.safe_dump(_network_config(hs), sort_keys=True).encode()
    else:
        # Beside meta_data.json in every version folder: cloud-init reads all files from the dated folder it picked.
        document = (json.dumps(_network_data(hs), indent=2, sort_keys=True) + "\n").encode()
        for version in OPENSTACK_VERSIONS:
            files[f"/openstack/{version}/network_data.json"] = document
    return DrivePlan(plan.label, files)


def _iso_name(part: str, is_file: bool) -> str:
    """An ISO9660 level-3 name for ``part`` (Rock Ridge and Joliet carry the real one)."""
    stem, _, ext = part.rpartition(".") if is_file and "." in part else (part, "", "")
    clean = "".join(c if c.isalnum() else "_" for c in (stem or part).upper())[:30]
    return f"{clean}.{''.join(c if c.isalnum() else '_' for c in ext.upper())[:3]};1" if is_file else clean[:31]


def render(plan: DrivePlan) -> bytes:
    """The ISO image bytes of ``plan``; a file whose content is already on it (user data and meta data are in each
    OpenStack version folder) is a hard link to the same data, so the ISO holds it once."""
    import pycdlib

    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=3, vol_ident=plan.label, joliet=3, rock_ridge="1.09")
    made: set[str] = set()
    first: dict[bytes, str] = {}  # content -> the ISO9660 path that holds it
    for path, content in sorted(plan.files.items()):
        parts = path.strip("/").split("/")
        iso_dir = ""
        for depth, part in enumerate(parts[:-1]):
            iso_dir += "/" + _iso_name(part, is_file=False)
            if iso_dir not in made:
                iso.add_directory(iso_dir, rr_name=part, joliet_path="/" + "/".join(parts[: depth + 1]))
                made.add(iso_dir)
        iso_file = f"{iso_dir}/{_iso_name(parts[-1], is_file=True)}"
        if content in first and content:
            iso.add_hard_link(iso_old_path=first[content], iso_new_path=iso_file, rr_name=parts[-1])
            iso.add_hard_link(iso_old_path=first[content], joliet_new_path=path)
            continue
        iso.add_fp(io.BytesIO(content), len(content), iso_file, rr_name=parts[-1], joliet_path=path)
        first[content] = iso_file
    out = io.BytesIO()
    iso.write_fp(out)
    iso.close()
    return out.getvalue()


def write(plan: DrivePlan, path: Path, where: str, besides: int = 0) -> None:
    """Write the ISO atomically, readable only by the runner (user data may hold secrets).

    The directory's free space is checked first, so a volume too small for the drive is one line naming ``where``
    (the directory, or its variable), never a half-written file or an eviction.

    :raise ConfigError: when the directory has no room for the ISO and ``besides`` bytes more.
    """
    image = render(plan)
    stat = os.statvfs(path.parent)
    free = stat.f_bavail * stat.f_frsize
    if free < len(image) + besides:
        more = f" and {besides >> 10} KiB for its other files" if besides else ""
        raise ConfigError(
            f"{where}: {free >> 10} KiB free, the config drive needs {-(-len(image) >> 10)} KiB{more}: "
            "give the volume more room"
        )
    write_atomic(path, image, mode=0o600)
