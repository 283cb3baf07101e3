"""models/gaussiantalker/layout.py on a synthetic model in upstream's layout
(tests/gaussiantalker_fixture.py): what opens reads back, and every broken file gives
one line naming it."""

from __future__ import annotations

import json
import math
import os
import shutil
import time
import warnings

import numpy as np
import pytest
import torch

from farm.errors import PermanentError
from models.gaussiantalker import layout
from tests import gaussiantalker_fixture as fx


@pytest.fixture
def synthetic(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fx.write_synthetic_model(tmp_path, frames=4, gaussians=200, seed=3)


def test_the_fixture_is_fast(tmp_path):
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fx.write_synthetic_model(tmp_path)
    assert time.perf_counter() - start < 1.0


def test_the_synthetic_layout_opens_and_reads_back(synthetic):
    model_dir, data_dir = synthetic
    assert layout.problems(model_dir) == []
    m = layout.open_model(model_dir)
    assert m.data_dir == data_dir.resolve()  # cfg_args' source_path
    assert m.iteration == 10000
    assert m.ply_path == model_dir / "point_cloud" / "iteration_10000" / "point_cloud.ply"
    assert m.deformation_path == m.ply_path.with_name("deformation.pth")
    assert m.audio_dim == 44
    assert m.audio_key.endswith("audio_net.encoder_conv.0.weight")
    assert m.size == (64, 64)
    assert m.focal == (128.0, 128.0)
    assert m.background_path == data_dir.resolve() / "bc.jpg"
    assert m.cfg["kplanes_config"]["resolution"] == [16, 16, 16, 25]
    assert m.cfg["sh_degree"] == 3

    g = m.gaussians
    assert len(g) == 200
    assert g.xyz.shape == (200, 3) and g.f_dc.shape == (200, 3) and g.f_rest.shape == (200, 45)
    assert g.opacity.shape == (200,) and g.scale.shape == (200, 3)
    assert g.rotation.shape == (200, 4)
    assert all(a.dtype == np.float32 for a in (g.xyz, g.f_rest, g.opacity, g.rotation))
    assert g.sh_degree == 3 and g.sh().shape == (200, 16, 3)

    # frames: train 0..2, then val 3
    assert [(f.img_id, f.split) for f in m.frames] == [
        (0, "train"),
        (1, "train"),
        (2, "train"),
        (3, "val"),
    ]
    assert [f.img_id for f in m.val_frames] == [3] and len(m.train_frames) == 3
    for f in m.frames:
        assert f.torso_path == data_dir.resolve() / "torso_imgs" / f"{f.img_id}.png"
        assert f.torso_path.is_file()
        assert f.au45 == fx.AU45_VALUES[f.img_id]
        assert f.eye == min(max(f.au45, 0.0), 2.0) / 2
        assert f.aud_id == f.img_id
        assert math.isclose(f.camera.fovx, 2 * math.atan(32 / 128), rel_tol=1e-9)
        assert math.isclose(f.camera.fovy, f.camera.fovx)
    assert m.frames[2].eye == 1.0  # AU45 2.7 is clipped at 2


def test_cameras_follow_upstream_from_the_track_params(synthetic):
    model_dir, data_dir = synthetic
    m = layout.open_model(model_dir)
    track = torch.load(data_dir / "track_params.pt", weights_only=True)
    for f in m.frames:
        euler = track["euler"][f.img_id].double().numpy()
        t = track["trans"][f.img_id].double().numpy()
        r0 = layout.euler_to_rotation(euler)
        cam = f.camera
        assert cam.R.shape == (3, 3) and cam.T.shape == (3,)
        # R is minus the transpose of (x-flip @ R0), T is -trans with x negated
        np.testing.assert_allclose(cam.R, -(np.diag([-1, 1, 1]) @ r0).T, atol=1e-6)
        np.testing.assert_allclose(cam.T, [t[0], -t[1], -t[2]], atol=1e-6)
        assert np.allclose(cam.R @ cam.R.T, np.eye(3), atol=1e-5)
        # world-to-view: the tracker's camera space with y and z flipped (+z forward)
        p = np.array([[0.01, 0.02, 0.03]])
        view = cam.world_to_view() @ np.append(p[0], 1.0)
        np.testing.assert_allclose(view[:3], np.diag([1, -1, -1]) @ (r0 @ p[0] + t), atol=1e-6)
    # the blob is ~1 unit in front of every camera and projects inside the image
    for k in range(len(m.frames)):
        v = fx.camera_space(m, k, m.gaussians.xyz.astype(np.float64))
        assert 0.8 < np.median(v[:, 2]) < 1.2
        uv = fx.project(m, k, m.gaussians.xyz.astype(np.float64))
        assert np.all((uv > 0) & (uv < 64))


def test_euler_to_rotation_is_a_rotation_with_upstreams_axes():
    # x: textbook; y: textbook; z: the textbook rotation by -psi
    c, s = math.cos(0.3), math.sin(0.3)
    np.testing.assert_allclose(
        layout.euler_to_rotation([0.3, 0, 0]), [[1, 0, 0], [0, c, -s], [0, s, c]], atol=1e-12
    )
    np.testing.assert_allclose(
        layout.euler_to_rotation([0, 0.3, 0]), [[c, 0, s], [0, 1, 0], [-s, 0, c]], atol=1e-12
    )
    np.testing.assert_allclose(
        layout.euler_to_rotation([0, 0, 0.3]), [[c, s, 0], [-s, c, 0], [0, 0, 1]], atol=1e-12
    )
    r = layout.euler_to_rotation([0.3, -0.7, 1.1])
    np.testing.assert_allclose(
        r,
        layout.euler_to_rotation([0.3, 0, 0])
        @ layout.euler_to_rotation([0, -0.7, 0])
        @ layout.euler_to_rotation([0, 0, 1.1]),
        atol=1e-12,
    )


def test_the_latest_iteration_is_the_numeric_maximum(synthetic):
    model_dir, _ = synthetic
    pc = model_dir / "point_cloud"
    shutil.copytree(pc / "iteration_10000", pc / "iteration_9000")
    shutil.copytree(pc / "iteration_10000", pc / "coarse_iteration_30000")
    assert layout.open_model(model_dir).iteration == 10000
    shutil.copytree(pc / "iteration_10000", pc / "iteration_12000")
    assert layout.open_model(model_dir).iteration == 12000


def test_an_explicit_data_dir_wins_and_a_relative_source_path_is_found(synthetic, tmp_path):
    model_dir, data_dir = synthetic
    moved = tmp_path / "elsewhere"
    shutil.move(data_dir, moved)
    assert any("training data directory" in p for p in layout.problems(model_dir))
    assert layout.open_model(model_dir, moved).data_dir == moved
    # upstream's cfg_args as written by `train.py -s elsewhere -m model` run in tmp_path
    cfg = layout.read_cfg_args(model_dir / "cfg_args")
    cfg.update(source_path="elsewhere", model_path="./model")
    (model_dir / "cfg_args").write_text(
        f"Namespace({', '.join(f'{k}={v!r}' for k, v in cfg.items())})"
    )
    assert layout.open_model(model_dir).data_dir == moved.resolve()


@pytest.mark.parametrize("width", [29, 44, 1024])
def test_the_audio_width_is_read_from_the_weights(tmp_path, width):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model_dir, _ = fx.write_synthetic_model(tmp_path, audio_dim=width, gaussians=20)
    assert layout.open_model(model_dir).audio_dim == width


def test_the_fixture_weights_load_in_farms_deformation(synthetic):
    deformation = pytest.importorskip("models.gaussiantalker.deformation")
    m = layout.open_model(synthetic[0])
    sd = torch.load(m.deformation_path, weights_only=True)
    net = deformation.Deformation.from_state_dict(sd, n_head=m.cfg["n_head"])
    assert net.config.audio_in == m.audio_dim == 44


def test_given_state_dicts_plain_or_wrapped(tmp_path):
    sd = {
        "audio_net.encoder_conv.0.weight": torch.zeros(32, 29, 3),
        "audio_net.encoder_conv.0.bias": torch.zeros(32),
    }
    model_dir, _ = fx.write_synthetic_model(tmp_path, gaussians=20, deformation_state_dict=sd)
    m = layout.open_model(model_dir)
    assert (m.audio_key, m.audio_dim) == ("audio_net.encoder_conv.0.weight", 29)
    torch.save({"state_dict": sd}, m.deformation_path)
    assert layout.open_model(model_dir).audio_dim == 29


# ---------------------------------------------------------------------------------------
# cfg_args


def test_cfg_args_with_a_call_is_refused_without_running_it(tmp_path):
    target = tmp_path / "pwned"
    path = tmp_path / "cfg_args"
    path.write_text(f"Namespace(x=__import__('os').system('touch {target}'))")
    with pytest.raises(PermanentError) as e:
        layout.read_cfg_args(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)
    assert not target.exists()
    # the brief's exact payload, in the working directory
    path.write_text("Namespace(x=__import__('os').system('touch /tmp/pwned'))")
    existed = os.path.exists("/tmp/pwned")
    with pytest.raises(PermanentError):
        layout.read_cfg_args(path)
    assert existed or not os.path.exists("/tmp/pwned")


@pytest.mark.parametrize(
    "text",
    [
        "Namespace(x=os)",  # a name
        "Namespace(x=os.environ)",  # an attribute
        "Namespace(x=[1, open('f')])",  # a call inside a literal
        "Namespace(x=lambda: 1)",
        "exec('1')",  # not a Namespace
        "Namespace(1)",
        "Namespace(x=1",  # garbage
        "",
        "\x00\x01",
    ],
)
def test_cfg_args_refuses_anything_but_literals(tmp_path, text):
    path = tmp_path / "cfg_args"
    path.write_text(text)
    with pytest.raises(PermanentError, match="cfg_args"):
        layout.read_cfg_args(path)


def test_cfg_args_literals(tmp_path):
    path = tmp_path / "cfg_args"
    path.write_text(
        "Namespace(a=-1, b=1.5e-4, c='s', d=True, e=None, f=[1, 2], g={'k': (1, 2)}, "
        "**{'odd-name': 3})\n"
    )
    assert layout.read_cfg_args(path) == {
        "a": -1,
        "b": 1.5e-4,
        "c": "s",
        "d": True,
        "e": None,
        "f": [1, 2],
        "g": {"k": (1, 2)},
        "odd-name": 3,
    }


# ---------------------------------------------------------------------------------------
# Every broken file: one line naming it


def _only_problem(model_dir, data_dir=None):
    found = layout.problems(model_dir, data_dir)
    assert len(found) == 1, found
    assert "\n" not in found[0]
    with pytest.raises(PermanentError) as e:
        layout.open_model(model_dir, data_dir)
    assert str(e.value) == found[0]
    return found[0]


def _ply(model_dir):
    return model_dir / "point_cloud" / "iteration_10000" / "point_cloud.ply"


def test_a_ply_missing_a_property(synthetic):
    model_dir, _ = synthetic
    props = fx.random_gaussians(10, np.random.default_rng(0))
    del props["rot_3"]
    fx.write_ply(_ply(model_dir), props)
    line = _only_problem(model_dir)
    assert str(_ply(model_dir)) in line and "rot_3" in line


def test_a_ply_with_a_double_property(synthetic):
    model_dir, _ = synthetic
    fx.write_ply(
        _ply(model_dir), fx.random_gaussians(10, np.random.default_rng(0)), {"x": "double"}
    )
    line = _only_problem(model_dir)
    assert str(_ply(model_dir)) in line and "x is double" in line


def test_a_ply_with_extra_properties_of_other_types_reads(tmp_path):
    props = fx.random_gaussians(10, np.random.default_rng(0))
    props = {"label": np.arange(10), **props, "red": np.full(10, 7)}
    path = tmp_path / "p.ply"
    fx.write_ply(path, props, {"label": "int", "red": "uchar"})
    g = layout.read_ply(path)
    np.testing.assert_array_equal(g.xyz[:, 0], props["x"].astype(np.float32))
    np.testing.assert_array_equal(g.f_rest[:, 44], props["f_rest_44"].astype(np.float32))
    np.testing.assert_array_equal(g.opacity, props["opacity"].astype(np.float32))


def test_a_truncated_ply(synthetic):
    model_dir, _ = synthetic
    data = _ply(model_dir).read_bytes()
    _ply(model_dir).write_bytes(data[:-100])
    line = _only_problem(model_dir)
    assert str(_ply(model_dir)) in line and "truncated" in line


@pytest.mark.parametrize(
    "content",
    [b"", b"not a ply", b"ply\nformat ascii 1.0\nelement vertex 1\nproperty float x\nend_header\n"],
)
def test_a_ply_that_is_not_binary_3dgs(synthetic, content):
    model_dir, _ = synthetic
    _ply(model_dir).write_bytes(content)
    assert str(_ply(model_dir)) in _only_problem(model_dir)


def test_a_missing_torso_image(synthetic):
    model_dir, data_dir = synthetic
    (data_dir / "torso_imgs" / "2.png").unlink()
    line = _only_problem(model_dir)
    assert str(data_dir.resolve() / "torso_imgs" / "2.png") in line and "torso" in line


def test_missing_torso_images_are_each_listed(synthetic):
    model_dir, data_dir = synthetic
    (data_dir / "torso_imgs" / "1.png").unlink()
    (data_dir / "torso_imgs" / "3.png").unlink()
    found = layout.problems(model_dir)
    assert [p.split(":")[0].rsplit("/", 1)[-1] for p in found] == ["1.png", "3.png"]


def test_bad_json(synthetic):
    model_dir, data_dir = synthetic
    (data_dir / "transforms_val.json").write_text('{"focal_len": 1, ')
    line = _only_problem(model_dir)
    assert "transforms_val.json" in line and "JSON" in line


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (lambda d: d.pop("focal_len"), "focal_len"),
        (lambda d: d.pop("cx"), "cx"),
        (lambda d: d["frames"][0].pop("img_id"), "img_id"),
        (lambda d: d.update(frames=[]), "no frames"),
        (lambda d: d.update(cx=32.25), "whole pixels"),
    ],
)
def test_transforms_without_what_upstream_reads(synthetic, change, words):
    model_dir, data_dir = synthetic
    path = data_dir / "transforms_train.json"
    doc = json.loads(path.read_text())
    change(doc)
    path.write_text(json.dumps(doc))
    found = layout.problems(model_dir)
    assert any("transforms_train.json" in p and words in p for p in found), found


