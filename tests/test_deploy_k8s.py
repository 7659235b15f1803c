"""deploy/k8s against the code it deploys, with no cluster.

Every kustomization renders; every object validates against the Kubernetes schemas in strict mode (a
misspelt field fails); and what the manifests say agrees with what chatscale reads: CLI flags, probe
paths and ports, the gateway's fleet.yaml and the Services its DNS entries name, Redis, the drain
timeout against the grace period, Prometheus' and Grafana's ConfigMaps, label selectors.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

import kubernetes_validate
import pytest
import yaml
from k8s_manifests import (APPLIED, K8S, REPO, chatscale_args, container_port, is_chatscale, name, of_kind,
                           parse_cli, pod_templates, render, selected_pods, selects)

from chatscale.gateway.config import FleetConfig, parse
from chatscale.server.settings import ServerSettings

# The oldest Kubernetes these manifests claim, and the newest the schema package knows.
K8S_VERSIONS = ("1.30", kubernetes_validate.utils.latest_version())
# Custom resources: no schema vendored. A LeaderWorkerSet's pod templates are validated as core PodTemplates;
# a ServiceMonitor's selector and port names are checked against the Services below.
NOT_VALIDATED = {"ServiceMonitor", "LeaderWorkerSet"}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding"}
FLEETS = [d for d in APPLIED if d.parent.name == "overlays" or d.name == "prometheus-operator"]
MONITORING = K8S / "monitoring"


def rel(path: Path) -> str:
    return str(path.relative_to(REPO))


def fleet_objects() -> tuple[dict, ...]:
    return tuple(o for d in FLEETS for o in render(d))


@pytest.fixture(scope="module")
def serves() -> dict[str, Callable[[str], bool]]:
    """Does the engine's (the gateway's) app route GET `path`? Asked of its router, as a request would be."""
    from starlette.routing import Match

    from chatscale.gateway.app import create_app as gateway_app
    from chatscale.server.api import create_app as server_app

    def router(app) -> Callable[[str], bool]:
        return lambda path: any(r.matches({"type": "http", "path": path, "method": "GET"})[0] == Match.FULL
                                for r in app.routes)

    return {"engine": router(server_app(lambda: None, ServerSettings())), "gateway": router(gateway_app(FleetConfig()))}


# ---- rendering and schemas ----------------------------------------------------------------------------

@pytest.mark.parametrize("directory", APPLIED, ids=rel)
def test_renders_and_every_namespaced_object_has_its_namespace(directory):
    objs = render(directory)
    assert objs
    if directory.parent.name != "deploy":  # deploy/grafana goes into whichever namespace runs Grafana
        missing = [name(o) for o in objs if o["kind"] not in CLUSTER_SCOPED and not o["metadata"].get("namespace")]
        assert not missing


def _validate(obj: dict, version: str) -> None:
    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.ValidationError as e:
        raise AssertionError(f"{name(obj)} at {'.'.join(map(str, e.path))}: {e.message}") from None


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("directory", APPLIED, ids=rel)
def test_objects_validate_against_the_kubernetes_schemas(directory, version):
    for obj in render(directory):
        if obj["kind"] == "LeaderWorkerSet":
            for _, template in pod_templates((obj,)):
                meta = {**obj["metadata"], "name": f"{obj['metadata']['name']}-template"}
                _validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": meta, "template": template},
                          version)
        elif obj["kind"] not in NOT_VALIDATED:
            _validate(obj, version)


def test_the_schema_check_refuses_a_misspelt_field():
    objs = render(K8S / "overlays" / "cpu-demo")
    engine = next(o for o in objs if name(o) == "Deployment/chatscale/chatscale-engine")
    _validate(engine, K8S_VERSIONS[0])
    bad = copy.deepcopy(engine)
    container = bad["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")
    with pytest.raises(AssertionError, match="readinesProbe"):
        _validate(bad, K8S_VERSIONS[0])


# ---- the engines --------------------------------------------------------------------------------------

def _engines(objs: tuple[dict, ...]) -> list[tuple[dict, dict, dict]]:
    """(owner, pod template, container) of every engine that serves HTTP."""
    return [(owner, t, c) for owner, t in pod_templates(objs)
            if t["metadata"].get("labels", {}).get("app.kubernetes.io/component") == "engine"
            for c in t["spec"]["containers"] if c["name"] == "engine"]


def _flag(args: list[str], flag: str) -> str | None:
    return args[args.index(flag) + 1] if flag in args else None


@pytest.mark.parametrize("directory", [*FLEETS, K8S / "examples" / "multinode-tp"], ids=rel)
def test_engines_probe_health_on_their_port_and_outlast_the_drain(directory, serves):
    engines = _engines(render(directory))
    assert engines
    for owner, template, c in engines:
        if is_chatscale(c):
            args = parse_cli(chatscale_args(c))
            assert args.command == "serve" and args.host == "0.0.0.0", "a pod must listen beyond loopback"
            port, drain = args.port, args.drain_timeout
        else:  # vLLM / SGLang: the same port flag; they manage their own drain
            port, drain = int(_flag(c["args"], "--port")), 0.0
        assert container_port(template, "http") == port, f"{name(owner)}: port 'http' is not {port}"
        assert "readinessProbe" in c and "livenessProbe" in c and "startupProbe" in c, name(owner)
        for kind in ("readinessProbe", "livenessProbe", "startupProbe"):
            probe = c[kind]["httpGet"]
            assert probe["path"] == "/health" and container_port(template, probe["port"]) == port, (name(owner), kind)
        assert serves["engine"]("/health") and not serves["engine"]("/no-such-path")
        pause = _pre_stop_sleep(c)
        assert template["spec"]["terminationGracePeriodSeconds"] > pause + drain, \
            f"{name(owner)}: the kubelet would kill a drain of {drain} s after a {pause} s preStop pause"
        annotations = template["metadata"].get("annotations", {})
        assert int(annotations["prometheus.io/port"]) == port and serves["engine"](annotations["prometheus.io/path"])


def _pre_stop_sleep(container: dict) -> float:
    command = container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
    return float(command[1]) if command[:1] == ["sleep"] else 0.0


@pytest.mark.parametrize("directory", [d for d in APPLIED if d.parent.name in ("overlays", "examples")], ids=rel)
def test_every_chatscale_container_takes_its_flags(directory):
    containers = [c for _, t in pod_templates(render(directory)) for c in t["spec"]["containers"] if is_chatscale(c)]
    assert containers
    for c in containers:
        parse_cli(chatscale_args(c))


# ---- the gateway --------------------------------------------------------------------------------------

def _gateway(objs: tuple[dict, ...]) -> tuple[dict, dict]:
    (template,) = [t for _, t in pod_templates(objs)
                   if t["metadata"]["labels"].get("app.kubernetes.io/component") == "gateway"]
    (container,) = template["spec"]["containers"]
    return template, container


def _mounted_configmap(objs: tuple[dict, ...], template: dict, container: dict, path: str) -> tuple[dict, str]:
    """The ConfigMap and key a container reads at `path`, through a directory mount or a subPath mount."""
    path = PurePosixPath(path)
    volumes = {v["name"]: v for v in template["spec"].get("volumes", [])}
    for m in container.get("volumeMounts", []):
        mount = PurePosixPath(m["mountPath"])
        key = m.get("subPath") if mount == path else path.name if mount == path.parent and "subPath" not in m else None
        if key is not None and "configMap" in volumes[m["name"]]:
            cm_name = volumes[m["name"]]["configMap"]["name"]
            (cm,) = [o for o in of_kind(objs, "ConfigMap") if o["metadata"]["name"] == cm_name]
            assert key in cm["data"], f"ConfigMap {cm_name} has no key {key} ({sorted(cm['data'])})"
            return cm, key
    raise AssertionError(f"{container['name']}: nothing mounts a ConfigMap at {path}")


def _service(objs: tuple[dict, ...], host: str, namespace: str) -> dict:
    """The Service a cluster DNS name means: `svc` in the client's namespace, or `svc.ns[.svc.cluster.local]`."""
    svc, _, rest = host.partition(".")
    ns = rest.split(".")[0] if rest else namespace
    found = [o for o in of_kind(objs, "Service")
             if (o["metadata"]["name"], o["metadata"].get("namespace")) == (svc, ns)]
    assert found, f"no Service {svc} in namespace {ns} (from {host})"
    return found[0]


