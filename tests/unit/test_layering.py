"""The control plane and the CLI never import torch (or the ML stack)."""

import subprocess
import sys


def test_cli_and_tasks_module_do_not_import_torch():
    code = (
        "import sys, farm.cli, farm.jobs, farm.embedded, workers.tasks\n"
        "heavy = [m for m in ('torch', 'mediapipe', 'piper', 'cv2') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
