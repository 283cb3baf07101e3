"""Ditto's checkpoint layout (models/ditto/checkpoints.py) and aux models (aux.py), on
random checkpoints written at test time in upstream's layout (tests/ditto_checkpoints.py)."""

from __future__ import annotations

import hashlib
import importlib
import logging
import math
import pickle
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

from farm.errors import PermanentError
from models.ditto import aux
from models.ditto import checkpoints as ck
from tests import ditto_checkpoints as dc


@pytest.fixture(scope="module")
def layout(tmp_path_factory) -> Path:
    """A complete layout with the stand-in networks (farm's may not all exist yet)."""
    root = tmp_path_factory.mktemp("ditto")
    return dc.write_random_checkpoints(root, networks=dc.stand_in_networks())


@pytest.fixture
def stand_ins(monkeypatch):
    monkeypatch.setattr(ck, "NETWORKS", dc.stand_in_networks())


def one_line(e: pytest.ExceptionInfo, *parts: object) -> str:
    msg = str(e.value)
    assert "\n" not in msg, msg
    for p in parts:
        assert str(p) in msg, (p, msg)
    return msg


# --- the config ------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_config_with_plain_data_and_numpy_arrays_reads(tmp_path, protocol):
    cfg = dc.upstream_config()
    cfg["default_kwargs"]["a_set"] = {1, 2}
    cfg["default_kwargs"]["a_scalar"] = np.float32(1.5)
    cfg["default_kwargs"]["bytes"] = b"\x00\xff"
    path = tmp_path / "cfg.pkl"
    path.write_bytes(pickle.dumps(cfg, protocol=protocol))
    got = ck.read_config(path)
    assert got["audio2motion_cfg"] == cfg["audio2motion_cfg"]
    assert got["base_cfg"] == cfg["base_cfg"]
    kw = got["default_kwargs"]
    assert kw["fade_out_keys"] == ("exp",) and kw["a_set"] == {1, 2}
    assert kw["a_scalar"] == np.float32(1.5) and kw["bytes"] == b"\x00\xff"
    for key in ("delta_eye_arr", "v_min_max_for_clip"):
        assert kw[key].dtype == np.float32
        np.testing.assert_array_equal(kw[key], cfg["default_kwargs"][key])
    assert ck.config_problems(got) == []


