"""deploy/: the systemd unit, the Containerfile and the Kubernetes manifests, checked offline.

The unit goes through ``systemd-analyze``; the Containerfile (no container
engine here) through a small instruction parser; the manifests through
kubernetes-validate's strict schemas for a pinned Kubernetes version and
yamllint; the config and policies they carry through the broker's own loaders.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from yamllint import linter
from yamllint.config import YamlLintConfig

from broker.config import Settings, load_settings
from broker.policies import load_policies

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
UNIT = DEPLOY / "systemd" / "oss-sts-broker.service"
ENV_EXAMPLE = DEPLOY / "systemd" / "oss-sts-broker.env.example"
CONTAINERFILE = DEPLOY / "container" / "Containerfile"
IGNOREFILE = DEPLOY / "container" / "Containerfile.dockerignore"
KUBE = DEPLOY / "kubernetes"
RRSA = KUBE / "ack-rrsa"

KUBERNETES_VERSION = "1.32"  # schemas bundled with kubernetes-validate; ACK supports 1.32
MAX_EXPOSURE = 3.0  # systemd-analyze security: 0 (locked down) .. 10 (exposed)
STS_CALLS_PER_SECOND_PER_ACCOUNT = 100  # AssumeRole limit, shared by the whole account
INSTALL_HINT = "`bash tools/install-system-deps.sh` installs it (Debian package systemd)"
APP_LABELS = {"app.kubernetes.io/name": "oss-sts-broker"}


# --- systemd ---------------------------------------------------------------


def _unit_settings(text: str) -> dict[str, list[str]]:
    """``"Section.Key" -> [values]`` (keys may repeat, so not configparser)."""
    settings: dict[str, list[str]] = {}
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        settings.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return settings


@pytest.fixture(scope="module")
def systemd_analyze() -> str:
    """Path of systemd-analyze, or a failure that says how to install it."""
    found = shutil.which("systemd-analyze") or (
        "/usr/bin/systemd-analyze" if Path("/usr/bin/systemd-analyze").exists() else None
    )
    if found is None:
        pytest.fail(f"systemd-analyze is not installed: {INSTALL_HINT}")
    return found


@pytest.fixture
def runnable_unit(tmp_path: Path) -> Path:
    """The unit, copied with ExecStart pointing at a stub (verify wants a real binary)."""
    stub = tmp_path / "bin" / "sts-broker"
    stub.parent.mkdir()
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    text = UNIT.read_text().replace(
        "ExecStart=/opt/oss-sts-broker/bin/sts-broker", f"ExecStart={stub}"
    )
    assert str(stub) in text
    unit = tmp_path / UNIT.name
    unit.write_text(text)
    return unit


def _run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # noqa: S603 - fixed argv, no shell
        argv, cwd=cwd, capture_output=True, text=True, timeout=20, check=False
    )


def test_systemd_unit_passes_verify(systemd_analyze: str, runnable_unit: Path) -> None:
    """`systemd-analyze verify` accepts the unit without a single warning about it."""
    result = _run([systemd_analyze, "verify", "--man=no", str(runnable_unit)], runnable_unit.parent)
    about_unit = [
        line for line in (result.stdout + result.stderr).splitlines() if UNIT.name in line
    ]
    assert result.returncode == 0, result.stderr
    assert about_unit == []


def test_systemd_verify_reports_unknown_keys(systemd_analyze: str, runnable_unit: Path) -> None:
    """The verify check has teeth: a misspelt key is reported (verify still exits 0)."""
    runnable_unit.write_text(runnable_unit.read_text() + "\n[Service]\nProtectSistem=strict\n")
    result = _run([systemd_analyze, "verify", "--man=no", str(runnable_unit)], runnable_unit.parent)
    assert "ProtectSistem" in result.stdout + result.stderr


def test_systemd_unit_exposure_is_low(systemd_analyze: str, runnable_unit: Path) -> None:
    """`systemd-analyze security --offline=yes` rates the unit's exposure at most 3.0."""
    usage = _run([systemd_analyze, "--help"], runnable_unit.parent).stdout
    if "--offline" not in usage:
        pytest.fail("this systemd-analyze has no `security --offline` (systemd >= 250 needed)")
    threshold = f"--threshold={round(MAX_EXPOSURE * 10)}"  # in tenths
    result = _run(
        [systemd_analyze, "security", "--offline=yes", threshold, "--no-pager", str(runnable_unit)],
        runnable_unit.parent,
    )
    match = re.search(r"Overall exposure level for \S+: ([0-9.]+)", result.stdout)
    assert match is not None, result.stdout + result.stderr
    assert float(match.group(1)) <= MAX_EXPOSURE, result.stdout
    assert result.returncode == 0, result.stdout + result.stderr


