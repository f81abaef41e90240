"""The layers import downward only (README "Layout"), with no cycles, and models/ stays pure PyTorch.

Every import is read from the source (ast), including imports inside functions, so a lazy import
cannot hide an upward edge or a cycle.
"""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Lowest first: a package may import itself and the packages before it, never one after it.
LAYERS = ("models", "configs", "infra", "data_prep", "jobs", "pipeline")
FORBIDDEN_IN_MODELS = ("ray", "deepspeed", "mlflow", "torch.distributed")


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(dotted: str) -> bool:
    base = ROOT.joinpath(*dotted.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def imports_of(path: pathlib.Path) -> list[tuple[int, str]]:
    """(line, imported module) for every import in the file, at any depth; `from pkg import mod`
    names the module `pkg.mod` when it is one. In a file that calls importlib.import_module, a
    string that is exactly a project module's dotted name counts too (a lazy import by name)."""
    mod = module_name(path)
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    found = []
    tree = ast.parse(path.read_text(), str(path))
    dynamic = any(isinstance(n, ast.Attribute) and n.attr == "import_module" for n in ast.walk(tree))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.append((node.lineno, sub if is_module(sub) else base))
        elif (
            dynamic
            and isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and "." in node.value
            and node.value.split(".")[0] in LAYERS
            and is_module(node.value)
        ):
            found.append((node.lineno, node.value))  # a module named for importlib (a lazy import)
    return found


def project_files() -> list[pathlib.Path]:
    return sorted(p for layer in LAYERS for p in (ROOT / layer).rglob("*.py"))


def graph() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {}
    for path in project_files():
        mod = module_name(path)
        edges[mod] = {name for _, name in imports_of(path) if name.split(".")[0] in LAYERS and name != mod}
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in edges:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_layers_import_downward_only():
    upward = []
    for path in project_files():
        own = LAYERS.index(path.relative_to(ROOT).parts[0])
        for line, name in imports_of(path):
            top = name.split(".")[0]
            if top in LAYERS and LAYERS.index(top) > own:
                upward.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
    assert not upward, (
        "upward imports (layers, lowest first: " + " < ".join(LAYERS) + "):\n" + "\n".join(upward)
    )


def test_no_import_cycles_between_modules():
    # Between packages a cycle needs an upward edge (above); this covers modules, jobs/ included.
    found = cycles(graph())
    assert not found, f"import cycles: {found}"


def test_models_import_no_distribution_or_tracking():
    offenders = []
    for path in (ROOT / "models").rglob("*.py"):
        for line, name in imports_of(path):
            if any(name == f or name.startswith(f + ".") for f in FORBIDDEN_IN_MODELS):
                offenders.append(f"{path.relative_to(ROOT)}:{line}: {name}")
    assert not offenders, offenders


def test_checker_sees_imports_inside_functions_and_finds_cycles():
    # jobs/training/stage.py imports ray.train inside finish_training_stage only.
    stage = ROOT / "jobs" / "training" / "stage.py"
    top_level = {
        a.name for n in ast.parse(stage.read_text()).body if isinstance(n, ast.Import) for a in n.names
    }
    assert "ray.train" not in top_level and "ray.train" in {name for _, name in imports_of(stage)}
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_every_stage_module_has_the_stage_contract():
    # infra.stages.StageRun: run(cfg, run_id=None, parent_run_id=None) -> manifest, in every stage.
    import importlib
    import inspect

    from pipeline.cli import STAGE_MODULES

    want = ["cfg", "run_id", "parent_run_id"]
    for module in STAGE_MODULES.values():
        params = inspect.signature(importlib.import_module(module).run).parameters
        assert list(params) == want, f"{module}.run{tuple(params)}"
        assert params["run_id"].default is None and params["parent_run_id"].default is None, module


def test_driver_and_stage_modules_do_not_import_torchvision_dynamo_or_sympy():
    """What every driver, prep task and extraction / evaluation actor imports leaves out
    torchvision, torch._dynamo and sympy (~2 CPU-s a process): training imports them when it
    decodes images or steps an optimizer, FlexAttention only on CUDA."""
    import subprocess
    import sys

    code = (
        "import sys, pipeline.cli, pipeline.graph, data_prep.prepare, jobs.train_tokenizer, "
        "jobs.train_generator, jobs.extract_codes, jobs.evaluate, jobs.evaluation.pool; "
        "print(sorted(m for m in ('torchvision', 'torch._dynamo', 'sympy') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr[-2000:]


def test_a_train_worker_imports_deepspeed_without_mlflow_or_inductor():
    """prepare_deepspeed's imports leave out MLflow (DeepSpeed's unused autotuner would import it;
    rank 0 imports it itself to log, and can) and Inductor (DeepSpeed's Muon kernels, never run)."""
    import subprocess
    import sys

    code = (
        "import sys; from jobs.training import deepspeed_runtime as d; d.import_deepspeed_without_mlflow(); "
        "d.import_deepspeed_muon_uncompiled(); "
        "print(sorted(m for m in ('mlflow', 'torch._inductor.compile_fx') if m in sys.modules)); "
        "import mlflow; print(mlflow.MlflowClient.__name__)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.splitlines()[-2:] == ["[]", "MlflowClient"], out.stdout + out.stderr[-2000:]