def test_config_that_imports_a_callable_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pkl"
    # GLOBAL os.system, then call it with a shell command: pickle.load would run it.
    path.write_bytes(b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR.")
    with pytest.raises(PermanentError) as e:
        ck.read_config(path)
    one_line(e, path, "os.system")
    assert not marker.exists()

    class Boom:
        def __reduce__(self):
            return (Path.touch, (marker,))

    path.write_bytes(pickle.dumps({"x": Boom()}))
    with pytest.raises(PermanentError) as e:
        ck.read_config(path)
    one_line(e, path, "pathlib")
    assert not marker.exists()


@pytest.mark.parametrize(
    "value, refused",
    [
        (Fraction(1, 3), "fractions.Fraction"),
        (np.array([1, "a"], dtype=object), "object"),
        (eval, "builtins.eval"),
    ],
)
def test_config_with_any_class_is_refused(tmp_path, value, refused):
    path = tmp_path / "cfg.pkl"
    path.write_bytes(pickle.dumps({"default_kwargs": value}))
    with pytest.raises(PermanentError) as e:
        ck.read_config(path)
    one_line(e, path, refused)


def test_truncated_missing_and_odd_configs(tmp_path):
    path = tmp_path / "cfg.pkl"
    data = pickle.dumps(dc.upstream_config())
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(PermanentError) as e:
        ck.read_config(path)
    one_line(e, path, "not a readable config")
    with pytest.raises(PermanentError) as e:
        ck.read_config(tmp_path / "nope.pkl")
    one_line(e, "nope.pkl", "missing")
    path.write_bytes(pickle.dumps([1, 2]))
    with pytest.raises(PermanentError) as e:
        ck.read_config(path)
    one_line(e, path, "not a dict")
    cfg = dc.upstream_config()
    del cfg["base_cfg"]["hubert_cfg"]
    cfg["audio2motion_cfg"]["seq_frames"] = "80"
    assert ck.config_problems(cfg, "c.pkl") == [
        "c.pkl: base_cfg has no 'hubert_cfg' dict",
        "c.pkl: audio2motion_cfg['seq_frames'] is '80', not a positive integer",
    ]


# --- state dicts -----------------------------------------------------------------------


def test_containers_unwrap(layout):
    lmdm = ck.load_state_dict(layout / ck.FILES["lmdm"], "lmdm")
    stitch = ck.load_state_dict(layout / ck.FILES["stitch"], "stitch")
    plain = ck.load_state_dict(layout / ck.FILES["warp"], "plain")
    for sd in (lmdm, stitch, plain):
        assert set(sd) == {
            "body.0.weight",
            "body.0.bias",
            "body.2.weight",
            "body.2.bias",
            "running",
        }
    raw = torch.load(layout / ck.FILES["stitch"], weights_only=True)
    assert all(k.startswith("module.") for k in raw["retarget_shoulder"])


def test_missing_truncated_and_wrong_container_name_the_file(layout, tmp_path):
    with pytest.raises(PermanentError) as e:
        ck.load_state_dict(tmp_path / "decoder.pth")
    one_line(e, tmp_path / "decoder.pth", "missing")

    data = (layout / ck.FILES["decoder"]).read_bytes()
    for cut in (len(data) // 2, 10):
        bad = tmp_path / "decoder.pth"
        bad.write_bytes(data[:cut])
        with pytest.raises(PermanentError) as e:
            ck.load_state_dict(bad)
        one_line(e, bad, "not a readable PyTorch checkpoint")

    with pytest.raises(PermanentError) as e:
        ck.load_state_dict(layout / ck.FILES["decoder"], "lmdm")
    one_line(e, ck.FILES["decoder"], "'model_state_dict'", "body.0.weight")
    with pytest.raises(PermanentError) as e:
        ck.load_state_dict(layout / ck.FILES["lmdm"], "plain")
    one_line(e, ck.FILES["lmdm"], "model_state_dict")
    with pytest.raises(PermanentError) as e:
        ck.load_state_dict(layout / ck.FILES["lmdm"], "stitch")
    one_line(e, ck.FILES["lmdm"], "'retarget_shoulder'")


def test_a_pickle_that_is_not_weights_only_is_refused(tmp_path):
    marker = tmp_path / "ran"

    class Boom:
        def __reduce__(self):
            return (Path.touch, (marker,))

    path = tmp_path / "warp_network.pth"
    torch.save({"w": Boom()}, path)
    with pytest.raises(PermanentError) as e:
        ck.load_state_dict(path)
    one_line(e, path)
    assert not marker.exists()


def test_wrong_shape_names_file_and_key(layout, tmp_path, stand_ins):
    spec = next(s for s in ck.NETWORKS if s.name == "stitch")
    raw = torch.load(layout / spec.file, weights_only=True)
    raw["retarget_shoulder"]["module.body.2.weight"] = torch.zeros(3, 5)
    path = tmp_path / "stitch_network.pth"
    torch.save(raw, path)
    with pytest.raises(PermanentError) as e:
        ck.build_network(spec, path)
    one_line(e, path, "body.2.weight", "(3, 5)")


# --- the opened layout -----------------------------------------------------------------


def test_open_checkpoints_and_load_networks(layout, stand_ins, caplog):
    caplog.set_level(logging.INFO, logger="farm.ditto")
    ckpt = ck.open_checkpoints(layout)
    again = ck.open_checkpoints(layout)
    logged = [r for r in caplog.records if r.name == "farm.ditto"]
    assert len(logged) == 1
    assert ckpt.sha256 == again.sha256
    assert set(ckpt.sha256) == set(ck.FILES)
    warp = layout / ck.FILES["warp"]
    assert ckpt.sha256["warp"] == hashlib.sha256(warp.read_bytes()).hexdigest()
    assert ckpt.sha256["warp"][:16] in logged[0].getMessage()
    assert ckpt.config["audio2motion_cfg"]["seq_frames"] == 80

    nets = ck.load_networks(ckpt, "cpu")
    assert set(nets) == {s.name for s in ck.NETWORKS}
    assert all(not n.training for n in nets.values())
    assert type(nets["lmdm"]).__name__ == "LMDM"
    sd = ck.load_state_dict(layout / ck.FILES["lmdm"], "lmdm")
    torch.testing.assert_close(nets["lmdm"].state_dict()["body.0.weight"], sd["body.0.weight"])


def test_open_checkpoints_refuses_an_incomplete_layout(layout, tmp_path, stand_ins):
    root = dc.write_random_checkpoints(tmp_path / "r", networks=dc.stand_in_networks())
    (root / ck.FILES["hubert"]).unlink()
    with pytest.raises(PermanentError) as e:
        ck.open_checkpoints(root)
    one_line(e, ck.FILES["hubert"], "missing")


def test_check_is_empty_on_a_good_layout(layout, stand_ins):
    assert ck.check(layout) == []


def test_check_lists_every_problem(tmp_path, stand_ins):
    root = dc.write_random_checkpoints(tmp_path / "r", networks=dc.stand_in_networks())
    (root / ck.FILES["motion_extractor"]).unlink()
    cfg = dc.upstream_config()
    del cfg["default_kwargs"]
    (root / ck.CONFIG).write_bytes(pickle.dumps(cfg))
    sd = torch.load(root / ck.FILES["decoder"], weights_only=True)
    sd["body.0.bias"] = torch.zeros(7)
    torch.save(sd, root / ck.FILES["decoder"])
    (root / ck.FILES["landmark106"]).write_bytes(b"not onnx")
    dc.write_landmark106(root / ck.FILES["landmark203"])  # a model with the wrong I/O

    problems = ck.check(root)
    assert all("\n" not in p for p in problems)
    text = "\n".join(problems)
    assert f"{root / ck.FILES['motion_extractor']}: missing" in problems
    assert "no 'default_kwargs' dict" in text
    assert ck.FILES["decoder"] in text and "body.0.bias" in text
    assert f"{root / ck.FILES['landmark106']}: not a loadable ONNX model" in text
    assert "input is named 'data', expected 'input'" in text
    assert "expected [N, 3, 224, 224]" in text and "expected [N, 406]" in text
    assert len(problems) == 7, problems


def test_farm_networks_round_trip_where_written(tmp_path):
    """farm's own classes (those written yet): random reduced weights written in upstream's
    containers, opened and loaded back strictly, bit for bit."""
    present = []
    for spec in ck.NETWORKS:
        try:
            importlib.import_module(spec.module)
            present.append(spec)
        except ImportError:
            continue
    if not present:
        pytest.skip("no farm Ditto network module is written yet")
    root = dc.write_random_checkpoints(tmp_path, seed=3)
    built = [s for s in present if (root / s.file).is_file()]
    assert built, "farm's Ditto modules are there, but none could be written"
    for spec in built:
        net = ck.build_network(spec, root / spec.file)
        sd = ck.load_state_dict(root / spec.file, spec.container)
        for key, value in net.state_dict().items():
            assert torch.equal(value, sd[key]), (spec.name, key)
    if len(built) == len(ck.NETWORKS):
        nets = ck.load_networks(ck.open_checkpoints(root), "cpu")
        assert set(nets) == {s.name for s in ck.NETWORKS}
        assert ck.check(root) == []


# --- aux models on the stand-ins ---------------------------------------------------------


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    rng = np.random.default_rng(1)
    return rng.integers(0, 255, (512, 512, 3), dtype=np.uint8)


def test_detector_finds_the_fixed_box(layout, photo):
    det = aux.FaceDetector(layout / ck.FILES["detector"], device="cpu")
    faces = det(photo)
    assert len(faces) == 1  # the weaker duplicate at stride 16 is suppressed
    np.testing.assert_allclose(faces.boxes[0], dc.FACE_BOX, atol=1e-3)
    assert faces.scores[0] == pytest.approx(dc.FACE_SCORE)
    np.testing.assert_allclose(faces.keypoints[0], dc.FACE_KEYPOINTS, atol=1e-3)
    assert faces.largest() == 0


def test_detector_letterboxes_other_shapes(layout):
    det = aux.FaceDetector(layout / ck.FILES["detector"], device="cpu")
    wide = np.zeros((480, 1024, 3), np.uint8)  # scaled by 0.5 into the top of 512x512
    faces = det(wide)
    np.testing.assert_allclose(faces.boxes[0], np.asarray(dc.FACE_BOX) * 2, atol=1e-3)
    tall = np.zeros((1024, 768, 3), np.uint8)
    np.testing.assert_allclose(det(tall).boxes[0], np.asarray(dc.FACE_BOX) * 2, atol=1e-3)


def test_detector_nms_keeps_separate_faces():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60]], np.float32)
    assert aux.nms(boxes, np.array([0.9, 0.8, 0.7]), 0.4) == [0, 2]


