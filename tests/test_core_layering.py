"""Layering (ARCHITECTURE.md): models/ and diffusion/ are pure torch. They never import deepspeed,
torch.distributed, data loading, upper floors or logging handlers, and they do not import each other
(the model and the diffusion meet only in the trainer; loss.py calls the model it is given)."""

from __future__ import annotations

import ast
import subprocess
from pathlib import Path

import pytest

from tests.conftest import PYTHON, REPO, subprocess_env

pytestmark = pytest.mark.core

PACKAGES = ("models", "diffusion")
FORBIDDEN = (
    "deepspeed",
    "torch.distributed",
    "logging.handlers",
    "webdataset",
    "torch.utils.data",
    "mdt_ds.dist",
    "mdt_ds.data",
    "mdt_ds.engine",
    "mdt_ds.checkpoint",
    "mdt_ds.monitor",
    "mdt_ds.train",
    "mdt_ds.trainer",
    "mdt_ds.sampling",
    "mdt_ds.metrics",
    "mdt_ds.optim",
    "mdt_ds.ema",
)
CROSS = {"models": "mdt_ds.diffusion", "diffusion": "mdt_ds.models"}
HANDLER_CALLS = {"basicConfig", "addHandler", "StreamHandler", "FileHandler", "RotatingFileHandler", "dictConfig"}


def sources(package: str) -> list[Path]:
    files = sorted((REPO / "mdt_ds" / package).rglob("*.py"))
    assert files, f"no sources under mdt_ds/{package}"
    return files


def imported_modules(tree: ast.AST) -> list[str]:
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import inside mdt_ds.<package>
                names.append("." * node.level + (node.module or ""))
                continue
            names.append(node.module or "")
            names += [f"{node.module}.{alias.name}" for alias in node.names]  # from torch import distributed
        elif isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Name) and func.id == "__import__" and node.args:
                arg = node.args[0]
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                    names.append(arg.value)
            if isinstance(func, ast.Attribute) and func.attr == "import_module" and node.args:
                arg = node.args[0]
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                    names.append(arg.value)
    return names


def matches(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


@pytest.mark.parametrize("package", PACKAGES)
def test_sources_do_not_import_forbidden_modules(package: str) -> None:
    problems = []
    for path in sources(package):
        tree = ast.parse(path.read_text(), filename=str(path))
        for name in imported_modules(tree):
            if name.startswith("."):
                problems.append(f"{path.name}: relative import {name!r} (use absolute mdt_ds imports)")
                continue
            for prefix in (*FORBIDDEN, CROSS[package]):
                if matches(name, prefix):
                    problems.append(f"{path.name}: imports {name}")
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr == "distributed":
                if isinstance(node.value, ast.Name) and node.value.id == "torch":
                    problems.append(f"{path.name}:{node.lineno}: uses torch.distributed")
            if isinstance(node, ast.Call):
                func = node.func
                name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
                if name in HANDLER_CALLS:
                    problems.append(f"{path.name}:{node.lineno}: installs a logging handler ({name})")
    assert not problems, "\n".join(problems)


def test_ast_check_catches_violations() -> None:
    """The checker itself: each spelling of a forbidden import is seen."""
    code = (
        "import deepspeed\nfrom torch import distributed\nimport torch.distributed as dist\n"
        "from torch.distributed import all_reduce\nimport logging.handlers\n"
    )
    names = imported_modules(ast.parse(code))
    for prefix in ("deepspeed", "torch.distributed", "logging.handlers"):
        assert any(matches(n, prefix) for n in names), prefix


def test_importing_models_and_diffusion_pulls_in_no_deepspeed() -> None:
    script = (
        "import logging, sys\n"
        "import mdt_ds.models, mdt_ds.models.mdt, mdt_ds.models.layers, mdt_ds.models.guidance\n"
        "import mdt_ds.models.flops, mdt_ds.models.checkpointing, mdt_ds.models.codec\n"
        "import mdt_ds.diffusion, mdt_ds.diffusion.gaussian, mdt_ds.diffusion.respace\n"
        "import mdt_ds.diffusion.losses, mdt_ds.diffusion.loss\n"
        "bad = sorted(m for m in sys.modules if m == 'deepspeed' or m.startswith('deepspeed.')\n"
        "             or m in ('mdt_ds.dist', 'webdataset') or m.startswith('mdt_ds.data'))\n"
        "assert not bad, bad\n"
        "assert not logging.getLogger().handlers, logging.getLogger().handlers\n"
        "print('clean')\n"
    )
    proc = subprocess.run(
        [PYTHON, "-c", script], env=subprocess_env(), cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0 and "clean" in proc.stdout, proc.stdout + proc.stderr
