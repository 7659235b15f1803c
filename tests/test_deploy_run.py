"""The CPU demo fleet as deploy/k8s renders it, run as processes on 127.0.0.1: no cluster, the same commands.

Redis, an engine and a gateway start with their containers' arguments and environment from the rendered
overlay; only what a cluster provides is stood in for: ports are free local ones, addresses are 127.0.0.1,
and the headless Service's DNS name is 127.0.0.1 (one address: one replica). The gateway must find the
engine through fleet.yaml's `dns:` entry, take the documented demo key, route a chat to the engine; the
engine must drain and exit 0 within the pod's grace period once SIGTERM arrives. The image's HEALTHCHECK
command runs against both, healthy and not.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import dockerfile
import httpx
import yaml
from k8s_manifests import K8S, REPO, chatscale_args, pod_templates, render
from server_utils import free_port, wait_until

DEMO_KEY = "sk-chatscale-demo"  # docs/deploy.md and the fleet.yaml comment give this key


def _container(objs: tuple[dict, ...], component: str) -> tuple[dict, dict]:
    (template,) = [t for _, t in pod_templates(objs)
                   if t["metadata"]["labels"]["app.kubernetes.io/component"] == component]
    return template, template["spec"]["containers"][0]


def _with(args: list[str], **flags: str) -> list[str]:
    """`args` with each --flag's value replaced (or the flag added)."""
    out = list(args)
    for flag, value in flags.items():
        flag = "--" + flag.replace("_", "-")
        if flag in out:
            out[out.index(flag) + 1] = value
        else:
            out += [flag, value]
    return out


def _start(argv: list[str], container: dict, log: Path) -> subprocess.Popen:
    env = {**os.environ, **{e["name"]: e["value"] for e in container.get("env", []) if "value" in e}}
    return subprocess.Popen(argv, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)


def _image_health_check(url: str) -> int:
    """The exit code of the image's HEALTHCHECK command (Docker's view of the container) against `url`."""
    (check,) = [c for c in dockerfile.parse_file(str(REPO / "Dockerfile")) if c.cmd == "HEALTHCHECK"]
    assert check.value[:2] == ("CMD", "python3")
    argv = [sys.executable, *check.value[2:]]
    return subprocess.run(argv, env={**os.environ, "CHATSCALE_HEALTH_URL": url}, capture_output=True).returncode


def _status(url: str) -> int | None:
    try:
        return httpx.get(url, timeout=2).status_code
    except httpx.HTTPError:
        return None


def test_cpu_demo_fleet_serves_through_the_gateway_and_drains(tmp_path):
    redis_server = shutil.which("redis-server")
    assert redis_server, "redis-server is not installed (.ci/run installs Debian's redis-server)"
    objs = render(K8S / "overlays" / "cpu-demo")
    procs: list[subprocess.Popen] = []
    try:
        _, redis = _container(objs, "redis")
        redis_port = free_port()
        procs.append(_start([redis_server, *redis["args"], "--port", str(redis_port), "--bind", "127.0.0.1",
                             "--dir", str(tmp_path)], redis, tmp_path / "redis.log"))

        engine_pod, engine = _container(objs, "engine")
        engine_port = free_port()
        engine_proc = _start([sys.executable, "-m", "chatscale.cli",
                              *_with(chatscale_args(engine), host="127.0.0.1", port=str(engine_port))],
                             engine, tmp_path / "engine.log")
        procs.append(engine_proc)

        gateway_pod, gateway = _container(objs, "gateway")
        (cm,) = [o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"] == "chatscale-fleet"]
        fleet = yaml.safe_load(cm["data"]["fleet.yaml"])
        for region in fleet["regions"].values():  # the cluster's DNS name for the Service: here, this host
            region["dns"] = [{**d, "host": "127.0.0.1", "port": engine_port} for d in region["dns"]]
        (tmp_path / "fleet.yaml").write_text(yaml.safe_dump(fleet))
        gateway_url = f"http://127.0.0.1:{free_port()}"
        argv = _with(chatscale_args(gateway), config=str(tmp_path / "fleet.yaml"), host="127.0.0.1",
                     port=gateway_url.rsplit(":", 1)[1], redis_url=f"redis://127.0.0.1:{redis_port}/0")
        procs.append(_start([sys.executable, "-m", "chatscale.cli", *argv], gateway, tmp_path / "gateway.log"))

        # The gateway's readiness probe: 200 once it has found the engine through its DNS entry and the
        # engine's own /health said 200 (after loading the model).
        assert wait_until(lambda: _status(f"{gateway_url}/health") == 200, 180), (tmp_path / "engine.log").read_text()
        assert _status(f"http://127.0.0.1:{engine_port}/health") == 200
        assert _image_health_check(f"http://127.0.0.1:{engine_port}/health") == 0
        assert _image_health_check(f"{gateway_url}/health") == 0

        body = {"model": "chatscale-demo", "max_tokens": 16, "temperature": 0,
                "messages": [{"role": "user", "content": "What is a KV cache?"}]}
        r = httpx.post(f"{gateway_url}/v1/chat/completions", json=body, timeout=60,
                       headers={"Authorization": f"Bearer {DEMO_KEY}"})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] and r.json()["model"] == "chatscale-demo"
        assert r.headers["x-chatscale-replica"] == "127.0.0.1/127.0.0.1"  # the replica found through DNS
        assert httpx.post(f"{gateway_url}/v1/chat/completions", json=body, timeout=10,
                          headers={"Authorization": "Bearer sk-wrong"}).status_code == 401

        # Pod deletion: the kubelet sends SIGTERM after the preStop pause and SIGKILLs at the grace period.
        grace = engine_pod["spec"]["terminationGracePeriodSeconds"]
        pause = float(engine["lifecycle"]["preStop"]["exec"]["command"][1])
        start = time.monotonic()
        engine_proc.send_signal(signal.SIGTERM)
        assert engine_proc.wait(grace - pause) == 0
        assert time.monotonic() - start < grace - pause
        assert wait_until(lambda: _status(f"{gateway_url}/health") == 503, 10), "the gateway still counts the engine"
        assert _image_health_check(f"{gateway_url}/health") != 0  # 503: unhealthy
        assert _image_health_check(f"http://127.0.0.1:{engine_port}/health") != 0  # refused
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