def _backends(objs: tuple[dict, ...], service: dict, port: int) -> list[dict]:
    """The pod templates behind `service`'s `port`, each serving it on the port the Service targets."""
    (sp,) = [p for p in service["spec"]["ports"] if p["port"] == port] or [None]
    assert sp is not None, f"Service {service['metadata']['name']} has no port {port}"
    pods = selected_pods(objs, service["metadata"].get("namespace"), service["spec"]["selector"])
    assert pods and all(container_port(t, sp.get("targetPort", port)) for t in pods), name(service)
    return pods


@pytest.mark.parametrize("directory", FLEETS, ids=rel)
def test_gateway_reads_a_valid_fleet_yaml_whose_dns_names_are_the_engines(directory, serves):
    objs = render(directory)
    template, c = _gateway(objs)
    ns = next(o for o, t in pod_templates(objs) if t is template)["metadata"]["namespace"]
    args = parse_cli(chatscale_args(c))
    assert args.command == "gateway" and args.host == "0.0.0.0"
    cm, key = _mounted_configmap(objs, template, c, str(args.config))
    assert not any(m.get("subPath") for m in c["volumeMounts"] if PurePosixPath(m["mountPath"]) == args.config), \
        "a subPath mount never sees ConfigMap updates, which the gateway would reload"
    assert cm["metadata"]["name"] == "chatscale-fleet"  # no hash suffix: updates reach the running gateways
    fleet = parse(yaml.safe_load(cm["data"][key]))
    assert fleet.dns and fleet.keys
    everything = objs + fleet_objects()  # another region's Services live in its own overlay
    for entry in fleet.dns:
        service = _service(everything, entry.host, ns)
        assert service["spec"].get("clusterIP") == "None", f"{entry.host}: a headless Service gives one address per pod"
        for pod in _backends(everything, service, entry.port):
            assert pod["metadata"]["labels"]["chatscale.dev/region"] == entry.region, entry.host
    assert container_port(template, c["readinessProbe"]["httpGet"]["port"]) == args.port
    assert c["readinessProbe"]["httpGet"]["path"] == "/health" and serves["gateway"]("/health")
    assert int(template["metadata"]["annotations"]["prometheus.io/port"]) == args.port
    assert serves["gateway"](template["metadata"]["annotations"]["prometheus.io/path"])
    redis = urlparse(args.redis_url)
    redis_pods = _backends(objs, _service(objs, redis.hostname, ns), redis.port)
    assert all(p["metadata"]["labels"]["app.kubernetes.io/component"] == "redis" for p in redis_pods)


