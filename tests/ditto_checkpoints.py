"""Random Ditto checkpoints in upstream's file layout, written at test time (never in git).

`write_random_checkpoints(root)` writes what a user has after downloading upstream's
checkpoints (models/ditto/checkpoints.py FILES), so farm's loaders read them exactly as
they would read the real ones:

- each network's state dict, from farm's own class (models.ditto.<module>) built with a
  reduced Config (full size with reduced=False), random weights from the seed, saved in
  upstream's container (LMDM: {"model_state_dict": sd}; stitching:
  {"retarget_shoulder": {"module." + key: ...}}; the others plain). A class that is not
  written yet is skipped with a warning naming it; `stand_in_networks()` gives tiny
  stand-ins with the same contract for tests that need a complete layout;
- the `.pkl` config: a dict with the sections and keys upstream's parse_cfg and
  StreamSDK.setup read, numpy arrays included as in upstream's files;
- small ONNX stand-ins with upstream's input/output names, dtypes and shapes: a detector
  that finds one face, FACE_BOX in its 512x512 input (plus a weaker duplicate that NMS
  removes); landmark models that put eyes, nose and mouth where a face in that box has
  them; a HuBERT that is a fixed linear map of each window, [20, 1024] per window.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from farm.errors import PermanentError
from models.ditto import checkpoints as ck

# The detector stand-in's face, in the pixels of its 512x512 input (x1, y1, x2, y2): a
# 512x512 photo gets exactly this box back.
FACE_BOX = (176.0, 156.0, 336.0, 356.0)
FACE_SCORE = 0.98
# 5 keypoints of that face: eyes, nose, mouth corners.
FACE_KEYPOINTS = ((221.0, 230.0), (291.0, 230.0), (256.0, 265.0), (226.0, 305.0), (286.0, 305.0))
HUBERT_FRAMES = 20  # outputs per 6480-sample window (400-sample field, stride 320)

OPSET = 17
IR_VERSION = 9


# ---------------------------------------------------------------------------------------
# Stand-in networks (the from_state_dict contract, tiny)


def strict_load(module: nn.Module, sd: dict) -> nn.Module:
    """load_state_dict(strict) that names the first bad key in a PermanentError."""
    want = module.state_dict()
    for key, t in want.items():
        if key not in sd:
            raise PermanentError(f"missing key '{key}'")
        if tuple(sd[key].shape) != tuple(t.shape):
            raise PermanentError(
                f"'{key}' has shape {tuple(sd[key].shape)}, expected {tuple(t.shape)}"
            )
    for key in sd:
        if key not in want:
            raise PermanentError(f"unexpected key '{key}'")
    module.load_state_dict(sd)
    return module


class StandIn(nn.Module):
    """A two-layer MLP with farm's network contract: Config, Config.reduced(),
    from_state_dict(sd) inferring the width from the shapes."""

    @dataclass(frozen=True)
    class Config:
        width: int = 32

        @classmethod
        def reduced(cls) -> StandIn.Config:
            return cls(width=8)

    def __init__(self, cfg: StandIn.Config | None = None):
        super().__init__()
        cfg = cfg or self.Config()
        self.body = nn.Sequential(nn.Linear(6, cfg.width), nn.ReLU(), nn.Linear(cfg.width, 3))
        self.register_buffer("running", torch.zeros(cfg.width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    @classmethod
    def from_state_dict(cls, sd: dict) -> StandIn:
        if "body.0.weight" not in sd:
            raise PermanentError("missing key 'body.0.weight'")
        return strict_load(cls(cls.Config(width=sd["body.0.weight"].shape[0])), sd)


# One class per network, so the names in errors and logs stay distinct.
class AppearanceExtractor(StandIn): ...


class MotionExtractor(StandIn): ...


class WarpingNetwork(StandIn): ...


class SPADEDecoder(StandIn): ...


class StitchingNetwork(StandIn): ...


class LMDM(StandIn): ...


def stand_in_networks() -> tuple[ck.NetworkSpec, ...]:
    """checkpoints.NETWORKS with this module's stand-ins in place of farm's classes."""
    return tuple(dataclasses.replace(s, module=__name__) for s in ck.NETWORKS)


# ---------------------------------------------------------------------------------------
# Networks


# Reduced widths per network, as overrides of each class's Config fields (used unless the
# class offers Config.reduced() or its module REDUCED). They fit together: the appearance
# volume (8 x 4) is what the warp takes, the warp's output what the decoder takes; the
# keypoint count, pose bins and motion/condition widths stay upstream's.
REDUCED: dict[str, dict[str, object]] = {
    "appearance": {
        "block_expansion": 8,
        "max_features": 32,
        "reshape_channels": 8,
        "reshape_depth": 4,
        "num_resblocks": 1,
    },
    "motion_extractor": {"dims": (8, 16, 24, 32), "depths": (1, 1, 1, 1)},
    "warp": {
        "feature_channels": 8,
        "depth": 4,
        "out_channels": 32,
        "compress": 2,
        "hourglass_expansion": 4,
        "hourglass_max": 32,
    },
    "decoder": {"in_channels": 32, "out_channels": 16, "hidden": 16},
    "stitch": {"hidden_sizes": (16, 16, 8)},
    "lmdm": {"latent_dim": 32, "ff_dim": 64, "num_layers": 2, "encoder_layers": 1},
}


def _config_for(module: object, cls: type, name: str, reduced: bool) -> object | None:
    config = getattr(cls, "Config", None) or getattr(module, "Config", None)
    if config is None:
        return None
    if not reduced:
        return config()
    made = getattr(config, "reduced", None)
    if callable(made):
        return made()
    if getattr(module, "REDUCED", None) is not None:
        return module.REDUCED
    if name in REDUCED:
        return dataclasses.replace(config(), **REDUCED[name])
    return None


def _build(cls: type, cfg: object) -> nn.Module:
    make = getattr(cls, "from_config", None)
    return make(cfg) if callable(make) else cls(cfg)


def _random_state_dict(spec: ck.NetworkSpec, reduced: bool, seed: int) -> dict | None:
    try:
        module = importlib.import_module(spec.module)
        cls = getattr(module, spec.cls)
    except (ImportError, AttributeError) as e:
        warnings.warn(
            f"ditto checkpoints: {spec.name} skipped, {spec.module}.{spec.cls} is "
            f"not written yet ({e})",
            stacklevel=3,
        )
        return None
    try:
        cfg = _config_for(module, cls, spec.name, reduced)
    except (TypeError, ValueError) as e:  # a Config whose fields changed
        warnings.warn(
            f"ditto checkpoints: {spec.name} skipped, no reduced {spec.cls} config ({e})",
            stacklevel=3,
        )
        return None
    if cfg is None:
        warnings.warn(
            f"ditto checkpoints: {spec.name} skipped, {spec.module} has no "
            f"{'Config.reduced()/REDUCED' if reduced else 'Config'}",
            stacklevel=3,
        )
        return None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = _build(cls, cfg)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in net.parameters():  # the class's init, seeded, plus a seeded draw
                p.add_(torch.randn(p.shape, generator=gen) * 0.02)
    return {k: v.detach().clone().contiguous() for k, v in net.state_dict().items()}


def _container(spec: ck.NetworkSpec, sd: dict) -> dict:
    if spec.container == "lmdm":
        return {"model_state_dict": sd}
    if spec.container == "stitch":
        return {"retarget_shoulder": {f"module.{k}": v for k, v in sd.items()}}
    return sd


# ---------------------------------------------------------------------------------------
# Config


def upstream_config() -> dict:
    """A config dict shaped like upstream's v0.4_hubert_cfg_pytorch.pkl: the sections and
    keys parse_cfg and StreamSDK.setup read. Values are upstream's defaults; model paths
    are relative to ditto_pytorch/ as parse_cfg resolves them."""

    def model(rel: str, **more: object) -> dict:
        return {"model_path": rel, "device": "cuda", **more}

    rng = np.random.default_rng(0)
    return {
        "base_cfg": {
            "insightface_det_cfg": model("aux_models/det_10g.onnx", force_ori_type=True),
            "landmark106_cfg": model("aux_models/2d106det.onnx", force_ori_type=True),
            "landmark203_cfg": model("aux_models/landmark203.onnx", force_ori_type=True),
            "landmark478_cfg": {
                "blaze_face_model_path": "",
                "face_mesh_model_path": "",
                "device": "cuda",
                "force_ori_type": True,
                "task_path": "aux_models/face_landmarker.task",
            },
            "appearance_extractor_cfg": model("models/appearance_extractor.pth"),
            "motion_extractor_cfg": model("models/motion_extractor.pth"),
            "stitch_network_cfg": model("models/stitch_network.pth"),
            "warp_network_cfg": model("models/warp_network.pth"),
            "decoder_cfg": model("models/decoder.pth"),
            "hubert_cfg": model("aux_models/hubert_streaming_fix_kv.onnx", force_ori_type=True),
        },
        "audio2motion_cfg": {
            "model_path": "models/lmdm_v0.4_hubert.pth",
            "device": "cuda",
            "motion_feat_dim": 265,
            "audio_feat_dim": 1024 + 8 + 2 + 6 + 63,
            "seq_frames": 80,
            "use_emo": True,
            "use_sc": True,
            "use_eye_open": True,
            "use_eye_ball": True,
            "w2f_type": "hubert",
        },
        "default_kwargs": {
            "max_size": 1920,
            "template_n_frames": -1,
            "crop_scale": 2.3,
            "crop_vx_ratio": 0,
            "crop_vy_ratio": -0.125,
            "crop_flag_do_rot": True,
            "smo_k_s": 13,
            "emo": 4,
            "eye_f0_mode": False,
            "overlap_v2": 10,
            "fix_kp_cond": 0,
            "sampling_timesteps": 50,
            "online_mode": False,
            "smo_k_d": 3,
            "N_d": -1,
            "relative_d": True,
            "delta_eye_open_n": 0,
            "fade_type": "",
            "fade_out_keys": ("exp",),
            "flag_stitching": True,
            "overall_ctrl_info": {},
            # numpy, as in upstream's files: blink offsets [15, 63], clip bounds [4, 265]
            "delta_eye_arr": rng.normal(0, 0.01, (15, 63)).astype(np.float32),
            "v_min_max_for_clip": np.stack(
                [np.full(265, -3.0), np.full(265, 3.0), np.full(265, -2.0), np.full(265, 2.0)]
            ).astype(np.float32),
        },
    }


# ---------------------------------------------------------------------------------------
# ONNX stand-ins


def _face_template() -> dict[str, np.ndarray]:
    """Face parts in box units: x, y in [-1, 1] of the face box's half extents."""

    def ring(cx: float, cy: float, rx: float, ry: float, n: int) -> np.ndarray:
        a = np.linspace(0, 2 * math.pi, n, endpoint=False)
        return np.stack([cx + rx * np.cos(a), cy + ry * np.sin(a)], 1)

    def line(p: tuple, q: tuple, n: int) -> np.ndarray:
        t = np.linspace(0, 1, n)[:, None]
        return np.asarray(p) * (1 - t) + np.asarray(q) * t

    a = np.linspace(math.pi * 1.05, -math.pi * 0.05, 33)
    return {
        "contour": np.stack([0.95 * np.cos(a), 0.3 + 0.7 * np.sin(a)], 1),
        "left_eye": ring(-0.4, -0.2, 0.16, 0.06, 10),
        "right_eye": ring(0.4, -0.2, 0.16, 0.06, 10),
        "left_brow": line((-0.65, -0.42), (-0.15, -0.45), 9),
        "right_brow": line((0.15, -0.45), (0.65, -0.42), 9),
        "nose": line((0.0, -0.15), (0.0, 0.25), 15),
        "mouth": ring(0.0, 0.5, 0.35, 0.1, 20),
    }