def test_landmarks_land_on_the_face(layout, photo):
    box = np.asarray(dc.FACE_BOX)
    lmk106 = aux.Landmarks106(layout / ck.FILES["landmark106"], device="cpu")(photo, box)
    assert lmk106.shape == (106, 2)
    left, right = lmk106[[33, 35, 40, 39]].mean(0), lmk106[[87, 89, 94, 93]].mean(0)
    lips = (lmk106[52] + lmk106[61]) / 2
    assert left[0] < right[0] and abs(left[1] - right[1]) < 1
    assert lips[1] > left[1] + 40 and abs(lips[0] - 256) < 1
    x1, y1, x2, y2 = box
    assert (lmk106 >= (x1 - 2, y1 - 2)).all() and (lmk106 <= (x2 + 2, y2 + 2)).all()

    # upstream's 224 crop from the 106 points: square 1.5 x their extent, shifted up 0.1
    lo, hi = lmk106.min(0), lmk106.max(0)
    side = float((hi - lo).max()) * 1.5
    centre = (lo + hi) / 2 + (0, -0.1 * side)
    s = 224 / side
    m_o2c = np.array([[s, 0, 112 - s * centre[0]], [0, s, 112 - s * centre[1]], [0, 0, 1]])
    import cv2

    crop = cv2.warpAffine(photo, m_o2c[:2], (224, 224))
    lmk203 = aux.Landmarks203(layout / ck.FILES["landmark203"], device="cpu")(
        crop, np.linalg.inv(m_o2c)
    )
    assert lmk203.shape == (203, 2)
    eye203 = (lmk203[[0, 6, 12, 18]].mean(0) + lmk203[[24, 30, 36, 42]].mean(0)) / 2
    lip203 = (lmk203[48] + lmk203[66]) / 2
    np.testing.assert_allclose(eye203, (left + right) / 2, atol=6)
    np.testing.assert_allclose(lip203, lips, atol=6)


