"""infra/: what can be validated without a cloud: YAML structure and the container's pinned stack."""

import re
import shlex
import tomllib
from pathlib import Path

import yaml

from configs.loading import load_config
from pipeline.cli import build_parser, split_preset_and_overrides

INFRA = Path(__file__).resolve().parents[1] / "infra"
ROOT = INFRA.parent


def _require(node, path, kind=None):
    """The value at dotted `path` (list indices as numbers); fails naming the missing key."""
    cur = node
    for part in path.split("."):
        if isinstance(cur, list):
            assert part.isdigit() and int(part) < len(cur), f"{path}: no item {part}"
            cur = cur[int(part)]
        else:
            assert isinstance(cur, dict) and part in cur, f"{path}: missing key {part!r}"
            cur = cur[part]
    if kind is not None:
        assert isinstance(cur, kind), f"{path}: expected {kind}, got {type(cur).__name__}"
    return cur


def test_cluster_launcher_schema():
    cfg = yaml.safe_load((INFRA / "cluster-aws.yaml").read_text())
    for key, kind in (
        ("cluster_name", str),
        ("max_workers", int),
        ("provider.type", str),
        ("provider.region", str),
        ("auth.ssh_user", str),
        ("docker.image", str),
        ("docker.container_name", str),
        ("available_node_types", dict),
        ("head_node_type", str),
        ("setup_commands", list),
        ("head_start_ray_commands", list),
        ("worker_start_ray_commands", list),
    ):
        _require(cfg, key, kind)
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    workers = [t for name, t in types.items() if name != cfg["head_node_type"]]
    assert workers and all(t["resources"]["GPU"] > 0 for t in workers)
    for t in types.values():
        _require(t, "node_config.InstanceType", str)
        _require(t, "resources", dict)
    assert sum(t["min_workers"] for t in workers) <= cfg["max_workers"]
    assert any("ray start --head" in c for c in cfg["head_start_ray_commands"])
    assert any("--address=$RAY_HEAD_IP:6379" in c for c in cfg["worker_start_ray_commands"])
    # Enough GPUs at min size for the full recipe.
    gpus = sum(t["resources"]["GPU"] * t["min_workers"] for t in workers)
    assert gpus >= load_config("imagenet256-restok-l").cluster.num_workers


def test_rayjob_schema_and_entrypoint_is_a_valid_restok_command():
    job = yaml.safe_load((INFRA / "rayjob.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    _require(job, "metadata.name", str)
    entrypoint = _require(job, "spec.entrypoint", str)
    spec = _require(job, "spec.rayClusterSpec", dict)
    assert spec["rayVersion"] == "2.60.0"
    head = _require(spec, "headGroupSpec.template.spec.containers.0", dict)
    _require(spec, "headGroupSpec.rayStartParams", dict)
    assert head["image"] and any(p["containerPort"] == 8265 for p in head["ports"])
    groups = _require(spec, "workerGroupSpecs", list)
    gpus = 0
    for group in groups:
        for key in ("groupName", "replicas", "rayStartParams", "template.spec.containers.0.image"):
            _require(group, key)
        limits = _require(group, "template.spec.containers.0.resources.limits", dict)
        gpus += int(limits.get("nvidia.com/gpu", 0)) * group["replicas"]
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    env = yaml.safe_load(_require(job, "spec.runtimeEnvYAML", str))
    assert set(env["env_vars"]) >= {"RESTOK_WORK_DIR", "MLFLOW_TRACKING_URI"}

    # The entrypoint parses as a restok command whose config loads.
    argv = shlex.split(entrypoint)
    assert argv[:3] == ["python", "-m", "pipeline.cli"]
    args = build_parser().parse_args(argv[3:])
    assert args.command == "run"
    preset, overrides = split_preset_and_overrides(args.items)
    cfg = load_config(preset, overrides)
    assert cfg.cluster.address == "auto" and gpus >= cfg.cluster.num_workers


def _dockerfile_pins():
    text = (INFRA / "Dockerfile").read_text()
    block = re.search(r"# BEGIN pinned requirements\n(.*?)# END pinned requirements", text, re.S).group(1)
    return re.findall(r'"([^"]+)"', block), text


def test_dockerfile_pins_equal_pyproject():
    pins, text = _dockerfile_pins()
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert pins == deps
    # The torch pre-install uses the same versions; the project itself goes in without deps.
    for dep in ("torch", "torchvision"):
        version = next(d for d in deps if d.startswith(f"{dep}==")).split("==")[1]
        assert f"{dep}=={version}" in text
    assert "pip install --no-deps -e ." in text
    for part in ("configs", "models", "infra", "data_prep", "jobs", "pipeline"):
        assert f"COPY {part} ./{part}" in text


def test_image_grid_is_torchvision_make_grid_layout():
    import torch
    from torchvision.utils import make_grid

    from infra.image_grid import image_grid

    images = torch.rand(11, 3, 5, 7, generator=torch.Generator().manual_seed(0)) * 1.2 - 0.1
    for batch, nrow in [(11, 4), (8, 8), (3, 8), (1, 8)]:
        expected = make_grid(images[:batch].clamp(0, 1), nrow=nrow, padding=1)
        expected = (expected.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
        assert (image_grid(images[:batch], nrow=nrow) == expected).all(), (batch, nrow)