def face_points_106() -> np.ndarray:
    """106 points in box units. Meaningful indices (those farm's crop reads): eye
    corners/lids 33, 35, 40, 39 (left) and 87, 89, 94, 93 (right), lips 52 (upper), 61
    (lower); the rest lie on the jaw, brows, nose and mouth."""
    t = _face_template()
    pts = np.concatenate(
        [
            t["contour"],
            t["left_eye"],
            t["left_brow"],
            t["mouth"],
            t["nose"],
            t["right_eye"],
            t["right_brow"],
        ]
    )  # 33 + 10 + 9 + 20 + 15 + 10 + 9 = 106
    for idx, cx in (((33, 35, 40, 39), -0.4), ((87, 89, 94, 93), 0.4)):
        pts[list(idx)] = [(cx - 0.16, -0.2), (cx, -0.26), (cx + 0.16, -0.2), (cx, -0.14)]
    pts[52], pts[61] = (0.0, 0.4), (0.0, 0.6)
    return pts


def face_points_203() -> np.ndarray:
    """203 points in box units. Meaningful indices: eyes 0, 6, 12, 18 (left) and 24, 30,
    36, 42 (right), lips 48 (upper) and 66 (lower)."""
    t = _face_template()

    def ring(cx: float, cy: float, rx: float, ry: float, n: int, start: float) -> np.ndarray:
        a = start + np.linspace(0, 2 * math.pi, n, endpoint=False)
        return np.stack([cx + rx * np.cos(a), cy + ry * np.sin(a)], 1)

    jaw = np.linspace(math.pi * 1.05, -math.pi * 0.05, 67)
    pts = np.concatenate(
        [
            ring(-0.4, -0.2, 0.16, 0.06, 24, math.pi),  # 0..23, 0 = outer corner
            ring(0.4, -0.2, 0.16, 0.06, 24, math.pi),  # 24..47
            ring(0.0, 0.5, 0.35, 0.1, 36, -math.pi / 2),  # 48..83, 48 top, 66 bottom
            ring(0.0, 0.5, 0.25, 0.04, 12, 0.0),  # 84..95 inner lips
            np.concatenate([t["left_brow"], t["right_brow"], [(0.0, -0.45), (0.0, -0.5)]]),
            np.concatenate(
                [t["nose"], [(-0.1, 0.2), (0.1, 0.2), (-0.05, 0.25), (0.05, 0.25), (0.0, 0.28)]]
            ),  # 116..135
            np.stack([0.95 * np.cos(jaw), 0.3 + 0.7 * np.sin(jaw)], 1),  # 136..202
        ]
    )
    assert pts.shape == (203, 2)
    return pts