def test_systemd_unit_runs_drains_and_reloads_as_documented() -> None:
    """ExecStart, reload by SIGHUP, stop by SIGTERM with time to drain, and the hardening set."""
    unit = _unit_settings(UNIT.read_text())
    assert unit["Service.ExecStart"] == [
        "/opt/oss-sts-broker/bin/sts-broker serve --config /etc/oss-sts-broker/broker.yaml"
    ]
    assert unit["Service.ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert unit["Service.KillSignal"] == ["SIGTERM"]
    assert unit["Service.Restart"] == ["on-failure"]
    defaults = Settings().listen
    drain_seconds = defaults.shutdown_delay_seconds + defaults.shutdown_timeout_seconds
    assert int(unit["Service.TimeoutStopSec"][0]) > drain_seconds
    assert unit.get("Service.DynamicUser") == ["yes"] or "Service.User" in unit
    expected = {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "CapabilityBoundingSet": "",
        "AmbientCapabilities": "",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
        "MemoryDenyWriteExecute": "yes",
        "LockPersonality": "yes",
        "RestrictNamespaces": "yes",
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "ProtectKernelLogs": "yes",
        "ProtectControlGroups": "yes",
        "ReadOnlyPaths": "/etc/oss-sts-broker",
    }
    assert {key: unit.get(f"Service.{key}", ["<unset>"])[0] for key in expected} == expected
    assert "@system-service" in unit["Service.SystemCallFilter"]
    assert int(unit["Service.RestartSec"][0]) > 0


def test_systemd_env_example_sets_no_secret() -> None:
    """The env file is installed where the unit looks, and its AccessKey lines are placeholders."""
    unit = _unit_settings(UNIT.read_text())
    (environment_file,) = unit["Service.EnvironmentFile"]
    assert Path(environment_file.lstrip("-")).name + ".example" == ENV_EXAMPLE.name
    text = ENV_EXAMPLE.read_text()
    for name in (
        "ALIBABA_CLOUD_ECS_METADATA",
        "ALIBABA_CLOUD_ACCESS_KEY_ID",
        "ALIBABA_CLOUD_ACCESS_KEY_SECRET",
    ):
        assert re.search(rf"^# ?{name}=", text, re.MULTILINE), name
    active = [line for line in text.splitlines() if line.strip() and not line.startswith("#")]
    assert active == [], "the example must not set anything until an operator edits it"


# --- Containerfile ---------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    """One Containerfile instruction, continuations joined, in stage ``stage``."""

    stage: int
    keyword: str
    args: str
    line: int


def parse_containerfile(text: str) -> list[Instruction]:
    """Instructions in order; comment lines (also inside continuations) are dropped."""
    instructions: list[Instruction] = []
    pending: list[str] = []
    start = 0
    stage = -1
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue
        if not pending:
            start = number
        continued = stripped.endswith("\\")
        pending.append(stripped[:-1].strip() if continued else stripped)
        if continued:
            continue
        keyword, _, args = " ".join(part for part in pending if part).partition(" ")
        pending = []
        if keyword.upper() == "FROM":
            stage += 1
        instructions.append(Instruction(stage, keyword.upper(), args.strip(), start))
    assert not pending, "the Containerfile ends inside a line continuation"
    return instructions


def _flags_and_rest(args: str) -> tuple[dict[str, str], str]:
    """Split leading ``--flag=value`` options (FROM, COPY, HEALTHCHECK) from the rest."""
    flags: dict[str, str] = {}
    rest = args
    while rest.startswith("--"):
        flag, _, rest = rest.partition(" ")
        name, _, value = flag[2:].partition("=")
        flags[name] = value
        rest = rest.lstrip()
    return flags, rest


@pytest.fixture(scope="module")
def containerfile() -> list[Instruction]:
    """The parsed deploy/container/Containerfile."""
    return parse_containerfile(CONTAINERFILE.read_text())


def _final_stage(instructions: list[Instruction]) -> list[Instruction]:
    last = max(instruction.stage for instruction in instructions)
    return [instruction for instruction in instructions if instruction.stage == last]


def test_containerfile_parser_handles_continuations_and_comments() -> None:
    """The test's own parser joins continued lines and skips comments inside them."""
    parsed = parse_containerfile(
        "# syntax comment\nFROM a:1.2.3 AS b\nRUN x \\\n  # note\n  && y\n\nFROM c:4.5.6\nUSER 1\n"
    )
    assert [(i.stage, i.keyword, i.args, i.line) for i in parsed] == [
        (0, "FROM", "a:1.2.3 AS b", 2),
        (0, "RUN", "x && y", 3),
        (1, "FROM", "c:4.5.6", 7),
        (1, "USER", "1", 8),
    ]


def test_containerfile_bases_are_pinned(containerfile: list[Instruction]) -> None:
    """Every FROM names a versioned tag (never latest); builder and runtime share one base."""
    stage_names: set[str] = set()
    images = []
    for instruction in containerfile:
        if instruction.keyword != "FROM":
            continue
        _, rest = _flags_and_rest(instruction.args)
        image, *alias = rest.split()
        if alias:
            stage_names.add(alias[-1].lower())
        if image.lower() in stage_names:
            continue
        name, _, tag = image.split("@")[0].rpartition(":")
        assert name, f"line {instruction.line}: {image} has no tag"
        assert "/" not in tag, f"line {instruction.line}: {image} has no tag"
        assert tag != "latest", f"line {instruction.line}: {image}"
        assert re.match(r"^\d+\.\d+\.\d+-slim", tag), f"line {instruction.line}: {image}"
        images.append(image)
    assert len(images) >= 2, "multi-stage: a builder and a runtime stage"
    # The runtime copies the builder's venv, whose python links to the base's.
    assert len(set(images)) == 1


def test_containerfile_runs_as_numeric_non_root(containerfile: list[Instruction]) -> None:
    """The final stage ends as USER 10001, with the documented entrypoint, command and signal."""
    final = _final_stage(containerfile)
    users = [instruction.args for instruction in final if instruction.keyword == "USER"]
    assert users, "the final stage sets no USER (it would run as root)"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit()
    assert int(uid) != 0
    assert not gid or (gid.isdigit() and int(gid) != 0)
    last = {instruction.keyword: instruction.args for instruction in final}
    assert json.loads(last["ENTRYPOINT"]) == ["sts-broker"]
    assert json.loads(last["CMD"]) == ["serve", "--config", "/etc/oss-sts-broker/broker.yaml"]
    assert last["STOPSIGNAL"] == "SIGTERM"
    assert last["EXPOSE"].split("/")[0] == str(Settings().listen.port)


def test_containerfile_healthcheck_hits_healthz(containerfile: list[Instruction]) -> None:
    """HEALTHCHECK asks /healthz with python's urllib (the slim image has no curl)."""
    checks = [i.args for i in _final_stage(containerfile) if i.keyword == "HEALTHCHECK"]
    assert len(checks) == 1
    flags, rest = _flags_and_rest(checks[0])
    assert rest.startswith("CMD ")
    command = json.loads(rest.removeprefix("CMD "))
    assert command[0] == "python"
    assert "urllib.request" in command[-1]
    assert "/healthz" in command[-1]
    assert {"interval", "timeout", "retries"} <= flags.keys()


def test_containerfile_final_stage_has_no_build_tools(containerfile: list[Instruction]) -> None:
    """The runtime stage installs nothing: no compiler, no package manager run, no pip."""
    final = _final_stage(containerfile)
    forbidden = re.compile(
        r"\b(gcc|g\+\+|cc|make|build-essential|apt-get|apt|apk|dnf|yum|pip3?|curl|wget)\b"
    )
    for instruction in final:
        if instruction.keyword == "RUN":
            assert not forbidden.search(instruction.args), f"line {instruction.line}"
    copied = [_flags_and_rest(i.args) for i in final if i.keyword in ("COPY", "ADD")]
    assert copied
    assert all("from" in flags for flags, _ in copied), "only artefacts of the builder"
    builder_runs = " ".join(i.args for i in containerfile if i.stage == 0 and i.keyword == "RUN")
    builder_env = " ".join(i.args for i in containerfile if i.stage == 0 and i.keyword == "ENV")
    assert "pip wheel" in builder_runs
    assert "PIP_NO_CACHE_DIR=1" in builder_env or "--no-cache-dir" in builder_runs


def test_containerfile_fetches_nothing_remote_and_bakes_no_secret(
    containerfile: list[Instruction],
) -> None:
    """No ADD of a URL, and no ENV or ARG that carries a key, secret, token or password."""
    secret_name = re.compile(r"SECRET|KEY|TOKEN|PASSWORD|CREDENTIAL", re.IGNORECASE)
    for instruction in containerfile:
        if instruction.keyword == "ADD":
            _, rest = _flags_and_rest(instruction.args)
            assert not re.search(r"(https?|git|ssh)://|git@", rest), f"line {instruction.line}"
        if instruction.keyword in ("ENV", "ARG"):
            for word in shlex.split(instruction.args):
                name = word.partition("=")[0]
                assert not secret_name.search(name), f"line {instruction.line}: {name}"
                assert "LTAI" not in word, f"line {instruction.line}: an AccessKey id"


def test_ignorefile_lets_only_the_build_inputs_in(containerfile: list[Instruction]) -> None:
    """Containerfile.dockerignore excludes everything but what COPY needs from the context."""
    patterns = [
        line.strip()
        for line in IGNOREFILE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert patterns[0] == "*", "an allow-list keeps .git, .venv and secrets out of the context"
    allowed = {pattern[1:].rstrip("/") for pattern in patterns if pattern.startswith("!")}
    for instruction in containerfile:
        flags, rest = _flags_and_rest(instruction.args)
        if instruction.keyword == "COPY" and "from" not in flags:
            *sources, _ = rest.split()
            assert {source.rstrip("/") for source in sources} <= allowed, instruction
    assert not allowed & {".git", ".venv", "tests", ".env"}


# --- Kubernetes --------------------------------------------------------------


def _documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _kustomization(directory: Path) -> dict[str, Any]:
    (document,) = _documents(directory / "kustomization.yaml")
    return document


def _base_resources() -> dict[tuple[str, str], dict[str, Any]]:
    """``(kind, name) -> manifest`` for everything the base kustomization lists."""
    resources = {}
    for name in _kustomization(KUBE)["resources"]:
        for document in _documents(KUBE / name):
            resources[(document["kind"], document["metadata"]["name"])] = document
    return resources


def _merge(base: Any, patch: Any) -> Any:
    """A strategic merge patch as kustomize applies ours: lists of named items merge by name."""
    if isinstance(base, dict) and isinstance(patch, dict):
        merged = dict(base)
        for key, value in patch.items():
            merged[key] = _merge(base[key], value) if key in base else value
        return merged
    named = isinstance(base, list) and isinstance(patch, list)
    named = named and all(isinstance(item, dict) and "name" in item for item in base + patch)
    if named:
        merged_items = list(base)
        index = {item["name"]: position for position, item in enumerate(merged_items)}
        for item in patch:
            if item["name"] in index:
                position = index[item["name"]]
                merged_items[position] = _merge(merged_items[position], item)
            else:
                merged_items.append(item)
        return merged_items
    return patch


def _overlay_resources() -> dict[tuple[str, str], dict[str, Any]]:
    """The ack-rrsa overlay rendered: the base with its patches merged in."""
    overlay = _kustomization(RRSA)
    assert overlay["resources"] == ["../"]
    resources = _base_resources()
    for patch in overlay["patches"]:
        (document,) = _documents(RRSA / patch["path"])
        key = (document["kind"], document["metadata"]["name"])
        assert key in resources, f"{patch['path']} patches nothing in the base"
        resources[key] = _merge(resources[key], document)
    return resources


def _container(resources: dict[tuple[str, str], dict[str, Any]]) -> dict[str, Any]:
    (container,) = resources[("Deployment", "oss-sts-broker")]["spec"]["template"]["spec"][
        "containers"
    ]
    return container


def _env(container: dict[str, Any]) -> dict[str, Any]:
    return {item["name"]: item.get("value", item.get("valueFrom")) for item in container["env"]}


@pytest.fixture(scope="module")
def kube() -> dict[tuple[str, str], dict[str, Any]]:
    """The base manifests, by (kind, name)."""
    return _base_resources()


@pytest.fixture
def broker_settings(kube: dict[tuple[str, str], dict[str, Any]], tmp_path: Path) -> Settings:
    """broker.yaml from the ConfigMap, loaded by the broker with the Deployment's env."""
    config = tmp_path / "broker.yaml"
    config.write_text(kube[("ConfigMap", "oss-sts-broker-config")]["data"]["broker.yaml"])
    secret = kube[("Secret", "oss-sts-broker-api-keys")]["stringData"]
    environ = {}
    for name, source in _env(_container(kube)).items():
        if isinstance(source, dict):
            reference = source["secretKeyRef"]
            assert reference["name"] == "oss-sts-broker-api-keys"
            environ[name] = secret[reference["key"]]
    return load_settings(config, environ)


def _yaml_files() -> list[Path]:
    files = sorted(DEPLOY.rglob("*.yaml")) + sorted(DEPLOY.rglob("*.yml"))
    return [*files, DEPLOY / ".yamllint"]


def test_kustomizations_list_every_manifest() -> None:
    """Each manifest is in kustomization.yaml, and everything listed exists."""
    listed = set(_kustomization(KUBE)["resources"])
    on_disk = {path.name for path in KUBE.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk
    patches = {patch["path"] for patch in _kustomization(RRSA)["patches"]}
    assert patches == {path.name for path in RRSA.glob("*.yaml")} - {"kustomization.yaml"}


@pytest.mark.parametrize("name", sorted(_kustomization(KUBE)["resources"]))
def test_manifest_matches_kubernetes_schema(name: str) -> None:
    """Each base manifest validates against the pinned Kubernetes version's strict schema."""
    for document in _documents(KUBE / name):
        kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)


def test_rendered_rrsa_overlay_matches_kubernetes_schema() -> None:
    """The ack-rrsa overlay's patched ServiceAccount and Deployment validate strictly."""
    overlay = _overlay_resources()
    for key in (("ServiceAccount", "oss-sts-broker"), ("Deployment", "oss-sts-broker")):
        kubernetes_validate.validate(overlay[key], KUBERNETES_VERSION, strict=True)


def test_strict_validation_rejects_unknown_fields(
    kube: dict[tuple[str, str], dict[str, Any]],
) -> None:
    """The schema check has teeth: a misspelt field fails strict validation."""
    deployment = _merge(kube[("Deployment", "oss-sts-broker")], {"spec": {"replica": 3}})
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


def test_yaml_passes_yamllint() -> None:
    """Every YAML file under deploy/ is clean under deploy/.yamllint (warnings included)."""
    config = YamlLintConfig(file=str(DEPLOY / ".yamllint"))
    problems = [
        f"{path.relative_to(ROOT)}:{problem.line}: {problem.message}"
        for path in _yaml_files()
        for problem in linter.run(path.read_text(), config, str(path))
    ]
    assert problems == []


def test_deployment_pod_is_locked_down(kube: dict[tuple[str, str], dict[str, Any]]) -> None:
    """Non-root 10001, no privilege escalation, no capabilities, read-only root, RuntimeDefault."""
    pod = kube[("Deployment", "oss-sts-broker")]["spec"]["template"]["spec"]
    container = _container(kube)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert pod["automountServiceAccountToken"] is False
    assert kube[("ServiceAccount", "oss-sts-broker")]["automountServiceAccountToken"] is False
    assert {"requests", "limits"} <= container["resources"].keys()
    assert ":" in container["image"]
    assert not container["image"].endswith(":latest")
    tmp = next(m for m in container["volumeMounts"] if m["mountPath"] == "/tmp")
    assert "emptyDir" in next(v for v in pod["volumes"] if v["name"] == tmp["name"])


def test_deployment_probes_and_grace_period_fit_the_config(
    kube: dict[tuple[str, str], dict[str, Any]], broker_settings: Settings
) -> None:
    """/healthz for liveness, /readyz for readiness, and a grace period longer than the drain."""
    deployment = kube[("Deployment", "oss-sts-broker")]
    container = _container(kube)
    assert deployment["spec"]["replicas"] == 3
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
    listen = broker_settings.listen
    assert listen.host == "0.0.0.0"  # noqa: S104 - a pod must listen beyond loopback
    (port,) = container["ports"]
    assert port["containerPort"] == listen.port
    drain_seconds = listen.shutdown_delay_seconds + listen.shutdown_timeout_seconds
    assert listen.shutdown_delay_seconds > 0, "time for endpoints to drop the pod"
    assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > drain_seconds


def test_config_configmap_passes_the_broker_loader(
    kube: dict[tuple[str, str], dict[str, Any]], broker_settings: Settings
) -> None:
    """broker.yaml loads, its key_sha256_env names come from the Secret, and it is the --config."""
    assert broker_settings.watch_policies is True
    assert [key.key_sha256_env for key in broker_settings.auth.api_keys] == [
        "BROKER_SVC_REPORTS_KEY_SHA256"
    ]
    container = _container(kube)
    config_mount = next(m for m in container["volumeMounts"] if m["name"] == "config")
    args = container["args"]
    assert args[args.index("--config") + 1] == config_mount["mountPath"]


def test_policies_configmap_is_a_directory_mount(
    kube: dict[tuple[str, str], dict[str, Any]], broker_settings: Settings
) -> None:
    """Policies are mounted as a directory, without subPath, at the config's policies_dir."""
    container = _container(kube)
    mount = next(m for m in container["volumeMounts"] if m["name"] == "policies")
    assert "subPath" not in mount
    assert "subPathExpr" not in mount
    assert Path(mount["mountPath"]) == broker_settings.policies_dir
    volumes = kube[("Deployment", "oss-sts-broker")]["spec"]["template"]["spec"]["volumes"]
    volume = next(v for v in volumes if v["name"] == "policies")
    assert volume["configMap"] == {"name": "oss-sts-broker-policies"}, "no items: every key"


def _kubelet_layout(directory: Path, data: dict[str, str], version: str) -> None:
    """Write ``data`` as the kubelet does: a timestamped dir, ``..data`` and per-key links."""
    payload = directory / f"..{version}"
    payload.mkdir()
    for name, text in data.items():
        (payload / name).write_text(text)
    staging = directory / "..data_tmp"
    staging.symlink_to(payload.name)
    staging.replace(directory / "..data")
    for name in data:
        link = directory / name
        if not link.is_symlink():
            link.symlink_to(f"..data/{name}")


def test_policies_configmap_loads_as_the_pod_sees_it(
    kube: dict[tuple[str, str], dict[str, Any]], tmp_path: Path
) -> None:
    """The policy files load from a kubelet-style ConfigMap volume (symlinks, ..data)."""
    data = kube[("ConfigMap", "oss-sts-broker-policies")]["data"]
    _kubelet_layout(tmp_path, data, "2026_11_21_05_00_00.000000001")
    policies = load_policies(tmp_path)
    assert len(policies) == len(data)
    assert {f"{policy.name}.yaml" for policy in policies} == set(data)


def test_sts_budget_of_all_replicas_fits_the_account_limit(
    kube: dict[tuple[str, str], dict[str, Any]], broker_settings: Settings
) -> None:
    """At maxReplicas the replicas' summed STS budget stays under ~100 AssumeRole calls/s."""
    hpa = kube[("HorizontalPodAutoscaler", "oss-sts-broker")]["spec"]
    assert hpa["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "oss-sts-broker",
    }
    assert hpa["metrics"][0]["resource"]["name"] == "cpu"
    assert hpa["minReplicas"] == kube[("Deployment", "oss-sts-broker")]["spec"]["replicas"]
    budget = hpa["maxReplicas"] * broker_settings.quotas.sts_calls_per_second
    assert budget <= STS_CALLS_PER_SECOND_PER_ACCOUNT
    pdb = kube[("PodDisruptionBudget", "oss-sts-broker")]["spec"]
    assert pdb.get("maxUnavailable") == 1 or pdb.get("minAvailable", 0) >= 2


def test_selectors_and_ports_line_up(kube: dict[tuple[str, str], dict[str, Any]]) -> None:
    """Service, PDB and NetworkPolicy select the pods; ingress is 8080, egress DNS and 443."""
    pod_labels = kube[("Deployment", "oss-sts-broker")]["spec"]["template"]["metadata"]["labels"]
    assert APP_LABELS.items() <= pod_labels.items()
    service = kube[("Service", "oss-sts-broker")]["spec"]
    assert service["selector"] == APP_LABELS
    assert service["ports"][0]["targetPort"] == _container(kube)["ports"][0]["name"]
    assert kube[("PodDisruptionBudget", "oss-sts-broker")]["spec"]["selector"] == {
        "matchLabels": APP_LABELS
    }
    policy = kube[("NetworkPolicy", "oss-sts-broker")]["spec"]
    assert policy["podSelector"] == {"matchLabels": APP_LABELS}
    assert set(policy["policyTypes"]) == {"Ingress", "Egress"}
    ingress_ports = {
        (p["protocol"], p["port"]) for rule in policy["ingress"] for p in rule["ports"]
    }
    assert ingress_ports == {("TCP", 8080)}
    for rule in policy["ingress"]:
        assert all(peer.get("podSelector", {}).get("matchLabels") for peer in rule["from"])
    egress_ports = {(p["protocol"], p["port"]) for rule in policy["egress"] for p in rule["ports"]}
    assert egress_ports == {("UDP", 53), ("TCP", 53), ("TCP", 443)}


def test_ack_rrsa_overlay_gives_the_broker_an_identity_without_accesskey() -> None:
    """RRSA: annotated ServiceAccount, the three OIDC env vars, a projected token for STS."""
    overlay = _overlay_resources()
    annotations = overlay[("ServiceAccount", "oss-sts-broker")]["metadata"]["annotations"]
    role_name = annotations["pod-identity.alibabacloud.com/role-name"]
    container = _container(overlay)
    env = _env(container)
    assert env["ALIBABA_CLOUD_ROLE_ARN"].endswith(f":role/{role_name}")
    provider_arn = env["ALIBABA_CLOUD_OIDC_PROVIDER_ARN"]
    assert re.match(r"^acs:ram::\d+:oidc-provider/ack-rrsa-", provider_arn)
    assert env["ALIBABA_CLOUD_ECS_METADATA_DISABLED"] == "true"
    assert not {"ALIBABA_CLOUD_ACCESS_KEY_ID", "ALIBABA_CLOUD_ACCESS_KEY_SECRET"} & env.keys()
    token_file = Path(env["ALIBABA_CLOUD_OIDC_TOKEN_FILE"])
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == str(token_file.parent))
    pod = overlay[("Deployment", "oss-sts-broker")]["spec"]["template"]["spec"]
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    (source,) = volume["projected"]["sources"]
    token = source["serviceAccountToken"]
    assert token["audience"] == "sts.aliyuncs.com"
    assert token["path"] == token_file.name
    assert pod["automountServiceAccountToken"] is False
    # The base's own settings survive the patch.
    assert "BROKER_SVC_REPORTS_KEY_SHA256" in env
    assert {m["name"] for m in container["volumeMounts"]} >= {"config", "policies", "tmp"}


# --- docs ------------------------------------------------------------------


def _mentioned_paths(text: str) -> Iterator[str]:
    yield from re.findall(r"`((?:deploy|config|policies|docs|tools)/[^`\s]*)`", text)


def test_deployment_doc_names_only_existing_files() -> None:
    """docs/deployment.md points at files that exist, and keeps the sizing placeholder."""
    text = (ROOT / "docs" / "deployment.md").read_text()
    missing = [path for path in _mentioned_paths(text) if not (ROOT / path).exists()]
    assert missing == []
    assert "Throughput per core: see bench/RESULTS.md" in text
