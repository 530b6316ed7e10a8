"""Figures of a benchmark run and the one table they print as (also saved as JSON)."""

import json
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class Figure:
    """One measured quantity: its samples, and the figure of the same section it is compared with (if any)."""

    section: str
    name: str
    unit: str
    values: list[float]
    ref: str | None = None
    note: str = ""
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def median(self) -> float:
        """Median of the samples (NaN without samples)."""
        return statistics.median(self.values) if self.values else float("nan")


class Results:
    """The figures of one run, in the order measured."""

    def __init__(self) -> None:
        self.figures: list[Figure] = []
        self.facts: dict[str, object] = {}
        self.errors: list[str] = []

    def add(self, figure: Figure) -> Figure:
        """Record a figure (and return it)."""
        self.figures.append(figure)
        return figure

    def sample(self, section: str, name: str, value: float, *, unit: str = "ms", ref: str | None = None,
               note: str = "") -> Figure:  # fmt: skip
        """Append one sample to figure ``name`` of ``section``, made on first use."""
        fig = self.find(section, name) or self.add(Figure(section, name, unit, [], ref, note))
        fig.values.append(value)
        return fig

    def find(self, section: str, name: str) -> Figure | None:
        """The figure called ``name`` in ``section``."""
        return next((f for f in self.figures if f.section == section and f.name == name), None)

    def ordered(self) -> list[Figure]:
        """Figures grouped by section (sections sort by their number), in measured order within one."""
        return sorted(self.figures, key=lambda f: f.section)

    def ratio(self, figure: Figure) -> float | None:
        """median(figure) / median(reference), when there is a reference with samples."""
        if figure.ref is None or not figure.values:
            return None
        ref = self.find(figure.section, figure.ref)
        if ref is None or not ref.values or ref.median == 0:
            return None
        return figure.median / ref.median

    def table(self) -> str:
        """The one table: per figure median, min, max, samples and the ratio against its reference."""
        head = f"{'figure':<60} {'unit':<8} {'median':>9} {'min':>9} {'max':>9} {'n':>3} {'ratio':>7}  reference / note"
        lines = [head, "-" * len(head)]
        section = None
        for fig in self.ordered():
            if fig.section != section:
                section = fig.section
                lines.append(f"[{section}]")
            if fig.values:
                nums = f"{_num(fig.median):>9} {_num(min(fig.values)):>9} {_num(max(fig.values)):>9}"
            else:
                nums = f"{'-':>9} {'-':>9} {'-':>9}"
            ratio = self.ratio(fig)
            ratio_text = f"{ratio:7.2f}" if ratio is not None else f"{'':7}"
            note = " / ".join(t for t in (f"vs {fig.ref}" if fig.ref else "", fig.note) if t)
            lines.append(f"  {fig.name:<58} {fig.unit:<8} {nums} {len(fig.values):>3} {ratio_text}  {note}")
        for err in self.errors:
            lines.append(f"! {err}")
        return "\n".join(lines)

    def save(self, path: Path) -> None:
        """Write all figures, ratios and machine facts as JSON."""
        path.parent.mkdir(parents=True, exist_ok=True)
        doc = {
            "facts": self.facts,
            "errors": self.errors,
            "figures": [
                {
                    **asdict(f),
                    "median": f.median if f.values else None,
                    "min": min(f.values) if f.values else None,
                    "max": max(f.values) if f.values else None,
                    "ratio": self.ratio(f),
                }
                for f in self.ordered()
            ],
        }
        path.write_text(json.dumps(doc, indent=2) + "\n")


def _num(value: float) -> str:
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"
