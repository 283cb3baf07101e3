"""`farm engines build` as an operator runs it, on a machine without a GPU (CI, this
one): it loads the backend as a worker would and says in one line why no engine is
built. Building a real engine needs CUDA and tensorrt; those tests live beside each
backend's export and skip elsewhere."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.services import run_farm


def farm(tmp_path: Path, *args: str, **env: str):
    import os

    base = {**os.environ, "FARM_HOME": str(tmp_path / "home"), **env}
    return run_farm(*args, env=base, text=True, timeout=300)


@pytest.mark.parametrize(
    ("device", "reason"), [("cpu", "device cpu requested"), ("auto", "no CUDA device")]
)
def test_ditto_without_a_gpu_says_why_no_engine_is_built(tmp_path, ditto_dir, device, reason):
    done = farm(
        tmp_path,
        "engines",
        "build",
        "--renderer",
        "ditto",
        FARM_DITTO_DIR=str(ditto_dir),
        FARM_DEVICE=device,
    )
    assert done.returncode == 1, done.stderr
    assert done.stdout == ""
    assert done.stderr == (
        f"farm: error: TensorRT is not in use for ditto on this worker: {reason}\n"
    )
    assert not list(tmp_path.glob("**/*.engine"))


def test_missing_checkpoints_are_named(tmp_path):
    done = farm(
        tmp_path, "engines", "build", "--renderer", "ditto", FARM_DITTO_DIR=str(tmp_path / "no")
    )
    assert done.returncode == 1
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and "missing" in lines[0] and str(tmp_path / "no") in lines[0]


def test_gaussiantalker_needs_an_avatar_that_exists(tmp_path):
    done = farm(tmp_path, "engines", "build", "--renderer", "gaussiantalker")
    assert done.returncode == 1
    assert done.stderr == (
        "farm: error: --renderer gaussiantalker needs --avatar NAME (one engine per avatar)\n"
    )
    done = farm(tmp_path, "engines", "build", "--renderer", "gaussiantalker", "--avatar", "nobody")
    assert done.returncode == 1
    assert done.stderr == "farm: error: unknown avatar 'nobody'\n"


def test_a_backend_without_engines_is_a_usage_error(tmp_path):
    done = farm(tmp_path, "engines", "build", "--renderer", "portrait")
    assert done.returncode == 2
    assert len(done.stderr.splitlines()) == 1 and "portrait" in done.stderr
