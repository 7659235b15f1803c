"""The repository stands alone: no path in it reaches outside, and a clone in an empty folder works.

CI runs on a clean clone with nothing beside it, so a file read from `../somewhere` works on a
developer's machine and fails there. The clone test checks what is committed (HEAD); ~30 s.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCANNED_DIRS = ("src", "tests", "docs", "benchmarks", "tools", "deploy", ".ci")
SCANNED_FILES = ("README.md", "Makefile", "pyproject.toml")
TEXT = {".py", ".md", ".toml", ".json", ".yaml", ".yml", ".sh", ".txt", ".cfg", ".html", ".js", ".css", ""}
# Written in pieces, so that this file does not match itself: a sibling folder of the checkout, this
# machine's work area, and a path built from a "shared" component.
OUTSIDE = re.compile("|".join((r"\.\./" + "shared", "/wo" + "rk/", r"""["']shared["']\s*/""",
                               r"""/\s*["']shared["']""")))
MD_LINK = re.compile(r"\]\(([^)\s]+)\)")


def _text_files() -> list[Path]:
    """The repository's text files: what git tracks or would (not build outputs such as egg-info)."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True)
    candidates = ([ROOT / name for name in listed.stdout.splitlines()] if listed.returncode == 0
                  else [p for d in SCANNED_DIRS for p in (ROOT / d).rglob("*")])
    files = [ROOT / f for f in SCANNED_FILES]
    for path in candidates:
        top = path.relative_to(ROOT).parts[0]
        if top in SCANNED_DIRS and path.is_file() and path.suffix in TEXT and "__pycache__" not in path.parts \
                and path.stat().st_size < 1_000_000:  # the traces are data, not paths
            files.append(path)
    return files


def test_no_path_reaches_outside_the_repository():
    found = []
    for path in _text_files():
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if OUTSIDE.search(line):
                found.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not found, "paths outside the repository:\n" + "\n".join(found)


def test_markdown_links_stay_inside_the_repository_and_exist():
    broken = []
    for path in _text_files():
        if path.suffix != ".md":
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            for target in MD_LINK.findall(line):
                if re.match(r"[a-z]+:", target) or target.startswith("#"):
                    continue  # a URL or an anchor in the same page
                resolved = (path.parent / target.split("#")[0]).resolve()
                if not resolved.is_relative_to(ROOT) or not resolved.exists():
                    broken.append(f"{path.relative_to(ROOT)}:{n}: {target}")
    assert not broken, "links that leave the repository or lead nowhere:\n" + "\n".join(broken)


def _git(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def _run(args: list[str], cwd: Path, env: dict) -> str:
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{' '.join(args)} failed in the clone:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def test_a_clone_in_an_empty_folder_simulates_tests_and_packages_its_traces(tmp_path):
    if shutil.which("git") is None or _git("rev-parse", "--git-dir").returncode != 0:
        pytest.skip("not a git checkout")
    clone = tmp_path / "empty" / "chatscale"
    done = _git("clone", "-q", str(ROOT), str(clone), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in clone.parent.iterdir()) == ["chatscale"]  # nothing beside it
    env = {**os.environ, "PYTHONPATH": str(clone / "src")}
    python = [sys.executable, "-m"]
    where = _run([sys.executable, "-c", "import chatscale; print(chatscale.__file__)"], clone, env)
    assert Path(where.strip()).is_relative_to(clone), where  # the clone's code, not this checkout's
    # A command on a shipped trace, the simulator's trace tests and this file's scans, from the clone.
    _run([*python, "chatscale.cli", "simulate", "size", "--workload", "azure-conv", "--max-requests", "2000",
          "--cost", "roofline:llama-3-8b:h100", "--output-json", str(tmp_path / "size.json")], clone, env)
    assert (tmp_path / "size.json").is_file()
    _run([*python, "pytest", "-q", "-p", "no:cacheprovider", "tests/test_sim_twin.py",
          "tests/test_standalone_repo.py::test_no_path_reaches_outside_the_repository",
          "tests/test_standalone_repo.py::test_markdown_links_stay_inside_the_repository_and_exist"], clone, env)
    # The traces are package data: an installed chatscale has them too.
    _run([*python, "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"),
          str(clone)], tmp_path, env)
    wheel = next((tmp_path / "dist").glob("chatscale-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    from chatscale.traces import TRACE_FILES

    assert {f"chatscale/traces/{f}" for f in (*TRACE_FILES, "README.md")} <= names
