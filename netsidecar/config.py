"""The sidecar's inputs, validated before anything changes: environment, the pod's facts and its resolv.conf."""

import hashlib
import ipaddress
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from shared import shutdown
from shared.env import Env, console_pod_port, metrics_port, pod_hostname
from shared.errors import ConfigError

log = logging.getLogger("netsidecar")

BRIDGE = "podvm0"
TAP = "podvm-tap0"
TABLE = "podvm"
# One table of that name per family: ip and ip6 (NAT of each address family), netdev (what the tap may send),
# inet (what the pod accepts from it, and MSS clamping on the forward path).
TABLE_FAMILIES = ("ip", "ip6", "netdev", "inet")
PREFIX = 30
PREFIX6 = 64
# A ULA /64 for the VM side ("podvm" in ASCII as its global ID): outside fd00::/16, where kind, k3s and Cilium put
# their default pod and service ranges, and Calico picks a random ULA /48.
DEFAULT_PREFIX6 = "fd70:6f64:766d::/64"
# The bridge's link-local address: the router the guest learns from router advertisements.
ROUTER6 = ipaddress.IPv6Address("fe80::1")
LINK_LOCAL = ipaddress.IPv6Network("fe80::/64")
IPV4, IPV6 = "ipv4", "ipv6"
RUN_DIR = "/run/podvm"  # RUN_DIR's default: shared with the runner
STATE_DIR = "/run/netsidecar"  # NET_STATE_DIR's default: the sidecar's own
FAMILY_CHOICES = {"auto": (), "ipv4": (IPV4,), "ipv6": (IPV6,), "dual": (IPV4, IPV6)}
VNC_PORT = 5900
DEFAULT_TAP_OWNER = 10001
_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
_IFNAME = re.compile(r"^[A-Za-z0-9_.@-]{1,15}$")
_OPEN_PORT = re.compile(r"^(\d{1,5})(?:/(tcp|udp))?$")
_LABEL = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")
SEARCH_LIMIT = 255
# What the gateway's MAC is derived from besides the hostname (the VM's has no label: its MAC stays as it was). A
# hostname never holds a NUL, so the two derivations never hash the same bytes.
GW_MAC_LABEL = "podvm-gateway\0"


@dataclass(frozen=True)
class Settings:
    """What the environment asks for (validated, independent of the pod's facts)."""

    vm_ip: ipaddress.IPv4Address
    gateway: ipaddress.IPv4Address
    no_vnc: bool
    pod_iface: str | None
    pod_ip: ipaddress.IPv4Address | None
    pod_mtu: int | None
    prefix6: ipaddress.IPv6Network
    pod_ip6: ipaddress.IPv6Address | None
    families: tuple[str, ...]  # what IP_FAMILIES asks for; () means every family the pod has
    mac: str
    gw_mac: str  # the bridge's: the guest's IPv4 gateway and IPv6 router
    hostname: str
    tap_owner: int | None
    tap_queues: int  # VM_NET_QUEUES: 1 a single-queue tap, N a multiqueue one (qemu opens up to N queue pairs)
    open_ports: tuple[tuple[int, str], ...]
    run_dir: Path
    state_dir: Path
    resolv_conf: Path
    pod_wait_timeout: float
    drain_timeout: float  # the runner's stop budget plus its hard-stop grace (shared.shutdown)
    metrics_port: int | None
    console_port: int | None  # CONSOLE_POD_PORT
    metrics_interval: float

    @property
    def vm_ip6(self) -> ipaddress.IPv6Address:
        """The VM's IPv6 address: the EUI-64 of its MAC in VM_IP6_PREFIX, so a guest doing SLAAC with EUI-64
        identifiers forms exactly the address DHCPv6 gives and the DNAT targets."""
        return self.prefix6[eui64(self.mac)]

    @property
    def gateway6(self) -> ipaddress.IPv6Address:
        """The bridge's address in VM_IP6_PREFIX (the guest's router is the bridge's link-local, ROUTER6)."""
        return self.prefix6[1]


@dataclass(frozen=True)
class PodFacts:
    """The pod interface as the kernel (or an override) describes it; a family the pod does not have (or that
    IP_FAMILIES leaves out) is None and is not served."""

    iface: str
    ip: ipaddress.IPv4Address | None
    network: ipaddress.IPv4Network | None
    mtu: int
    ip6: ipaddress.IPv6Address | None = None
    network6: ipaddress.IPv6Network | None = None

    @property
    def families(self) -> tuple[str, ...]:
        """The address families the VM is given."""
        return tuple(f for f, ip in ((IPV4, self.ip), (IPV6, self.ip6)) if ip is not None)


