"""Renders the plain manifests in deploy/ from the Helm chart, so the chart is their one source.

Each manifest is some of the chart's templates rendered by Helm's own engine (helm-python-sdk) with release name
``podvm`` and a values file of deploy/chart/plain/. ``plan`` computes every file's text; ``apply`` writes them.

    manifests.py [--check]   # --check: exit 1 naming each stale file, write nothing
"""

import sys
from pathlib import Path
from typing import Any

import yaml
from helm_python.chart import Chart

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
CHART = DEPLOY / "chart" / "podvm"
PLAIN = DEPLOY / "chart" / "plain"
RELEASE = "podvm"
# manifest in deploy/ -> (values file in deploy/chart/plain/, the templates it holds, how it is applied)
MANIFESTS = {
    "pod.yaml": ("pod", ("pod.yaml",), "deploy/configmap.yaml -f deploy/volumes.yaml -f deploy/pod.yaml"),
    "volumes.yaml": ("pod", ("claims.yaml",), "deploy/volumes.yaml"),
    "configmap.yaml": ("pod", ("config.yaml",), "deploy/configmap.yaml"),
    "networkpolicy.yaml": ("pod", ("networkpolicy.yaml",), "deploy/networkpolicy.yaml"),
    "gc-cronjob.yaml": ("pod", ("gc-cronjob.yaml",), "deploy/gc-cronjob.yaml"),
    "statefulset.yaml": (
        "statefulset",
        ("claims.yaml", "service.yaml", "statefulset.yaml"),
        "deploy/configmap.yaml -f deploy/statefulset.yaml",
    ),
}


def values(name: str) -> dict[str, Any]:
    """A values file of deploy/chart/plain/."""
    loaded: dict[str, Any] = yaml.safe_load((PLAIN / f"{name}-values.yaml").read_text())
    return loaded


def render(chart: Chart, overrides: dict[str, Any]) -> dict[str, str]:
    """Every template's output by its file name under templates/, as `helm template podvm` renders it."""
    prefix = f"{chart.name}/templates/"
    rendered = chart.render(values=overrides, name=RELEASE, namespace="default")
    return {path.removeprefix(prefix): text for path, text in rendered.items()}


def plan() -> dict[Path, str]:
    """The text of each plain manifest."""
    with Chart.load(CHART) as chart:
        outputs = {name: render(chart, values(name)) for name in {v[0] for v in MANIFESTS.values()}}
    texts = {}
    for manifest, (name, templates, apply_args) in MANIFESTS.items():
        documents = [outputs[name][t].strip("\n") for t in templates]
        header = (
            f"# Rendered from deploy/chart/podvm with deploy/chart/plain/{name}-values.yaml by `make manifests`: "
            "change those, not this file.\n"
            f"# kubectl apply -f {apply_args}\n"
        )
        texts[DEPLOY / manifest] = header + "\n---\n".join(d for d in documents if d) + "\n"
    return texts


def main(argv: list[str]) -> int:
    """Write the manifests, or with ``--check`` name the stale ones."""
    planned = plan()
    stale = [path for path, text in planned.items() if not path.exists() or path.read_text() != text]
    if "--check" in argv:
        for path in stale:
            sys.stderr.write(f"{path.relative_to(REPO)}: stale, run `make manifests`\n")
        return 1 if stale else 0
    for path in stale:
        path.write_text(planned[path])
        sys.stdout.write(f"wrote {path.relative_to(REPO)}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