def test_each_region_lists_both_regions_engines_under_their_own_names():
    regions = {}
    for region in ("us-east", "eu-west"):
        objs = render(K8S / "overlays" / region)
        template, c = _gateway(objs)
        cm, key = _mounted_configmap(objs, template, c, str(parse_cli(chatscale_args(c)).config))
        regions[region] = parse(yaml.safe_load(cm["data"][key]))
        assert {t["metadata"]["labels"]["chatscale.dev/region"] for _, t in pod_templates(objs)} == {region}
    assert regions["us-east"] == regions["eu-west"]
    assert {d.region for d in regions["us-east"].dns} == {"us-east", "eu-west"}


# ---- selectors, policies, monitoring ------------------------------------------------------------------

@pytest.mark.parametrize("directory", [d for d in APPLIED if d.parent.name != "deploy"], ids=rel)
def test_services_budgets_and_policies_select_pods(directory):
    objs = render(directory)
    for svc in of_kind(objs, "Service"):
        for port in svc["spec"]["ports"]:
            _backends(objs, svc, port["port"])
    for obj in of_kind(objs, "PodDisruptionBudget") + of_kind(objs, "NetworkPolicy"):
        selector = (obj["spec"].get("selector") or obj["spec"]["podSelector"])["matchLabels"]
        assert selected_pods(objs, obj["metadata"]["namespace"], selector), f"{name(obj)} selects no pod"
    for monitor in of_kind(objs, "ServiceMonitor"):
        services = [s for s in of_kind(objs, "Service") if selects(monitor["spec"]["selector"]["matchLabels"],
                                                                    s["metadata"].get("labels", {}))]
        assert services, f"{name(monitor)} selects no Service"
        for endpoint in monitor["spec"]["endpoints"]:
            assert all(endpoint["port"] in {p.get("name") for p in s["spec"]["ports"]} for s in services)


@pytest.mark.parametrize("directory", FLEETS, ids=rel)
def test_engines_admit_only_gateways_and_prometheus(directory):
    objs = render(directory)
    (namespace,) = of_kind(objs, "Namespace")
    (monitoring_ns,) = of_kind(render(MONITORING), "Namespace")
    (policy,) = [p for p in of_kind(objs, "NetworkPolicy") if p["metadata"]["name"] == "chatscale-engine"]
    peers = [peer for rule in policy["spec"]["ingress"] for peer in rule["from"]]
    gateway_labels = _gateway(objs)[0]["metadata"]["labels"]
    assert any(selects(p.get("podSelector", {}).get("matchLabels", {}), gateway_labels)
               and selects(p["namespaceSelector"]["matchLabels"], namespace["metadata"]["labels"]) for p in peers)
    assert any(p.get("namespaceSelector", {}).get("matchLabels") == {
        "kubernetes.io/metadata.name": monitoring_ns["metadata"]["name"]} for p in peers)


