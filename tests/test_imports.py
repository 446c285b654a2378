"""Imports run one way (DESIGN.md, "Layers"): no circle inside `diffusion/`, even through imports placed inside
functions; the core (plain torch) imports neither Lightning, Hydra nor the Lightning glue; and no entry point
(train.py, sample.py, export.py, bench/) imports another. The graph is built from the source, not from what
happens to be imported at run time, so a circle hidden in a function body is found too."""

from __future__ import annotations

import ast
import re
import shutil
import sys
from pathlib import Path

import pytest
import tomllib

from tests.conftest import ROOT

ENTRY_POINTS = ("train", "sample", "export", "demo")
# the Lightning glue, and the helpers the entry points share (extras: train.py's start; generation and demo_page:
# sample.py's and demo.py's model loading, image reading and page), which may read images through diffusion.data
GLUE = ("diffusion.module", "diffusion.guard", "diffusion.loggers", "diffusion.extras", "diffusion.callbacks",
        "diffusion.data", "diffusion.generation", "diffusion.demo_page")  # fmt: skip
FRAMEWORKS = ("lightning", "hydra", "omegaconf", "pytorch_lightning")


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_names(path: Path) -> set[str]:
    """Every module an import statement anywhere in the file names (`from a.b import c` names a.b and a.b.c)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def import_graph(package: Path) -> dict[str, set[str]]:
    """Module -> the modules of the same package it imports (an import of a package is an edge to its __init__)."""
    root = package.parent
    files = {module_name(p, root): p for p in package.rglob("*.py")}
    return {m: {n for n in imported_names(p) if n in files and n != m} for m, p in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return [*path[path.index(n) :], n]
            if n not in state and (found := visit(n)):
                return found
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_the_package_has_no_import_circle():
    cycle = find_cycle(import_graph(ROOT / "diffusion"))
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_an_injected_circle_is_found(tmp_path):
    """The check itself can fail: a copy of the package with one import placed inside a function that closes a
    circle (the process imports the model, which imports the process)."""
    copy = tmp_path / "diffusion"
    shutil.copytree(ROOT / "diffusion", copy, ignore=shutil.ignore_patterns("__pycache__"))
    base = copy / "process" / "base.py"
    base.write_text(base.read_text() + "\n\ndef _late():\n    from diffusion.model import DiffusionModel\n")
    cycle = find_cycle(import_graph(copy))
    assert cycle is not None and "diffusion.model" in cycle and "diffusion.process.base" in cycle


def test_the_core_imports_no_framework_and_no_glue():
    graph = import_graph(ROOT / "diffusion")
    root = ROOT
    offenders = []
    for path in sorted((ROOT / "diffusion").rglob("*.py")):
        name = module_name(path, root)
        if name.startswith(GLUE):
            continue
        frameworks = sorted(n for n in imported_names(path) if n.split(".")[0] in FRAMEWORKS)
        glue = sorted(n for n in graph[name] if n.startswith(GLUE))
        if frameworks or glue:
            offenders.append(f"{name}: {', '.join(frameworks + glue)}")
    assert not offenders, "the core imports Lightning / Hydra / the glue: " + "; ".join(offenders)


@pytest.mark.parametrize(
    "path", [*(f"{e}.py" for e in ENTRY_POINTS), *(f"bench/{p.name}" for p in (ROOT / "bench").glob("*.py"))]
)
def test_no_entry_point_imports_another(path):
    """train.py, sample.py, export.py and the benchmarks share code through the package, never through each other
    (a benchmark may use the benchmarks' own helpers, e.g. bench/digits_eval.py's classifier)."""
    names = {n.split(".")[0] for n in imported_names(ROOT / path)}
    forbidden = {*ENTRY_POINTS} | ({"bench"} if not path.startswith("bench/") else set())
    assert not names & forbidden, f"{path} imports {sorted(names & forbidden)}"


# import name -> distribution name, where they differ; modules that come with a declared dependency
DISTRIBUTIONS = {"PIL": "pillow", "sklearn": "scikit-learn", "torch_fidelity": "torch-fidelity"}
TRANSITIVE = {"tqdm": "lightning", "yaml": "omegaconf"}
# what the features a plain `pip install -e .` promises import (README quick start and step 9, conditioning=text)
BASE_FEATURES = {"torch", "torchvision", "lightning", "numpy", "PIL", "sklearn", "safetensors", "tokenizers"}


def requirement_name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower()


def test_every_third_party_import_is_declared():
    """A package imported in diffusion/ is declared in pyproject.toml (base or an extra), and the base features'
    packages are base dependencies: `tokenizers` was declared nowhere, so README step 9 failed after a plain
    `pip install -e .` while CI's `[dev]` hid it."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    base = {requirement_name(r) for r in project["dependencies"]}
    extras = {requirement_name(r) for reqs in project["optional-dependencies"].values() for r in reqs}
    modules = set()
    for path in (ROOT / "diffusion").rglob("*.py"):
        modules |= {n.split(".")[0] for n in imported_names(path)}
    third_party = sorted(m for m in modules if m not in sys.stdlib_module_names and m != "diffusion")
    undeclared = [
        m for m in third_party if DISTRIBUTIONS.get(m, m).lower() not in base | extras and m not in TRANSITIVE
    ]
    assert not undeclared, f"imported in diffusion/ but declared nowhere in pyproject.toml: {undeclared}"
    missing = sorted(m for m in BASE_FEATURES if DISTRIBUTIONS.get(m, m).lower() not in base)
    assert not missing, f"the base features need {missing}, which are not base dependencies"


