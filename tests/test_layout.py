"""The code's rooms and the direction of their imports, read from the source (every import, also those inside
functions): the core never imports Ray, MLflow or the study; inside ``study/`` the plan, the evidence and the
run import one way, and no room imports the commands that use it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# study's rooms, lowest first: a room may import the rooms before it, never those after it
ROOMS = ["plan", "evidence", "run"]
COMMANDS = {"launch", "report", "report_render", "predict", "cohort", "roi_preview"}  # python -m study.<name>
COMMAND_HELPERS = {"cli"}  # what the commands share (one-line errors, exit 2); imports no room, no command


def imports(path: Path) -> set[str]:
    """Every module ``path`` imports (absolute names), at any depth of the file."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _modules(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


def _where(name: str) -> str | None:
    """The room or command a ``study.*`` module name belongs to."""
    parts = name.split(".")
    if parts[0] != "study" or len(parts) < 2:
        return None
    return parts[1] if parts[1] in ROOMS else ("command" if parts[1] in COMMANDS else None)


@pytest.mark.parametrize("path", _modules("trainables"), ids=lambda p: str(p.relative_to(ROOT)))
def test_the_core_never_imports_ray_mlflow_or_the_study(path: Path) -> None:
    allowed = {"trainables/tune_trainable.py"}  # the thin Ray adapter
    found = {n for n in imports(path) if n.split(".")[0] in ("study", "mlflow", "optuna")
             or (n.split(".")[0] == "ray" and str(path.relative_to(ROOT)) not in allowed)}
    assert not found, found


STUDY = [p for room in ROOMS for p in _modules(f"study/{room}")]


@pytest.mark.parametrize("path", STUDY, ids=lambda p: str(p.relative_to(ROOT)))
def test_study_rooms_import_one_way(path: Path) -> None:
    room = path.relative_to(ROOT / "study").parts[0]
    later = set(ROOMS[ROOMS.index(room) + 1:]) | {"command"}
    wrong = sorted(n for n in imports(path) if _where(n) in later)
    assert not wrong, f"{room} imports {wrong}"


def test_every_study_module_lives_in_a_room_or_is_a_command() -> None:
    top = {p.stem for p in (ROOT / "study").glob("*.py")} - {"__init__"}
    assert top == COMMANDS | COMMAND_HELPERS
    for helper in COMMAND_HELPERS:
        assert not [n for n in imports(ROOT / "study" / f"{helper}.py") if n.startswith("study.")], helper


def test_the_launcher_imports_no_monai_peft_mlflow_or_ray_before_it_runs() -> None:
    """``--help`` and the argument checks answer in about 2 s: the heavy libraries are imported where they are
    used (building a network, a trial, the tracker), not when the launcher, the grid or the registries load."""
    import subprocess
    import sys

    code = ("import sys, study.launch, study.plan.grid, trainables.finetune, trainables.pretrain; "
            "print(sorted(m for m in ('monai', 'peft', 'transformers', 'mlflow', 'ray') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout
