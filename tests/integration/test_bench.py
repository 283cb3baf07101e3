"""`farm bench`'s stage figures, from the worker-side process it runs (small sizes:
this checks what is measured and reported, never how fast; speed targets live in
`farm bench` itself)."""

from __future__ import annotations

import pytest

from farm import bench


def _stages(tmp_path, device: str) -> dict:
    script = tmp_path / "s.txt"
    script.write_text("Hello there. A short script for the benchmark.")
    return bench.stage_figures(script, 1, "128,160x128", "1", device, batch="8")


def test_stage_figures_name_every_stage_the_machine_and_the_encoder(tmp_path):
    stages = _stages(tmp_path, "cpu")
    assert stages["machine"]["encoder"].startswith("libx264")
    assert "torch" in stages["machine"]
    modes = {(row["size"], row["mode"]) for row in stages["render"]}
    assert modes == {("128x128", "face"), ("160x128", "letterbox"), ("160x128", "photo")}
    for row in stages["render"]:
        assert row["batch"] == 8 and row["codec"] == "libx264"
        for stage in ("plan", "network", "render", "encode", "chunks", "mux"):
            assert row[stage]["fps"] > 0 and row[stage]["rtf"] > 0, stage
    report = bench.format_report(stages, None)
    assert "Machine: encoder libx264" in report
    for stage in ("network", "render", "encode", "chunks", "mux"):
        assert f"      {stage:7} " in report


@pytest.mark.gpu
def test_cuda_figures_report_the_gpu_and_its_memory(tmp_path):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    stages = _stages(tmp_path, "cuda")
    assert stages["machine"]["gpu"] and stages["machine"]["driver"]
    assert all(row["peak_cuda_mib"] > 0 for row in stages["render"])