def test_every_optional_package_has_its_extra():
    """Each package diffusion/ imports that is no base dependency goes through `diffusion.optional.require`, which
    names its extra; that extra declares it (so the message's `pip install -e ".[extra]"` installs it)."""
    from diffusion.optional import EXTRAS

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    base = {requirement_name(r) for r in project["dependencies"]}
    extras = {name: {requirement_name(r) for r in reqs} for name, reqs in project["optional-dependencies"].items()}
    wrong = [f"{m} -> [{e}]" for m, e in EXTRAS.items() if DISTRIBUTIONS.get(m, m).replace("_", "-") not in extras[e]]
    assert not wrong, f"diffusion.optional.EXTRAS names extras that do not declare the package: {wrong}"
    direct = []
    for path in (ROOT / "diffusion").rglob("*.py"):
        for name in imported_names(path):
            top = name.split(".")[0]
            if top not in sys.stdlib_module_names and DISTRIBUTIONS.get(top, top).lower() not in base | {"diffusion"}:
                if top not in TRANSITIVE:
                    direct.append(f"{path.relative_to(ROOT)}: {name}")
    assert not direct, f"optional packages imported directly (use diffusion.optional.require): {direct}"


def _optional_features(tmp_path):
    """(package, what uses it, the feature its message names): each optional feature, called as the code does."""
    import torch

    from diffusion.callbacks.fid import InceptionFeatures
    from diffusion.data.hf import HFDataModule
    from diffusion.data.shards import Location
    from diffusion.diffusers_unet import DiffusersUNet
    from diffusion.export import lora_layers
    from diffusion.finetune import LoRANet
    from diffusion.loggers import tensorboard_logger
    from diffusion.module import adamw8bit
    from diffusion.pipeline import load_component
    from diffusion.text_encoders import CLIPTextEncoder

    return [
        ("diffusers", lambda: DiffusersUNet(image_size=8, in_channels=1), "model=diffusers_unet", "diffusers"),
        ("diffusers", lambda: lora_layers(None), "format=lora", "diffusers"),
        (
            "diffusers",
            lambda: load_component("AutoencoderKL", "x/y", subfolder="vae", key="codec.path"),
            "a diffusers pipeline",
            "text",
        ),  # fmt: skip
        ("transformers", lambda: CLIPTextEncoder(pretrained="openai/clip"), "conditioning=clip", "text"),
        ("peft", lambda: LoRANet(base={}, source={}, rank=1, alpha=1, target_modules=[]), "finetune=lora", "text"),
        ("torch_fidelity", lambda: InceptionFeatures(), "callbacks.fid", "fid"),
        ("obstore", lambda: Location("s3://bucket/shards").store(), "data.path=s3://bucket/shards", "stream"),
        ("datasets", lambda: HFDataModule(path=str(tmp_path))._load("train"), "data=hf", "hf"),
        ("tensorboard", lambda: tensorboard_logger(save_dir=str(tmp_path)), "logger=tensorboard", "tensorboard"),
        ("bitsandbytes", lambda: adamw8bit([torch.nn.Parameter(torch.zeros(1))]), "optim=adamw8bit", "bnb"),
    ]


@pytest.mark.parametrize("index", range(10))
def test_a_missing_optional_package_is_one_line_naming_its_extra(index, tmp_path, monkeypatch):
    """With its package absent (None in sys.modules: `import` raises ModuleNotFoundError), each optional feature
    stops with a user error of one line that names the feature and the extra to install, which the command line
    prints as `error: ...` without a traceback."""
    from diffusion.errors import MissingPackageError, user_error_message

    package, use, feature, extra = _optional_features(tmp_path)[index]
    for name in [m for m in sys.modules if m == package or m.startswith(package + ".")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, package, None)
    with pytest.raises(MissingPackageError) as info:
        use()
    message = user_error_message(info.value)
    assert message is not None and "\n" not in message
    assert feature in message and message.endswith(f'needs {package}: pip install -e ".[{extra}]"'), message
