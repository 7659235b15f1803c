"""deploy/k8s rendered with `kubectl kustomize`, and small lookups over the rendered objects.

No cluster is needed: kustomize renders offline. Where kubectl is missing the tests fail and say so,
rather than skip: a deploy tree nobody renders rots silently.
"""

from __future__ import annotations

import argparse
import io
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import redirect_stderr
from functools import cache
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "deploy" / "k8s"
# Every kustomization a user applies: the overlays, the examples, the monitoring stack, the dashboards.
APPLIED = sorted([*(K8S / "overlays").iterdir(), *(K8S / "examples").iterdir(), K8S / "monitoring",
                  REPO / "deploy" / "grafana"])
WORKLOADS = ("Deployment", "StatefulSet", "DaemonSet")


def kubectl() -> str:
    path = shutil.which("kubectl")
    if path is None:
        raise AssertionError("kubectl is not installed: the deploy tests render deploy/k8s with `kubectl kustomize` "
                             "(Debian/Ubuntu: the kubectl package; any kubectl 1.27+ bundles kustomize v5)")
    return path


@cache
def render(directory: Path) -> tuple[dict, ...]:
    out = subprocess.run([kubectl(), "kustomize", str(directory)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"kubectl kustomize {directory.relative_to(REPO)} failed:\n{out.stderr}"
    return tuple(o for o in yaml.safe_load_all(out.stdout) if o)


def name(obj: dict) -> str:
    return f"{obj['kind']}/{obj['metadata'].get('namespace', '')}/{obj['metadata']['name']}"


def of_kind(objs: tuple[dict, ...], kind: str) -> list[dict]:
    return [o for o in objs if o["kind"] == kind]


def pod_templates(objs: tuple[dict, ...]) -> Iterator[tuple[dict, dict]]:
    """(owner, pod template) for every workload, LeaderWorkerSet leaders and workers included."""
    for o in objs:
        if o["kind"] in WORKLOADS:
            yield o, o["spec"]["template"]
        elif o["kind"] == "LeaderWorkerSet":
            lwt = o["spec"]["leaderWorkerTemplate"]
            yield from ((o, lwt[k]) for k in ("leaderTemplate", "workerTemplate") if k in lwt)


def selects(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def selected_pods(objs: tuple[dict, ...], namespace: str | None, selector: dict) -> list[dict]:
    """Pod templates in `namespace` whose labels `selector` (a plain label map) matches."""
    return [t for owner, t in pod_templates(objs) if owner["metadata"].get("namespace") == namespace
            and selects(selector, t["metadata"].get("labels", {}))]


def container_port(template: dict, port: int | str) -> int | None:
    """The number a probe's or Service's `port` (a number or a port name) means in this pod."""
    for c in template["spec"]["containers"]:
        for p in c.get("ports", []):
            if port in (p.get("name"), p["containerPort"]):
                return p["containerPort"]
    return None


def is_chatscale(container: dict) -> bool:
    return container["image"].split("/")[-1].split(":")[0] == "chatscale"


def chatscale_args(container: dict) -> list[str]:
    """The CLI arguments: the image's entry point is `chatscale`, unless `command` says otherwise."""
    command = container.get("command", ["chatscale"])
    assert command[0] == "chatscale", f"{container['name']}: command {command} does not run the chatscale CLI"
    return [*command[1:], *container.get("args", [])]


def parse_cli(argv: list[str]) -> argparse.Namespace:
    """Parse as `chatscale` would, failing with argparse's own message. Flags must be spelt out: argparse
    takes a prefix too, which a later flag can make ambiguous."""
    from chatscale.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    known = {s for a in sub.choices[argv[0]]._actions for s in a.option_strings} if argv[0] in sub.choices else set()
    unknown = [a for a in argv if a.startswith("--") and a.split("=")[0] not in known]
    assert not unknown, f"chatscale {argv[0]}: {unknown} are not its flags (spelt out in full)"
    err = io.StringIO()
    try:
        with redirect_stderr(err):
            return parser.parse_args(argv)
    except SystemExit:
        raise AssertionError(f"chatscale {' '.join(argv)}: {err.getvalue().strip()}") from None