def test_au_csv_without_the_au45_column(synthetic):
    model_dir, data_dir = synthetic
    path = data_dir / "au.csv"
    path.write_text(path.read_text().replace("AU45_r", "AU46_r"))
    line = _only_problem(model_dir)
    assert str(data_dir.resolve() / "au.csv") in line and "AU45_r" in line


def test_au_csv_too_short(synthetic):
    model_dir, data_dir = synthetic
    path = data_dir / "au.csv"
    path.write_text("\n".join(path.read_text().splitlines()[:3]) + "\n")
    line = _only_problem(model_dir)
    assert "au.csv" in line and "2 rows" in line


def test_missing_deformation_weights(synthetic):
    model_dir, _ = synthetic
    path = _ply(model_dir).with_name("deformation.pth")
    path.unlink()
    line = _only_problem(model_dir)
    assert str(path) in line and "missing" in line


def test_deformation_weights_without_the_audio_encoder(synthetic):
    model_dir, _ = synthetic
    path = _ply(model_dir).with_name("deformation.pth")
    torch.save({"other.weight": torch.zeros(3)}, path)
    assert "audio_net.encoder_conv.0.weight" in _only_problem(model_dir)
    torch.save({"deformation_net.audio_net.encoder_conv.0.weight": torch.zeros(32, 29)}, path)
    assert "expected [32, C, 3]" in _only_problem(model_dir)
    path.write_bytes(b"garbage")
    assert str(path) in _only_problem(model_dir)