@pytest.mark.parametrize("samples", [0, 1, 639, 640, 4480, 16000, 16001, 3 * 16000 + 123])
def test_hubert_frame_count(layout, samples):
    hubert = _hubert(layout)
    audio = np.random.default_rng(samples).standard_normal(samples).astype(np.float32) * 0.1
    feats = hubert.features(audio)
    assert feats.shape == (math.ceil(samples / 16000 * 25), 1024)
    assert feats.dtype == np.float32


def test_hubert_features_are_upstreams_windows(layout):
    hubert = _hubert(layout)
    audio = np.random.default_rng(0).standard_normal(16000).astype(np.float32)
    feats = hubert.features(audio)
    w = dc.hubert_matrix(0)
    padded = np.concatenate([np.zeros(2000, np.float32), audio, np.zeros(6480, np.float32)])
    for f in (0, 3, 7, 24):
        i0 = (f // 5) * 3200  # the window holding frame f
        j = 6 + 2 * (f % 5)  # its two 50 Hz outputs
        win = padded[i0 : i0 + 6480]
        want = (win[320 * j : 320 * j + 320] + win[320 * j + 320 : 320 * j + 640]) / 2 @ w
        np.testing.assert_allclose(feats[f], want, rtol=1e-4, atol=1e-4)
    with pytest.raises(PermanentError):
        hubert.window(np.zeros(6000, np.float32))


_HUBERT: dict[Path, aux.Hubert] = {}


def _hubert(layout: Path) -> aux.Hubert:
    if layout not in _HUBERT:
        _HUBERT[layout] = aux.Hubert(layout / ck.FILES["hubert"], device="cpu")
    return _HUBERT[layout]


def test_aux_models_refuse_the_wrong_file(layout):
    with pytest.raises(PermanentError) as e:
        aux.Hubert(layout / ck.FILES["landmark106"], device="cpu")
    one_line(e, ck.FILES["landmark106"], "input_values")
    with pytest.raises(PermanentError) as e:
        aux.FaceDetector(layout / "nope.onnx", device="cpu")
    one_line(e, "nope.onnx", "missing")