def _node_io(name: str, shape: list, elem: int | None = None):
    from onnx import TensorProto, helper

    return helper.make_tensor_value_info(name, elem or TensorProto.FLOAT, shape)


def _save(graph, path: Path) -> None:
    import onnx
    from onnx import helper

    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="farm-tests"
    )
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))


def _constant_outputs(input_name: str, outputs: list[tuple[str, np.ndarray, list]]):
    """Nodes and outputs: each output = its constant + 0 * mean(input), so the graph
    depends on its input the way a real model does."""
    from onnx import helper, numpy_helper

    nodes = [
        helper.make_node("ReduceMean", [input_name], ["_mean"], keepdims=0),
        helper.make_node("Mul", ["_mean", "_zero"], ["_nothing"]),
    ]
    inits = [numpy_helper.from_array(np.zeros((), np.float32), "_zero")]
    infos = []
    for name, value, shape in outputs:
        inits.append(numpy_helper.from_array(value.astype(np.float32), f"_{name}_const"))
        nodes.append(helper.make_node("Add", [f"_{name}_const", "_nothing"], [name]))
        infos.append(_node_io(name, shape))
    return nodes, inits, infos


# InsightFace's export names det_10g's tensors by number; farm reads outputs by position.
DETECTOR_INPUT = "input.1"
DETECTOR_OUTPUTS = ("448", "471", "494", "451", "474", "497", "454", "477", "500")


def write_detector(path: Path, size: int = 512, face: bool = True) -> None:
    """SCRFD stand-in: FACE_BOX with FACE_SCORE at stride 32, a weaker copy shifted by
    2 px at stride 16 (NMS removes it), every other anchor scored 0.01; with
    `face=False` every anchor scores 0.01: a photo without a face."""
    from onnx import helper

    scores, boxes, kps = [], [], []
    cx, cy = (FACE_BOX[0] + FACE_BOX[2]) / 2, (FACE_BOX[1] + FACE_BOX[3]) / 2
    for stride in (8, 16, 32):
        cells = (size // stride) ** 2 * 2
        s = np.full((cells, 1), 0.01)
        b = np.zeros((cells, 4))
        k = np.zeros((cells, 10))
        if face and stride in (16, 32):
            x, y = int(cx // stride), int(cy // stride)  # anchor centre at (cx, cy)
            i = (y * (size // stride) + x) * 2
            shift = 2.0 if stride == 16 else 0.0
            ax, ay = x * stride, y * stride
            x1, y1, x2, y2 = FACE_BOX
            b[i] = np.array([ax - x1 - shift, ay - y1, x2 + shift - ax, y2 - ay]) / stride
            k[i] = (np.asarray(FACE_KEYPOINTS) - (ax, ay)).reshape(-1) / stride
            s[i] = FACE_SCORE if stride == 32 else 0.9
        scores.append(s)
        boxes.append(b)
        kps.append(k)
    values = scores + boxes + kps
    widths = (1, 1, 1, 4, 4, 4, 10, 10, 10)
    outs = [
        (name, v, [f"anchors{i % 3}", w])
        for i, (name, v, w) in enumerate(zip(DETECTOR_OUTPUTS, values, widths, strict=True))
    ]
    nodes, inits, infos = _constant_outputs(DETECTOR_INPUT, outs)
    graph = helper.make_graph(
        nodes, "det_10g_stand_in", [_node_io(DETECTOR_INPUT, [1, 3, "h", "w"])], infos, inits
    )
    _save(graph, path)


def write_landmark106(path: Path) -> None:
    """2d106det stand-in: input "data" [N,3,192,192], output "fc1" [N,212] in [-1, 1]
    of the crop. The crop's side is 1.5 x the box's long side, so box units times 2/3
    (x scaled by the box's aspect, 4:5 for FACE_BOX) land on the face."""
    from onnx import helper

    x1, y1, x2, y2 = FACE_BOX
    aspect = (x2 - x1) / (y2 - y1)
    pts = face_points_106() * np.array([aspect, 1.0]) / 1.5
    nodes, inits, infos = _constant_outputs("data", [("fc1", pts.reshape(1, -1), ["N", 212])])
    graph = helper.make_graph(
        nodes, "landmark106_stand_in", [_node_io("data", ["N", 3, 192, 192])], infos, inits
    )
    _save(graph, path)


def landmark203_in_crop() -> np.ndarray:
    """Where the 203 stand-in puts the face, in [0, 1] of its 224 crop: upstream's crop
    from the 106 points (scale 1.5, vy -0.1) spans about 1.5 x the face's extent."""
    x1, y1, x2, y2 = FACE_BOX
    aspect = (x2 - x1) / (y2 - y1)
    pts = face_points_203() * np.array([aspect, 1.0])
    lo, hi = pts.min(0), pts.max(0)
    side = float((hi - lo).max()) * 1.5
    centre = (lo + hi) / 2 + np.array([0.0, -0.1 * side])
    return 0.5 + (pts - centre) / side


LANDMARK203_OUTPUTS = ("output_0", "output_1", "landmarks")


def write_landmark203(path: Path) -> None:
    """landmark203 stand-in: input "input" [1,3,224,224]; three outputs like LivePortrait's
    model, the third (the one upstream reads) [1, 406] in [0, 1] of the crop."""
    from onnx import helper

    pts = landmark203_in_crop().reshape(1, -1)
    outs = [
        (LANDMARK203_OUTPUTS[0], np.zeros((1, 2)), [1, 2]),
        (LANDMARK203_OUTPUTS[1], np.zeros((1, 2)), [1, 2]),
        (LANDMARK203_OUTPUTS[2], pts, [1, 406]),
    ]
    nodes, inits, infos = _constant_outputs("input", outs)
    graph = helper.make_graph(
        nodes, "landmark203_stand_in", [_node_io("input", [1, 3, 224, 224])], infos, inits
    )
    _save(graph, path)


def hubert_matrix(seed: int = 0) -> np.ndarray:
    """The HuBERT stand-in's map: output frame j = input[320 j : 320 j + 320] @ W."""
    return (np.random.default_rng(seed).standard_normal((320, 1024)) * 0.05).astype(np.float32)


def write_hubert(path: Path, seed: int = 0) -> None:
    """HuBERT stand-in: "input_values" [1, 6480] -> "encoding_out" [20, 1024], a fixed
    linear map of each 320-sample hop (deterministic, and it depends on the audio)."""
    from onnx import helper, numpy_helper

    inits = [
        numpy_helper.from_array(np.array([0], np.int64), "starts"),
        numpy_helper.from_array(np.array([HUBERT_FRAMES * 320], np.int64), "ends"),
        numpy_helper.from_array(np.array([1], np.int64), "axes"),
        numpy_helper.from_array(np.array([HUBERT_FRAMES, 320], np.int64), "frames_shape"),
        numpy_helper.from_array(hubert_matrix(seed), "W"),
    ]
    nodes = [
        helper.make_node("Slice", ["input_values", "starts", "ends", "axes"], ["head"]),
        helper.make_node("Reshape", ["head", "frames_shape"], ["frames"]),
        helper.make_node("MatMul", ["frames", "W"], ["encoding_out"]),
    ]
    graph = helper.make_graph(
        nodes,
        "hubert_stand_in",
        [_node_io("input_values", [1, 6480])],
        [_node_io("encoding_out", [HUBERT_FRAMES, 1024])],
        inits,
    )
    _save(graph, path)


# ---------------------------------------------------------------------------------------
# The layout


def write_random_checkpoints(
    root: str | Path,
    *,
    reduced: bool = True,
    seed: int = 0,
    networks: tuple[ck.NetworkSpec, ...] | None = None,
) -> Path:
    """Write upstream's checkpoint layout under `root` with random weights; returns root.
    `networks` defaults to checkpoints.NETWORKS (farm's classes); pass
    stand_in_networks() for a complete layout before farm's classes exist."""
    root = Path(root)
    for i, spec in enumerate(networks or ck.NETWORKS):
        sd = _random_state_dict(spec, reduced, seed + i)
        if sd is None:
            continue
        path = root / spec.file
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(_container(spec, sd), path)
    config = root / ck.CONFIG
    config.parent.mkdir(parents=True, exist_ok=True)
    with config.open("wb") as f:
        pickle.dump(upstream_config(), f, protocol=4)
    write_detector(root / ck.FILES["detector"])
    write_landmark106(root / ck.FILES["landmark106"])
    write_landmark203(root / ck.FILES["landmark203"])
    write_hubert(root / ck.FILES["hubert"], seed)
    return root