@dataclass(frozen=True)
class Resolv:
    """What the VM gets from the pod's resolv.conf: nameservers of each family and a search list that fits
    option 119 (DHCPv6's domain-search has the same wire form)."""

    nameservers: tuple[str, ...]
    search: tuple[str, ...]
    nameservers6: tuple[str, ...] = ()


def eui64(mac: str) -> int:
    """The modified EUI-64 interface identifier of a MAC (RFC 4291 appendix A), as the low 64 bits."""
    octets = [int(part, 16) for part in mac.split(":")]
    octets[0] ^= 0x02
    return int.from_bytes(bytes([*octets[:3], 0xFF, 0xFE, *octets[3:]]), "big")


def derive_mac(hostname: str, label: str = "") -> str:
    """A stable, locally administered, unicast MAC from the pod hostname, so a restarted pod keeps its lease (the
    VM's, no ``label``) and a VM resumed in a new pod finds its gateway at the MAC its caches hold (GW_MAC_LABEL)."""
    digest = hashlib.sha256(label.encode() + hostname.encode()).digest()
    return ":".join(f"{b:02x}" for b in (0x02, *digest[:5]))


def _mac(env: Env, name: str, derived: str) -> str:
    """The MAC setting ``name`` (VM_MAC, GW_MAC), else ``derived``."""
    raw = env.optional(name)
    if raw is None:
        return derived
    mac = raw.lower().replace("-", ":")
    if not _MAC.match(mac):
        raise ConfigError(f"{name}={raw!r}: expected six hex octets such as 02:00:00:00:00:01")
    if int(mac[:2], 16) & 1:
        raise ConfigError(f"{name}={raw!r}: a multicast address cannot be a NIC's address (first octet must be even)")
    return mac


def _macs(env: Env, hostname: str) -> tuple[str, str]:
    """The VM's MAC and its gateway's, never the same (the guest would take its gateway's frames for its own)."""
    mac = _mac(env, "VM_MAC", derive_mac(hostname))
    gw_mac = _mac(env, "GW_MAC", derive_mac(hostname, GW_MAC_LABEL))
    if gw_mac == mac:
        given = [name for name in ("GW_MAC", "VM_MAC") if env.optional(name) is not None]
        name = given[0] if given else "HOSTNAME"
        raise ConfigError(
            f"{name}={env.values.get(name, hostname)!r}: the VM and its gateway would share the MAC {mac};"
            " set GW_MAC to another one"
        )
    return mac, gw_mac


def _tap_owner(env: Env) -> int | None:
    if "TAP_OWNER" not in env.values:
        return DEFAULT_TAP_OWNER
    raw = env.values["TAP_OWNER"].strip()
    if raw in ("", "root"):
        return None
    return env.integer("TAP_OWNER", DEFAULT_TAP_OWNER, 0, 2**32 - 2) or None


MAX_QUEUES = 8  # queue pairs: past a few the guest's interrupts cost more than the parallel queues bring


def _tap_queues(env: Env) -> int:
    """VM_NET_QUEUES: ``auto`` (one queue pair per vCPU of VM_CPUS, up to 8) or a number from 1 to 16."""
    if env.text("VM_NET_QUEUES", "auto").strip().lower() == "auto":
        return min(env.integer("VM_CPUS", 1, 1, 1024), MAX_QUEUES)
    return env.integer("VM_NET_QUEUES", 1, 1, 16)


def _open_ports(env: Env) -> tuple[tuple[int, str], ...]:
    """VM_OPEN_PORTS: pod-namespace ports the guest may reach, e.g. ``8080,53/udp`` (TCP unless /udp)."""
    raw = env.optional("VM_OPEN_PORTS")
    if raw is None:
        return ()
    ports: dict[tuple[int, str], None] = {}
    for item in raw.split(","):
        match = _OPEN_PORT.match(item.strip())
        if not match or not 1 <= int(match.group(1)) <= 65535:
            raise ConfigError(
                f"VM_OPEN_PORTS={raw!r}: {item.strip()!r} is not a port; expected a comma-separated list such as"
                " 8080,53/udp (1-65535, /tcp by default)"
            )
        ports[(int(match.group(1)), match.group(2) or "tcp")] = None
    return tuple(ports)


def _iface(env: Env, name: str) -> str | None:
    raw = env.optional(name)
    if raw is not None and not _IFNAME.match(raw):
        raise ConfigError(f"{name}={raw!r}: expected an interface name of 1 to 15 characters")
    return raw


def _metrics_interval(env: Env) -> float:
    """METRICS_INTERVAL: how often the sidecar hands its figures to the runner (at least every half second)."""
    interval = env.duration("METRICS_INTERVAL", 10.0)
    if interval < 0.5:
        raise ConfigError(f"METRICS_INTERVAL={env.values['METRICS_INTERVAL']!r}: expected at least 500ms")
    return interval