def _prometheus_label(key: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_]", "_", key)


def test_prometheus_scrapes_what_the_pods_announce():
    objs = render(MONITORING)
    (deployment,) = [o for o in of_kind(objs, "Deployment") if o["metadata"]["name"] == "prometheus"]
    template = deployment["spec"]["template"]
    (c,) = template["spec"]["containers"]
    config_file = next(a.split("=", 1)[1] for a in c["args"] if a.startswith("--config.file="))
    cm, key = _mounted_configmap(objs, template, c, config_file)
    (job,) = yaml.safe_load(cm["data"][key])["scrape_configs"]
    sources = {s for r in job["relabel_configs"] for s in r["source_labels"]}
    announced = {k for _, t in pod_templates(fleet_objects()) for k in t["metadata"].get("annotations", {})}
    labels = {k for _, t in pod_templates(fleet_objects()) for k in t["metadata"]["labels"]}
    for annotation in ("prometheus.io/scrape", "prometheus.io/port", "prometheus.io/path"):
        assert annotation in announced
        assert f"__meta_kubernetes_pod_annotation_{_prometheus_label(annotation)}" in sources
    for label in ("chatscale.dev/region", "app.kubernetes.io/component"):
        assert label in labels and f"__meta_kubernetes_pod_label_{_prometheus_label(label)}" in sources
    (binding,) = of_kind(objs, "ClusterRoleBinding")
    assert binding["subjects"][0]["name"] == template["spec"]["serviceAccountName"]


def test_grafana_mounts_every_dashboard_and_finds_prometheus():
    objs = render(MONITORING)
    (deployment,) = [o for o in of_kind(objs, "Deployment") if o["metadata"]["name"] == "grafana"]
    template = deployment["spec"]["template"]
    (c,) = template["spec"]["containers"]
    dashboards = {f.name for f in (REPO / "deploy" / "grafana").glob("*.json")}
    for d in dashboards:
        _mounted_configmap(objs, template, c, f"/var/lib/grafana/dashboards/{d}")
    cm, key = _mounted_configmap(objs, template, c, "/etc/grafana/provisioning/dashboards/dashboards.yaml")
    (provider,) = yaml.safe_load(cm["data"][key])["providers"]
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"
    home = next(e["value"] for e in c["env"] if e["name"] == "GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH")
    assert PurePosixPath(home).name in dashboards
    cm, key = _mounted_configmap(objs, template, c, "/etc/grafana/provisioning/datasources/datasources.yaml")
    (source,) = yaml.safe_load(cm["data"][key])["datasources"]
    url = urlparse(source["url"])
    _backends(objs, _service(objs, url.hostname, "chatscale-monitoring"), url.port)


def _exposed_names(registry) -> set[str]:
    """Every series name a registry exposes, counters' _total and histograms' _bucket/_sum/_count included."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    return {f.name + s for f in registry.collect() for s in suffixes[f.type]}


def test_fleet_dashboard_queries_only_series_that_exist():
    from chatscale.gateway.metrics import GatewayMetrics
    from chatscale.metrics import Metrics

    known = _exposed_names(GatewayMetrics().registry) | _exposed_names(Metrics("m").registry)
    dashboard = json.loads((REPO / "deploy" / "grafana" / "chatscale-fleet.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {m for e in exprs for m in re.findall(r"chatscale(?:_gateway)?:[a-z_]+", e)}
    assert any(u.startswith("chatscale_gateway:") for u in used) and any(u.startswith("chatscale:") for u in used)
    assert used <= known, used - known
    assert {"datasource", "region"} == {v["name"] for v in dashboard["templating"]["list"]}


# ---- docs/deploy.md's figures -------------------------------------------------------------------------

@pytest.mark.parametrize("layout, step_ms, comm_ms", [(["--tp", "16"], 15.33, 6.29),
                                                       (["--tp", "8", "--pp", "2"], 8.81, 0.34)])
def test_multinode_tensor_parallel_figures_are_the_planners(layout, step_ms, comm_ms, capsys):
    from chatscale.cli import main

    assert main(["plan", "--model", "llama-3-70b", "--hardware", "h100", *layout, "--batch", "64",
                 "--context", "8192", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert (round(plan["roofline"]["step_s"] * 1e3, 2), round(plan["comm_s"] * 1e3, 2)) == (step_ms, comm_ms)
    doc = (REPO / "docs" / "deploy.md").read_text()
    assert f"{step_ms} ms" in doc and f"{comm_ms} ms" in doc
