"""The cache's names: which digest a configured image means now, and whether it still matches."""

import json
import logging
from dataclasses import dataclass, field

from shared.files import read_record
from vmrunner.config import Config
from vmrunner.images.layout import HEX64, RECORD_MAX, Layout

log = logging.getLogger("vmrunner.cache")


@dataclass(frozen=True)
class NameRecord:
    """``names/<name>``: the digest a configured image means now, and where it came from."""

    digest: str  # sha256:<hex>
    source: str
    fetched_at: str
    checksums: dict[str, str] = field(default_factory=dict)  # other algorithms' digests, for IMG_CHECKSUM
    # a base converted from a foreign source: {"from": the conversion (Config.conversion), and the source's digests
    # by algorithm}, which IMG_CHECKSUM is checked against; empty for a base stored as it was fetched
    converted: dict[str, str] = field(default_factory=dict)

    @property
    def hex(self) -> str:
        """The sha256 digest's hex digits."""
        return self.digest.removeprefix("sha256:")


def read_name(layout: Layout, key: str) -> NameRecord | None:
    """The name's record, or None when missing or unreadable (it is then fetched again)."""
    data = read_record(layout.name(key), RECORD_MAX, layout.root)
    try:
        record = NameRecord(**json.loads(data or b"null"))
    except (ValueError, TypeError):
        return None
    return record if record.digest.startswith("sha256:") and HEX64.match(record.hex) else None


def matches_checksum(cfg: Config, record: NameRecord) -> bool:
    """True when ``record`` is of the configured conversion (none for qcow2 and raw) and satisfies IMG_CHECKSUM (or
    none is set): a converted base's checksum is its source's."""
    if record.converted.get("from") != cfg.conversion:
        return False
    if cfg.img_checksum is None:
        return True
    known = record.converted if cfg.conversion else {"sha256": record.hex, **record.checksums}
    return known.get(cfg.img_checksum.algorithm) == cfg.img_checksum.hexdigest


def conversion_key(conversion: str, source_hex: str) -> str:
    """The name that records what converting these source bytes gave: a second fetch of them converts nothing.

    It starts with ``.``, which no configured name can (``IMG_TARGET`` may not, a derived name holds ``@``).
    """
    return f".{conversion}.{source_hex}"


def resolve(cfg: Config, layout: Layout) -> str | None:
    """The digest the configured image names, when it can be used without fetching; None otherwise."""
    record = read_name(layout, cfg.img_name)
    if record is None or not matches_checksum(cfg, record) or layout.stored(record.hex) is None:
        return None
    return record.hex


def lookup(layout: Layout, wanted: str) -> str | None:
    """``sha256:<hex>``, ``<hex>`` or a name, as a digest; None when it names nothing."""
    hexdigest = wanted.removeprefix("sha256:")
    if HEX64.match(hexdigest):
        return hexdigest
    if "/" in wanted or wanted.startswith("."):
        return None
    record = read_name(layout, wanted)
    return record.hex if record else None
