"""The one reader and writer of the kernel's nftables rules (libnftables' JSON API), and the one parser of the rules
and counters it lists, for `run`, `down`, `status`, the figures and the probes.

What the rules are is planned in :mod:`netsidecar.plan`; this module only loads, removes and reads them.
"""

import json
from collections.abc import Mapping
from typing import Any

from netsidecar.config import TABLE, TABLE_FAMILIES
from netsidecar.plan import Json
from shared.errors import PodvmError


def _nft() -> Any:
    import nftables  # noqa: PLC0415 - loads libnftables, only where rules are touched

    nft = nftables.Nftables()
    nft.set_json_output(True)
    nft.set_handle_output(False)
    return nft


def apply_ruleset(document: Json) -> None:
    """Replace the podvm tables (NAT and guest isolation) in one transaction; on error the kernel keeps what it had."""
    rc, _out, err = _nft().json_cmd(document)
    if rc != 0:
        raise PodvmError(f"nftables refused the ruleset: {err.strip()}")


def remove_ruleset(document: Json) -> None:
    """Apply the teardown's document: each table is added then deleted, so this succeeds whichever exist."""
    _nft().json_cmd(document)


def podvm_rules() -> list[Json]:
    """The podvm tables' rules as nftables lists them, with their counters (guest-isolation drops carry their name
    as comment); a table that is missing has none."""
    nft = _nft()
    found: list[Json] = []
    for family in TABLE_FAMILIES:
        rc, out, _err = nft.cmd(f"list table {family} {TABLE}")
        if rc == 0:
            found += rules(json.loads(out))
    return found


def ruleset() -> Json:
    """The namespace's whole ruleset as nftables lists it (every table, whoever made it).

    :raise PodvmError: when nftables cannot list the ruleset.
    """
    rc, out, err = _nft().cmd("list ruleset")
    if rc != 0:
        raise PodvmError(f"cannot list the nftables ruleset: {err.strip()}")
    listed: Json = json.loads(out or '{"nftables": []}')
    return listed


def rules(document: Mapping[str, Any]) -> list[Json]:
    """The rules of a listing (the nftables JSON API's document), in order."""
    return [item["rule"] for item in document.get("nftables", []) if isinstance(item.get("rule"), dict)]


def _exprs(rule: Json) -> list[Json]:
    return [expr for expr in rule.get("expr", []) if isinstance(expr, dict)]


def counter(rule: Json) -> dict[str, int] | None:
    """The packets and bytes a rule's counter holds, or None for a rule without a counter."""
    for expr in _exprs(rule):
        if isinstance(expr.get("counter"), dict):
            return {"packets": int(expr["counter"].get("packets", 0)), "bytes": int(expr["counter"].get("bytes", 0))}
    return None


def verdicts(rule: Json) -> set[str]:
    """The statements a rule holds (``drop``, ``dnat``, ``snat``, ``return``, ``counter``, ``match``...)."""
    return {key for expr in _exprs(rule) for key in expr}


def dnat_address(rule: Json) -> str | None:
    """The address a rule DNATs to, if it does."""
    for expr in _exprs(rule):
        if isinstance(expr.get("dnat"), dict) and isinstance(expr["dnat"].get("addr"), str):
            return str(expr["dnat"]["addr"])
    return None


def kept_port(rule: Json) -> int | None:
    """The TCP port a rule matches (the NAT's rules that keep a port in the pod)."""
    for expr in _exprs(rule):
        match = expr.get("match", {})
        if match.get("left") == {"payload": {"protocol": "tcp", "field": "dport"}} and isinstance(match["right"], int):
            return int(match["right"])
    return None