def _ipv6(env: Env, name: str) -> ipaddress.IPv6Address:
    raw = env.required(name, "an IPv6 address")
    try:
        address = ipaddress.IPv6Address(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r}: expected an IPv6 address such as fd00:10:244::5") from None
    if address.is_link_local or address.is_multicast or address.is_unspecified or address.is_loopback:
        raise ConfigError(f"{name}={raw!r}: expected a unicast address beyond the link (not fe80::/10, ff00::/8)")
    return address


def _prefix6(env: Env) -> ipaddress.IPv6Network:
    """VM_IP6_PREFIX: the /64 behind the bridge (SLAAC needs a /64), not link-local or multicast."""
    raw = env.text("VM_IP6_PREFIX", DEFAULT_PREFIX6)
    try:
        prefix = ipaddress.IPv6Network(raw)
    except ValueError:
        raise ConfigError(
            f"VM_IP6_PREFIX={raw!r}: expected a /64 without host bits, such as {DEFAULT_PREFIX6}"
        ) from None
    first = prefix.network_address
    if prefix.prefixlen != PREFIX6 or first.is_link_local or first.is_multicast or first.is_loopback:
        raise ConfigError(f"VM_IP6_PREFIX={raw!r}: expected a unicast /64 such as {DEFAULT_PREFIX6}")
    return prefix


def pod_from(
    settings: Settings,
    iface: str,
    mtu: int,
    v4: ipaddress.IPv4Interface | None,
    v6: ipaddress.IPv6Interface | None,
) -> PodFacts | None:
    """The pod's facts from what its interface holds, with POD_IP, POD_IP6 and POD_MTU applied and the families
    IP_FAMILIES asks for kept; None while a family it asks for (or, on auto, any family) has no address yet."""
    ip = settings.pod_ip or (v4.ip if v4 else None)
    ip6 = settings.pod_ip6 or (v6.ip if v6 else None)
    wanted = settings.families or (IPV4, IPV6)
    if IPV4 not in wanted:
        ip = None
    if IPV6 not in wanted:
        ip6 = None
    if settings.families and ((IPV4 in wanted and ip is None) or (IPV6 in wanted and ip6 is None)):
        return None
    if ip is None and ip6 is None:
        return None
    # An override that differs from the interface's address counts as a single address (a /32 or /128).
    network = v4.network if v4 and ip == v4.ip else ipaddress.IPv4Network(f"{ip}/32") if ip else None
    network6 = v6.network if v6 and ip6 == v6.ip else ipaddress.IPv6Network(f"{ip6}/128") if ip6 else None
    return PodFacts(iface, ip, network, settings.pod_mtu or mtu, ip6, network6)


def _overlap(a: Path, b: Path) -> bool:
    """Whether one directory is the other or lies inside it (compared as written, ``..`` folded)."""
    a, b = Path(os.path.normpath(a)), Path(os.path.normpath(b))
    return a == b or a in b.parents or b in a.parents


def read_settings(env: Env) -> Settings:
    """Validate the environment; every bad value is a ConfigError naming the variable."""
    vm_ip = env.ipv4("VM_IP", "192.168.254.2")
    gateway = env.ipv4("VM_GW", "192.168.254.1")
    net = ipaddress.IPv4Network(f"{vm_ip}/{PREFIX}", strict=False)
    hosts = set(net.hosts())
    if vm_ip not in hosts:
        raise ConfigError(
            f"VM_IP={vm_ip}: must be a usable host of its /{PREFIX} ({net}), not its network or broadcast"
        )
    if gateway not in hosts or gateway == vm_ip:
        raise ConfigError(f"VM_GW={gateway}: must be the other usable host of VM_IP's /{PREFIX} ({net})")
    pod_ip = env.ipv4("POD_IP", "") if env.optional("POD_IP") is not None else None
    pod_mtu = env.integer("POD_MTU", 0, 576, 65535) if env.optional("POD_MTU") is not None else None
    families = FAMILY_CHOICES[env.choice("IP_FAMILIES", "auto", FAMILY_CHOICES)]
    hostname = pod_hostname(env)
    mac, gw_mac = _macs(env, hostname)
    if env.optional("NET_DRAIN_TIMEOUT") is not None:  # a manifest written for an earlier release
        log.warning("NET_DRAIN_TIMEOUT is no longer read: the network is kept for SHUTDOWN_TIMEOUT, as the runner's")
    run_dir = env.path("RUN_DIR", RUN_DIR)
    state_dir = env.path("NET_STATE_DIR", STATE_DIR)
    if _overlap(run_dir, state_dir):
        raise ConfigError(f"NET_STATE_DIR={state_dir}: must lie outside RUN_DIR={run_dir}, which the runner can write")
    return Settings(
        vm_ip=vm_ip,
        gateway=gateway,
        no_vnc=env.flag("NO_VNC"),
        pod_iface=_iface(env, "POD_IFACE"),
        pod_ip=pod_ip,
        pod_mtu=pod_mtu,
        prefix6=_prefix6(env),
        pod_ip6=_ipv6(env, "POD_IP6") if env.optional("POD_IP6") is not None else None,
        families=families,
        mac=mac,
        gw_mac=gw_mac,
        hostname=hostname,
        tap_owner=_tap_owner(env),
        tap_queues=_tap_queues(env),
        open_ports=_open_ports(env),
        run_dir=run_dir,
        state_dir=state_dir,
        resolv_conf=env.path("RESOLV_CONF", "/etc/resolv.conf"),
        pod_wait_timeout=env.duration("POD_WAIT_TIMEOUT", 30.0),
        drain_timeout=shutdown.network_hold(shutdown.stop_budget(env)),
        metrics_port=metrics_port(env, no_vnc=env.flag("NO_VNC")),
        console_port=console_pod_port(env, no_vnc=env.flag("NO_VNC")),
        metrics_interval=_metrics_interval(env),
    )


def check_overlap(settings: Settings, pod: PodFacts) -> None:
    """The VM's /30 and /64 must not collide with the pod's addresses or subnets, or replies would never reach
    the VM."""
    net = ipaddress.IPv4Network(f"{settings.vm_ip}/{PREFIX}", strict=False)
    if pod.ip is not None and pod.network is not None and (pod.ip in net or net.overlaps(pod.network)):
        raise ConfigError(
            f"VM_IP={settings.vm_ip}: its /{PREFIX} {net} overlaps the pod's {pod.ip}/{pod.network.prefixlen}"
        )
    net6 = settings.prefix6
    if pod.ip6 is not None and pod.network6 is not None and (pod.ip6 in net6 or net6.overlaps(pod.network6)):
        raise ConfigError(f"VM_IP6_PREFIX={net6}: overlaps the pod's {pod.ip6}/{pod.network6.prefixlen}")


def _encoded_length(domain: str) -> int:
    """Bytes of a name in DNS wire form without compression (labels plus the root)."""
    return sum(len(label) + 1 for label in domain.split(".")) + 1


def valid_domain(domain: str) -> bool:
    """A DNS name made of letters, digits and inner hyphens, at most 253 characters."""
    return 0 < len(domain) <= 253 and all(_LABEL.match(label) for label in domain.split("."))


def parse_resolv(text: str, source: str = "resolv.conf") -> Resolv:
    """Nameservers of each family and the last search/domain line of a resolv.conf; invalid or excess names are
    dropped."""
    nameservers: list[str] = []
    nameservers6: list[str] = []
    search: list[str] = []
    for line in text.splitlines():
        words = line.split("#", 1)[0].split(";", 1)[0].split()
        if not words:
            continue
        if words[0] == "nameserver" and len(words) >= 2:
            try:
                address = ipaddress.ip_address(words[1])
            except ValueError:
                log.warning("%s: nameserver %s is not an IP address; the VM does not get it", source, words[1])
                continue
            if isinstance(address, ipaddress.IPv4Address):
                nameservers.append(str(address))
            elif address.is_link_local:
                # A scoped address (fe80::1%eth0) means nothing on the VM's link.
                log.warning("%s: nameserver %s is link-local; the VM does not get it", source, words[1])
            else:
                nameservers6.append(str(address))
        elif words[0] in ("search", "domain"):
            search = [w.rstrip(".") for w in words[1:]]
    kept: list[str] = []
    size = 0
    for domain in search:
        if not valid_domain(domain):
            log.warning("%s: search domain %r is not a valid DNS name; dropped", source, domain)
            continue
        if size + _encoded_length(domain) > SEARCH_LIMIT:
            log.warning("%s: search domain %r dropped: option 119 holds at most %d bytes", source, domain, SEARCH_LIMIT)
            continue
        size += _encoded_length(domain)
        kept.append(domain)
    return Resolv(tuple(dict.fromkeys(nameservers)), tuple(dict.fromkeys(kept)), tuple(dict.fromkeys(nameservers6)))


def read_resolv(path: Path) -> Resolv:
    """The pod's resolv.conf; a missing file means no DNS for the VM (logged), not a failure."""
    try:
        # bytes that are not UTF-8 spoil only their own name, which is then dropped like any invalid one
        return parse_resolv(path.read_text(encoding="utf-8", errors="replace"), str(path))
    except FileNotFoundError:
        log.warning("%s does not exist; the VM gets no nameservers", path)
        return Resolv((), ())
    except OSError as err:
        raise ConfigError(f"RESOLV_CONF={path}: cannot read it: {err.strerror}") from err
