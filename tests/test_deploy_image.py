"""The Dockerfile, checked statically: no container engine runs on the project's machines, so it is never
built here. Parsed with Docker's own parser (the `dockerfile` package wraps BuildKit's), then held against
the repository and the CLI: what it copies exists and is in the build context, the entry point and
command are the `chatscale` CLI with flags it has, the ports are the CLI's defaults, the user is not root,
the health check asks /health, and torch is pinned as the Makefile pins it.
"""

from __future__ import annotations

import re

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

import dockerfile
import pytest
from k8s_manifests import REPO, parse_cli

DOCKERFILE = REPO / "Dockerfile"


@pytest.fixture(scope="module")
def stages() -> list[list[dockerfile.Command]]:
    """The Dockerfile's instructions, one list per build stage (ARGs before the first FROM go with it)."""
    out: list[list[dockerfile.Command]] = [[]]
    for cmd in dockerfile.parse_file(str(DOCKERFILE)):
        if cmd.cmd == "FROM" and any(c.cmd == "FROM" for c in out[-1]):
            out.append([])
        out[-1].append(cmd)
    return out


def _docker_pattern(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern as a regex: `**/` any directories, `*` and `?` within one path segment."""
    tokens = re.split(r"(\*\*/|\*\*|\*|\?)", pattern.strip("/"))
    special = {"**/": "(.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}
    return re.compile("".join(special.get(t, re.escape(t)) for t in tokens) + "$")


def _ignored(path: str) -> bool:
    """Is `path` (relative to the context) left out of the build context by .dockerignore? Docker's rule:
    the last pattern matching the path or one of its parent directories decides; `!` re-includes."""
    rules = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    parts = path.strip("/").split("/")
    candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    ignored = False
    for rule in rules:
        if any(_docker_pattern(rule.lstrip("!")).match(c) for c in candidates):
            ignored = not rule.startswith("!")
    return ignored


def test_dockerignore_rules_read_as_docker_reads_them():
    assert not _ignored("src/chatscale/cli.py") and not _ignored("pyproject.toml")
    assert _ignored("tests/test_engine.py") and _ignored(".venv/bin/python") and _ignored("docs/deploy.md")
    assert _ignored("src/chatscale/__pycache__/cli.cpython-311.pyc")


def test_every_copy_source_exists_in_the_build_context(stages):
    names = [next(c for c in s if c.cmd == "FROM").value[2:3] for s in stages]  # FROM image AS name
    assert any(c.cmd == "COPY" for stage in stages for c in stage)
    for i, stage in enumerate(stages):
        for c in (c for c in stage if c.cmd in ("COPY", "ADD")):
            sources = c.value[:-1]
            source_stage = next((f.split("=", 1)[1] for f in c.flags if f.startswith("--from=")), None)
            if source_stage is not None:
                assert (source_stage,) in names[:i], f"line {c.start_line}: no earlier stage {source_stage}"
                continue
            for src in sources:
                assert (REPO / src).exists(), f"line {c.start_line}: {src} does not exist"
                assert not _ignored(src), f"line {c.start_line}: .dockerignore leaves {src} out of the context"


def test_the_package_build_gets_every_file_pyproject_names(stages):
    copied = {s for stage in stages for c in stage if c.cmd == "COPY" and not c.flags for s in c.value[:-1]}
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert {"pyproject.toml", project["readme"], "src"} <= copied


def test_entry_point_and_command_are_the_cli_with_its_flags(stages):
    final = {c.cmd: c for c in stages[-1]}
    assert final["ENTRYPOINT"].json and final["ENTRYPOINT"].value == ("chatscale",)
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["chatscale"] == "chatscale.cli:main"
    args = parse_cli(list(final["CMD"].value))
    assert args.command == "serve" and args.host == "0.0.0.0"
    # The gateway runs from the same image: `docker run IMAGE gateway --config ...` parses too.
    assert parse_cli(["gateway", "--config", "/etc/chatscale/fleet.yaml", "--host", "0.0.0.0"]).port == 8080


def test_ports_are_the_cli_defaults_and_the_health_check_asks_health(stages):
    from chatscale.server.settings import ServerSettings

    final = stages[-1]
    exposed = {int(p) for c in final if c.cmd == "EXPOSE" for p in c.value}
    serve_port = ServerSettings().port
    gateway_port = parse_cli(["gateway", "--config", "x"]).port
    assert exposed == {serve_port, gateway_port}
    (cmd,) = [c for c in final if c.cmd == "CMD"]
    assert parse_cli(list(cmd.value)).port == serve_port
    env = {}
    for c in final:
        if c.cmd == "ENV":
            env.update(zip(c.value[::2], c.value[1::2]))
    assert env["CHATSCALE_HEALTH_URL"] == f"http://127.0.0.1:{serve_port}/health"
    (check,) = [c for c in final if c.cmd == "HEALTHCHECK"]
    assert check.value[0] == "CMD" and "CHATSCALE_HEALTH_URL" in check.value[-1]


def test_runs_as_a_non_root_user_it_creates(stages):
    final = stages[-1]
    users = [c.value[0] for c in final if c.cmd == "USER"]
    assert users, "no USER: the container would run as root"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) != 0 and (not gid or int(gid) != 0), "numeric and not root (runAsNonRoot)"
    created = " ".join(c.value[0] for c in final if c.cmd == "RUN")
    assert f"--uid {uid}" in created and (not gid or f"--gid {gid}" in created)


def test_torch_is_pinned_as_the_makefile_pins_it(stages):
    makefile = dict(re.findall(r"^(\w+)\s*:=\s*(\S+)", (REPO / "Makefile").read_text(), re.M))
    args = {c.value[0].split("=", 1)[0]: c.value[0].split("=", 1)[1] for s in stages for c in s if c.cmd == "ARG"}
    assert args["TORCH"] == makefile["TORCH"] == "torch==2.13.0"
    assert args["TORCH_INDEX"].endswith("/whl/cpu"), "PyPI's Linux torch wheel is a CUDA build"
