"""The layering rules, checked on the source (imports anywhere in a module, lazy ones
included) and on what importing the control plane pulls in.

- The control plane and the CLI never import torch (or the ML stack).
- models/ is a pure library of renderers and TTS: of farm/ it imports farm.errors only.
- Under farm/, only the entry points (the CLI, the embedded supervisor) import workers/
  or Celery; everything else asks the dispatch port (farm/dispatch.py).
- The CLI makes no database query itself: queries live in farm/queries.py, and the
  library functions the CLI calls use them.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ENTRY_POINTS = {"farm/cli.py", "farm/embedded.py"}
# kombu alone is allowed: `farm doctor` opens one connection to an AMQP broker with it.
CELERY = ("celery", "workers")


def imported(path: Path) -> set[str]:
    """Every module a file imports, at any depth of its code."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from farm import queries` is farm.queries; `from farm.errors import X`
            # is farm.errors.X, within farm.errors.
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def sources(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def test_cli_and_tasks_module_do_not_import_torch():
    code = (
        "import sys, farm.cli, farm.jobs, farm.embedded, workers.tasks\n"
        "heavy = [m for m in ('torch', 'mediapipe', 'piper', 'cv2') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_models_import_nothing_from_farm_but_its_errors():
    found = {
        f"{path.relative_to(ROOT)}: {name}"
        for path in sources("models")
        for name in imported(path)
        if name.split(".")[0] == "farm" and name.split(".")[:2] != ["farm", "errors"]
    }
    assert not found, sorted(found)


def test_only_the_entry_points_under_farm_reach_celery_or_workers():
    found = {
        f"{path.relative_to(ROOT)}: {name}"
        for path in sources("farm")
        if str(path.relative_to(ROOT)) not in ENTRY_POINTS
        for name in imported(path)
        if name.split(".")[0] in CELERY
    }
    assert not found, sorted(found)


def test_the_cli_makes_no_query_of_its_own():
    tree = ast.parse((ROOT / "farm" / "cli.py").read_text(encoding="utf-8"))
    calls = {
        ast.unparse(node.func)
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and isinstance(node.func.value, ast.Name)
        and node.func.value.id in ("queries", "session", "s")
    }
    sessions = [n for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr == "session"]
    assert not calls and not sessions, sorted(calls)


def test_the_checks_above_can_see_a_violation(tmp_path):
    """The import walk finds lazy imports inside functions too."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from farm import queries\n    import celery.app\n")
    assert {"farm.queries", "celery.app"} <= imported(bad)