def test_track_params_with_wrong_shapes(synthetic):
    model_dir, data_dir = synthetic
    path = data_dir / "track_params.pt"
    track = torch.load(path, weights_only=True)
    track["euler"] = track["euler"][:, :2]
    torch.save(track, path)
    line = _only_problem(model_dir)
    assert str(data_dir.resolve() / "track_params.pt") in line and "euler" in line


def test_track_params_with_too_few_frames(synthetic):
    model_dir, data_dir = synthetic
    path = data_dir / "track_params.pt"
    track = torch.load(path, weights_only=True)
    torch.save({k: v[:2] if k in ("euler", "trans") else v for k, v in track.items()}, path)
    assert "track_params.pt" in _only_problem(model_dir)


def test_missing_files_are_each_named(synthetic):
    model_dir, data_dir = synthetic
    for name in ("bc.jpg", "transforms_train.json", "track_params.pt"):
        (data_dir / name).unlink()
    found = layout.problems(model_dir)
    for name in ("bc.jpg", "transforms_train.json", "track_params.pt"):
        assert any(name in p and "missing" in p for p in found), (name, found)
    (model_dir / "cfg_args").unlink()
    assert layout.problems(model_dir) == [f"{model_dir / 'cfg_args'}: missing"]
    shutil.rmtree(model_dir / "point_cloud")
    assert any("point_cloud" in p for p in layout.problems(model_dir, data_dir))


def test_a_torso_image_without_alpha_or_of_the_wrong_size(synthetic):
    from PIL import Image

    model_dir, data_dir = synthetic
    path = data_dir / "torso_imgs" / "0.png"
    Image.new("RGB", (64, 64)).save(path)
    assert "alpha" in _only_problem(model_dir)
    Image.new("RGBA", (32, 64)).save(path)
    assert "32x64" in _only_problem(model_dir)
