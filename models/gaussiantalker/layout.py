"""A trained GaussianTalker model and its training data directory, read and validated.

GaussianTalker (KU-CVLAB/GaussianTalker, non-commercial research licence) leaves a model
directory and needs the training data directory it was trained on (BACKENDS.md):

    <model_dir>/cfg_args                                 repr of argparse.Namespace(...)
    <model_dir>/point_cloud/iteration_N/point_cloud.ply  3DGS Gaussians, SH degree 3
    <model_dir>/point_cloud/iteration_N/deformation.pth  state dict of `deform_network`
    <model_dir>/point_cloud/iteration_N/deformation_{table,accum}.pth   optional, unused
    <data_dir>/transforms_train.json, transforms_val.json
    <data_dir>/track_params.pt      {"euler": [F, 3], "trans": [F, 3], "focal", ...}
    <data_dir>/au.csv               OpenFace output, column " AU45_r" (leading space)
    <data_dir>/bc.jpg               background
    <data_dir>/torso_imgs/<img_id>.png   RGBA torso, one per frame

Upstream facts this module follows (scene/__init__.py, scene/talking_dataset_readers.py,
scene/gaussian_model.py, utils/system_utils.py at KU-CVLAB/GaussianTalker HEAD):

- The iteration loaded is the numeric maximum under point_cloud/ (upstream's
  searchForMaxIteration also parses `coarse_iteration_N`; farm considers `iteration_N`
  only, the fine stage that upstream's render reads). The deformation weights are
  `deformation.pth` *in that iteration directory*; `deformation_table.pth` and
  `deformation_accum.pth` are loaded by upstream when present but never used to render.
- The data directory is cfg_args' `source_path` unless given.
- Intrinsics: transforms json `focal_len`, `cx`, `cy`; upstream sets fl_x = fl_y =
  focal_len, w = 2 cx, h = 2 cy, fovx = 2 atan(w / 2 fl_x), fovy = 2 atan(h / 2 fl_y).
  farm also accepts `fl_x`/`fl_y` and `w`/`h`. The image size is (2 cx, 2 cy).
- Cameras come from track_params.pt, not from the json's `transform_matrix` (unused by
  upstream's reader): for frame k = img_id, R0 = euler2rot(euler[k]) (rot_x @ rot_y @
  rot_z, below), R = -(diag(-1, 1, 1) @ R0)^T, T = -trans[k] with T[0] negated. Camera
  then uses world-to-view [[R^T, T], [0, 0, 0, 1]] (getWorld2View2 with translate 0: the
  `trans` argument is commented out upstream), i.e. p_view = diag(1, -1, -1)(R0 p + t).
- AU45 of frame k is row k of au.csv; the eye input is clip(AU45, 0, 2) / 2.
- The torso image of frame k is torso_imgs/<k>.png, read as 4 channels (BGRA).
- Frames: transforms_train.json's then transforms_val.json's, in file order (upstream's
  order when `eval` is off). Upstream's custom-audio render uses the val frames.
- PLY: x, y, z, f_dc_0..2, f_rest_0..44, opacity, scale_0..2, rot_0..3 (normals are
  written but not read). f_rest_k is channel k // 15, coefficient k % 15: upstream
  reshapes [N, 45] to [N, 3, 15] and transposes to [N, 15, 3].

Upstream's reader also needs files farm does not (aud_ds.npy, ori_imgs/*.jpg and *.lms,
parsing/*.png): they are not checked here.

Every failure is one line naming the file. `problems()` lists them all; `open_model()`
raises a PermanentError with the first.
"""

from __future__ import annotations

import ast
import csv
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from farm.errors import PermanentError

CFG_ARGS = "cfg_args"
POINT_CLOUD = "point_cloud"
PLY = "point_cloud.ply"
DEFORMATION = "deformation.pth"
DEFORMATION_TABLE = "deformation_table.pth"
DEFORMATION_ACCUM = "deformation_accum.pth"
TRANSFORMS = {"train": "transforms_train.json", "val": "transforms_val.json"}
TRACK = "track_params.pt"
AU_CSV = "au.csv"
AU45 = " AU45_r"  # OpenFace's header, leading space included (upstream reads it so)
BACKGROUND = "bc.jpg"
TORSO_DIR = "torso_imgs"
AUDIO_KEY = "audio_net.encoder_conv.0.weight"  # upstream: "deformation_net." + this
SH_DEGREE = 3
MAX_LISTED = 20  # missing torso images listed one by one before a summary line

_ITERATION = re.compile(r"iteration_(\d+)")


# ---------------------------------------------------------------------------------------
# cfg_args


def read_cfg_args(path: str | Path) -> dict[str, Any]:
    """The keyword arguments of a `Namespace(key=value, ...)` repr, literal values only.

    Parsed with `ast`; nothing in the file is evaluated. A call, a name, an attribute or
    anything else that is not a literal is refused with a PermanentError naming the file.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PermanentError(f"{path}: missing") from None
    except (OSError, UnicodeDecodeError) as e:
        raise PermanentError(f"{path}: unreadable ({type(e).__name__})") from None
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except (SyntaxError, ValueError):
        raise PermanentError(f"{path}: not a Namespace(...) repr (syntax error)") from None
    call = tree.body
    if not (
        isinstance(call, ast.Call)
        and (
            (isinstance(call.func, ast.Name) and call.func.id == "Namespace")
            or (isinstance(call.func, ast.Attribute) and call.func.attr == "Namespace")
        )
    ):
        raise PermanentError(f"{path}: not a Namespace(...) repr")
    if call.args:
        raise PermanentError(f"{path}: Namespace(...) with positional arguments")
    out: dict[str, Any] = {}
    for kw in call.keywords:
        try:
            value = ast.literal_eval(kw.value)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            what = kw.arg if kw.arg is not None else "**"
            raise PermanentError(
                f"{path}: the value of {what} is not a literal ({type(kw.value).__name__})"
            ) from None
        if kw.arg is None:
            # argparse writes names that are not identifiers as **{'name': value}
            if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
                raise PermanentError(f"{path}: ** argument that is not a dict of names")
            out.update(value)
        else:
            out[kw.arg] = value
    return out


# ---------------------------------------------------------------------------------------
# PLY


@dataclass(frozen=True)
class Gaussians:
    """The raw per-Gaussian parameters of a 3DGS PLY, float32, as stored (no activation).

    f_rest is in property order f_rest_0..44: channel-major, [N, 3, 15] after a reshape.
    opacity is the logit, scale the log scale, rotation the unnormalised quaternion
    (w, x, y, z), as upstream stores them.
    """

    xyz: np.ndarray  # [N, 3]
    f_dc: np.ndarray  # [N, 3]
    f_rest: np.ndarray  # [N, 3 * ((d + 1) ** 2 - 1)], 45 for degree 3
    opacity: np.ndarray  # [N]
    scale: np.ndarray  # [N, 3]
    rotation: np.ndarray  # [N, 4]

    def __len__(self) -> int:
        return int(self.xyz.shape[0])

    @property
    def sh_degree(self) -> int:
        return int(round(math.sqrt(self.f_rest.shape[1] // 3 + 1))) - 1

    def sh(self) -> np.ndarray:
        """All SH coefficients [N, (d + 1)^2, 3], DC first, as upstream's get_features."""
        n = len(self)
        rest = self.f_rest.reshape(n, 3, -1).transpose(0, 2, 1)
        return np.concatenate([self.f_dc[:, None, :], rest], axis=1)


_PLY_TYPES = {
    "char": "i1",
    "int8": "i1",
    "uchar": "u1",
    "uint8": "u1",
    "short": "<i2",
    "int16": "<i2",
    "ushort": "<u2",
    "uint16": "<u2",
    "int": "<i4",
    "int32": "<i4",
    "uint": "<u4",
    "uint32": "<u4",
    "float": "<f4",
    "float32": "<f4",
    "double": "<f8",
    "float64": "<f8",
}
_HEADER_LIMIT = 1 << 16


def ply_properties(sh_degree: int = SH_DEGREE) -> list[str]:
    """The vertex properties upstream's load_ply reads, in 3DGS file order."""
    n_rest = 3 * (sh_degree + 1) ** 2 - 3
    return (
        ["x", "y", "z"]
        + [f"f_dc_{i}" for i in range(3)]
        + [f"f_rest_{i}" for i in range(n_rest)]
        + ["opacity"]
        + [f"scale_{i}" for i in range(3)]
        + [f"rot_{i}" for i in range(4)]
    )


def _ply_header(path: Path, head: bytes) -> tuple[int, int, list[tuple[str, str]]]:
    """(data offset, vertex count, [(property, numpy dtype)]) of a binary LE PLY."""
    end = head.find(b"end_header")
    if not head.startswith(b"ply") or end < 0:
        raise PermanentError(f"{path}: not a PLY file (no 'ply' ... 'end_header' header)")
    nl = head.find(b"\n", end)
    if nl < 0:
        raise PermanentError(f"{path}: truncated in its header")
    try:
        lines = head[:end].decode("ascii").splitlines()
    except UnicodeDecodeError:
        raise PermanentError(f"{path}: PLY header is not ASCII") from None
    fmt = None
    elements: list[tuple[str, int, list[tuple[str, str]]]] = []
    for line in lines[1:]:
        words = line.split()
        if not words or words[0] in ("comment", "obj_info"):
            continue
        if words[0] == "format":
            fmt = " ".join(words[1:])
        elif words[0] == "element" and len(words) == 3 and words[2].isdigit():
            elements.append((words[1], int(words[2]), []))
        elif words[0] == "property" and elements:
            if len(words) >= 2 and words[1] == "list":
                elements[-1][2].append((words[-1], "list"))
            elif len(words) == 3 and words[1] in _PLY_TYPES:
                elements[-1][2].append((words[2], words[1]))
            else:
                raise PermanentError(f"{path}: bad PLY header line {line!r}")
        else:
            raise PermanentError(f"{path}: bad PLY header line {line!r}")
    if fmt != "binary_little_endian 1.0":
        raise PermanentError(f"{path}: PLY format {fmt!r}, expected binary_little_endian 1.0")
    if not elements or elements[0][0] != "vertex":
        # 3DGS writes a single vertex element; data of an element before it would have
        # to be skipped, which farm does not do.
        raise PermanentError(f"{path}: the first PLY element is not 'vertex'")
    _, count, props = elements[0]
    for name, kind in props:
        if kind == "list":
            raise PermanentError(f"{path}: vertex property {name} is a list")
    return nl + 1, count, props


def read_ply(path: str | Path, sh_degree: int = SH_DEGREE) -> Gaussians:
    """The Gaussians of a 3DGS binary little-endian PLY, parsed with numpy."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(_HEADER_LIMIT)
    except FileNotFoundError:
        raise PermanentError(f"{path}: missing") from None
    except OSError as e:
        raise PermanentError(f"{path}: unreadable ({type(e).__name__})") from None
    offset, count, props = _ply_header(path, head)
    types = dict(props)
    if len(types) != len(props):
        raise PermanentError(f"{path}: a vertex property is declared twice")
    wanted = ply_properties(sh_degree)
    missing = [p for p in wanted if p not in types]
    if missing:
        shown = ", ".join(missing[:5]) + (
            f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        )
        raise PermanentError(
            f"{path}: missing vertex propert{'ies' if len(missing) > 1 else 'y'} {shown}"
        )
    extra_rest = sorted(p for p in types if p.startswith("f_rest_") and p not in wanted)
    if extra_rest:
        n = sum(p.startswith("f_rest_") for p in types)
        raise PermanentError(
            f"{path}: {n} f_rest_* properties, expected {len(wanted) - 11} for SH degree "
            f"{sh_degree}"
        )
    for p in wanted:
        if _PLY_TYPES[types[p]] != "<f4":
            raise PermanentError(f"{path}: vertex property {p} is {types[p]}, expected float")
    if count == 0:
        raise PermanentError(f"{path}: no Gaussians (element vertex 0)")
    dtype = np.dtype([(name, _PLY_TYPES[kind]) for name, kind in props])
    need = count * dtype.itemsize
    if size - offset < need:
        raise PermanentError(
            f"{path}: truncated: the header announces {count} vertices ({need} bytes), "
            f"the file holds {size - offset} bytes of data"
        )
    data = np.fromfile(path, dtype=dtype, count=count, offset=offset)

    def cols(names: list[str]) -> np.ndarray:
        return np.stack([data[n] for n in names], axis=1).astype(np.float32, copy=False)

    g = Gaussians(
        xyz=cols(["x", "y", "z"]),
        f_dc=cols([f"f_dc_{i}" for i in range(3)]),
        f_rest=cols([p for p in wanted if p.startswith("f_rest_")]),
        opacity=np.ascontiguousarray(data["opacity"], dtype=np.float32),
        scale=cols([f"scale_{i}" for i in range(3)]),
        rotation=cols([f"rot_{i}" for i in range(4)]),
    )
    for name in ("xyz", "f_dc", "f_rest", "opacity", "scale", "rotation"):
        if not np.isfinite(getattr(g, name)).all():
            raise PermanentError(f"{path}: non-finite values in {name}")
    return g


# ---------------------------------------------------------------------------------------
# Cameras


def euler_to_rotation(euler: np.ndarray) -> np.ndarray:
    """Upstream's euler2rot for one frame (the face tracker's convention), float64:
    rot_x(theta) @ rot_y(phi) @ rot_z(psi), where rot_x and rot_y are the textbook
    rotations and rot_z is the textbook z rotation by -psi. euler = (theta, phi, psi),
    radians."""
    a, b, c = (float(v) for v in euler)
    ca, sa, cb, sb, cc, sc = (
        math.cos(a),
        math.sin(a),
        math.cos(b),
        math.sin(b),
        math.cos(c),
        math.sin(c),
    )
    rx = np.array([[1.0, 0.0, 0.0], [0.0, ca, -sa], [0.0, sa, ca]])
    ry = np.array([[cb, 0.0, sb], [0.0, 1.0, 0.0], [-sb, 0.0, cb]])
    rz = np.array([[cc, sc, 0.0], [-sc, cc, 0.0], [0.0, 0.0, 1.0]])
    return rx @ ry @ rz


@dataclass(frozen=True)
class Camera:
    """One source frame's camera, in upstream's CameraInfo convention (float32).

    world-to-view = [[R^T, T], [0, 0, 0, 1]]: x_view = R^T x + T, +z forward (OpenCV,
    what the 3DGS rasterizer expects). fovx/fovy in radians.
    """

    R: np.ndarray  # [3, 3]
    T: np.ndarray  # [3]
    fovx: float
    fovy: float

    def world_to_view(self) -> np.ndarray:
        m = np.eye(4, dtype=np.float32)
        m[:3, :3] = self.R.T
        m[:3, 3] = self.T
        return m


def camera_from_track(
    euler: np.ndarray, trans: np.ndarray, focal: tuple[float, float], size: tuple[int, int]
) -> Camera:
    """Upstream's readCamerasFromTracksTransforms for one frame."""
    r0 = euler_to_rotation(euler)
    r = -(np.diag([-1.0, 1.0, 1.0]) @ r0).T
    t = -np.asarray(trans, dtype=np.float64).reshape(3)
    t[0] = -t[0]
    (fx, fy), (w, h) = focal, size
    return Camera(
        R=r.astype(np.float32),
        T=t.astype(np.float32),
        fovx=2 * math.atan(w / (2 * fx)),
        fovy=2 * math.atan(h / (2 * fy)),
    )


# ---------------------------------------------------------------------------------------
# The model


@dataclass(frozen=True)
class SourceFrame:
    """One tracked frame of the training video: what a rendered frame borrows from it."""

    img_id: int
    aud_id: int | None
    split: str  # "train" | "val"
    camera: Camera
    torso_path: Path
    au45: float  # raw OpenFace AU45_r (blink intensity, 0..5)

    @property
    def eye(self) -> float:
        """Upstream's eye input: clip(AU45, 0, 2) / 2."""
        return float(np.clip(self.au45, 0.0, 2.0) / 2.0)


@dataclass(frozen=True)
class Model:
    model_dir: Path
    data_dir: Path
    cfg: dict[str, Any]
    iteration: int
    ply_path: Path
    gaussians: Gaussians
    deformation_path: Path
    audio_key: str  # the state dict key the audio width was read from
    audio_dim: int  # C of audio_net.encoder_conv.0.weight [32, C, 3]
    size: tuple[int, int]  # (W, H)
    focal: tuple[float, float]  # (fx, fy) in pixels
    background_path: Path
    frames: tuple[SourceFrame, ...]  # train frames, then val frames
    track_frames: int  # rows of track_params (F)
    deformation_table_path: Path | None = None
    deformation_accum_path: Path | None = None

    @property
    def train_frames(self) -> tuple[SourceFrame, ...]:
        return tuple(f for f in self.frames if f.split == "train")

    @property
    def val_frames(self) -> tuple[SourceFrame, ...]:
        return tuple(f for f in self.frames if f.split == "val")


def open_model(model_dir: str | Path, data_dir: str | Path | None = None) -> Model:
    """The whole layout, validated; a PermanentError with the first problem otherwise."""
    model, found = _read(Path(model_dir), None if data_dir is None else Path(data_dir))
    if found:
        more = f" (and {len(found) - 1} more problems)" if len(found) > 1 else ""
        raise PermanentError(found[0] + more)
    assert model is not None
    return model


def problems(model_dir: str | Path, data_dir: str | Path | None = None) -> list[str]:
    """Every problem of the layout, one line each naming the file; [] when it opens."""
    return _read(Path(model_dir), None if data_dir is None else Path(data_dir))[1]


class _Problems(list):
    def attempt(self, fn, *args):
        """fn(*args), or None with its PermanentError recorded."""
        try:
            return fn(*args)
        except PermanentError as e:
            self.append(str(e))
            return None


def _read(model_dir: Path, data_dir: Path | None) -> tuple[Model | None, list[str]]:
    found = _Problems()
    if not model_dir.is_dir():
        return None, [f"{model_dir}: missing (model directory)"]
    cfg = found.attempt(read_cfg_args, model_dir / CFG_ARGS)
    sh_degree = SH_DEGREE
    if cfg is not None:
        sh_degree = cfg.get("sh_degree", SH_DEGREE)
        if not isinstance(sh_degree, int) or isinstance(sh_degree, bool) or sh_degree < 0:
            found.append(f"{model_dir / CFG_ARGS}: sh_degree {sh_degree!r} is not an integer")
            sh_degree = SH_DEGREE

    # point_cloud/iteration_N/
    gaussians = audio = None
    iteration = None
    it_dir = model_dir / POINT_CLOUD
    found_it = found.attempt(_latest_iteration, it_dir)
    if found_it is not None:
        iteration, it_dir = found_it
        gaussians = found.attempt(read_ply, it_dir / PLY, sh_degree)
        audio = found.attempt(_audio_width, it_dir / DEFORMATION)

    # the data directory
    if data_dir is None and cfg is not None:
        data_dir = found.attempt(_source_path, model_dir, cfg)
    data = _read_data(data_dir, found) if data_dir is not None else None

    if found or cfg is None or gaussians is None or audio is None or data is None:
        if not found:  # cannot happen; keeps the contract "None comes with a reason"
            found.append(f"{model_dir}: could not be read")
        return None, list(found)
    table, accum = it_dir / DEFORMATION_TABLE, it_dir / DEFORMATION_ACCUM
    model = Model(
        model_dir=model_dir,
        data_dir=data_dir,
        cfg=cfg,
        iteration=iteration,
        ply_path=it_dir / PLY,
        gaussians=gaussians,
        deformation_path=it_dir / DEFORMATION,
        audio_key=audio[0],
        audio_dim=audio[1],
        deformation_table_path=table if table.is_file() else None,
        deformation_accum_path=accum if accum.is_file() else None,
        **data,
    )
    return model, []


def _latest_iteration(point_cloud: Path) -> tuple[int, Path]:
    if not point_cloud.is_dir():
        raise PermanentError(f"{point_cloud}: missing")
    its = [
        (int(m.group(1)), p)
        for p in point_cloud.iterdir()
        if p.is_dir() and (m := _ITERATION.fullmatch(p.name))
    ]
    if not its:
        raise PermanentError(f"{point_cloud}: no iteration_N directory")
    return max(its, key=lambda t: t[0])


def _audio_width(path: Path) -> tuple[str, int]:
    """(key, C) of the audio encoder's first convolution [32, C, 3]."""
    sd = _load_torch(path, "the deformation weights")
    if isinstance(sd, dict) and not any(isinstance(v, torch.Tensor) for v in sd.values()):
        for key in ("state_dict", "model_state_dict", "model", "deformation"):
            if isinstance(sd.get(key), dict):
                sd = sd[key]
                break
    if not isinstance(sd, dict):
        raise PermanentError(f"{path}: expected a state dict, found a {type(sd).__name__}")
    keys = sorted(
        (k for k in sd if isinstance(k, str) and (k == AUDIO_KEY or k.endswith("." + AUDIO_KEY))),
        key=len,
    )
    if not keys:
        raise PermanentError(f"{path}: no {AUDIO_KEY} (not GaussianTalker's deformation weights?)")
    w = sd[keys[0]]
    if not isinstance(w, torch.Tensor) or w.dim() != 3 or w.shape[0] != 32 or w.shape[2] != 3:
        shape = list(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__
        raise PermanentError(f"{path}: {keys[0]} is {shape}, expected [32, C, 3]")
    return keys[0], int(w.shape[1])


def _load_torch(path: Path, what: str) -> Any:
    if not path.is_file():
        raise PermanentError(f"{path}: missing ({what})")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds for a bad or unsafe file
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise PermanentError(
            f"{path}: unreadable by torch.load(weights_only=True): {first}"
        ) from None


def _source_path(model_dir: Path, cfg: dict[str, Any]) -> Path:
    """cfg_args' source_path. A relative one is taken relative to the directory training
    ran in, found from model_path when that is relative too (`-m output/x`); else cwd."""
    sp = cfg.get("source_path")
    if not isinstance(sp, str) or not sp:
        raise PermanentError(f"{model_dir / CFG_ARGS}: no source_path; pass the data directory")
    src = Path(sp)
    if src.is_absolute():
        return src
    mp = cfg.get("model_path")
    base = Path.cwd()
    if isinstance(mp, str) and mp and not Path(mp).is_absolute():
        parts = [p for p in Path(mp).parts if p != "."]
        here = model_dir.resolve()
        if parts and here.parts[-len(parts) :] == tuple(parts):
            base = here.parents[len(parts) - 1]
    return base / src


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PermanentError(f"{path}: missing") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        line = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise PermanentError(f"{path}: not valid JSON ({line})") from None


def _number(path: Path, d: dict, *keys: str) -> float | None:
    for k in keys:
        v = d.get(k)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v <= 0:
            raise PermanentError(f"{path}: {k} {v!r} is not a positive number")
        return float(v)
    return None


def _read_transforms(path: Path) -> dict[str, Any]:
    """Intrinsics and frames of one transforms json."""
    doc = _read_json(path)
    if not isinstance(doc, dict):
        raise PermanentError(f"{path}: expected a JSON object")
    fx = _number(path, doc, "focal_len", "fl_x")
    fy = _number(path, doc, "focal_len", "fl_y") or fx
    if fx is None:
        raise PermanentError(f"{path}: no focal_len (or fl_x)")
    w = _number(path, doc, "w")
    h = _number(path, doc, "h")
    cx, cy = _number(path, doc, "cx"), _number(path, doc, "cy")
    w = w if w is not None else (2 * cx if cx is not None else None)
    h = h if h is not None else (2 * cy if cy is not None else None)
    if w is None or h is None:
        raise PermanentError(f"{path}: no cx/cy (or w/h): the image size is 2 cx by 2 cy")
    if abs(w - round(w)) > 1e-6 or abs(h - round(h)) > 1e-6:
        raise PermanentError(f"{path}: image size 2cx x 2cy = {w} x {h} is not whole pixels")
    frames = doc.get("frames")
    if not isinstance(frames, list) or not frames:
        raise PermanentError(f"{path}: no frames")
    out = []
    for i, fr in enumerate(frames):
        img = fr.get("img_id") if isinstance(fr, dict) else None
        if isinstance(img, bool) or not isinstance(img, int) or img < 0:
            raise PermanentError(f"{path}: frames[{i}] has no integer img_id")
        aud = fr.get("aud_id")
        if aud is not None and (isinstance(aud, bool) or not isinstance(aud, int)):
            raise PermanentError(f"{path}: frames[{i}].aud_id {aud!r} is not an integer")
        out.append((img, aud))
    return {"focal": (fx, fy), "size": (int(round(w)), int(round(h))), "frames": out}


def _read_track(path: Path) -> tuple[np.ndarray, np.ndarray]:
    obj = _load_torch(path, "the face tracking")
    if not isinstance(obj, dict):
        raise PermanentError(f"{path}: expected a dict, found a {type(obj).__name__}")
    arrays = []
    for key in ("euler", "trans"):
        t = obj.get(key)
        if not isinstance(t, torch.Tensor):
            raise PermanentError(f"{path}: no {key} tensor")
        if t.dim() != 2 or t.shape[1] != 3:
            raise PermanentError(f"{path}: {key} is {list(t.shape)}, expected [F, 3]")
        a = t.detach().to(torch.float64).numpy()
        if not np.isfinite(a).all():
            raise PermanentError(f"{path}: non-finite values in {key}")
        arrays.append(a)
    if arrays[0].shape[0] != arrays[1].shape[0]:
        raise PermanentError(
            f"{path}: euler has {arrays[0].shape[0]} frames, trans {arrays[1].shape[0]}"
        )
    return arrays[0], arrays[1]


def _read_au45(path: Path) -> np.ndarray:
    try:
        with path.open(newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
    except FileNotFoundError:
        raise PermanentError(f"{path}: missing") from None
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise PermanentError(f"{path}: unreadable CSV ({type(e).__name__})") from None
    if not rows:
        raise PermanentError(f"{path}: empty")
    header = rows[0]
    cols = [i for i, name in enumerate(header) if name == AU45]
    cols = cols or [i for i, name in enumerate(header) if name.strip() == AU45.strip()]
    if not cols:
        raise PermanentError(f"{path}: no column {AU45!r} (OpenFace's blink intensity)")
    col = cols[0]
    values = []
    for n, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        try:
            values.append(float(row[col]))
        except (IndexError, ValueError):
            raise PermanentError(f"{path}: line {n} has no number in {AU45!r}") from None
    return np.asarray(values, dtype=np.float64)


def _image_size(path: Path, what: str) -> tuple[tuple[int, int], str, bool]:
    if not path.is_file():
        raise PermanentError(f"{path}: missing ({what})")
    try:
        with Image.open(path) as im:
            return im.size, im.mode, "transparency" in im.info
    except Exception as e:  # PIL raises several kinds for a bad image
        raise PermanentError(f"{path}: not a readable image ({type(e).__name__})") from None


def _read_data(data_dir: Path, found: _Problems) -> dict[str, Any] | None:
    if not data_dir.is_dir():
        found.append(f"{data_dir}: missing (training data directory, cfg_args source_path)")
        return None
    start = len(found)
    splits = {s: found.attempt(_read_transforms, data_dir / n) for s, n in TRANSFORMS.items()}
    track = found.attempt(_read_track, data_dir / TRACK)
    au45 = found.attempt(_read_au45, data_dir / AU_CSV)
    background = data_dir / BACKGROUND
    found.attempt(_image_size, background, "background")

    train, val = splits["train"], splits["val"]
    if train is not None and val is not None and train["size"] != val["size"]:
        found.append(
            f"{data_dir / TRANSFORMS['val']}: image size {val['size']} differs from "
            f"{TRANSFORMS['train']}'s {train['size']}"
        )
    ids = sorted({i for s in splits.values() if s for i, _ in s["frames"]})
    if ids and track is not None and ids[-1] >= track[0].shape[0]:
        found.append(
            f"{data_dir / TRACK}: {track[0].shape[0]} tracked frames, the transforms use "
            f"img_id up to {ids[-1]}"
        )
    if ids and au45 is not None and ids[-1] >= au45.shape[0]:
        found.append(
            f"{data_dir / AU_CSV}: {au45.shape[0]} rows, the transforms use img_id up to {ids[-1]}"
        )
    torso = data_dir / TORSO_DIR
    missing = [i for i in ids if not (torso / f"{i}.png").is_file()]
    for i in missing[:MAX_LISTED]:
        found.append(f"{torso / f'{i}.png'}: missing (torso image of frame {i})")
    if len(missing) > MAX_LISTED:
        found.append(f"{torso}: {len(missing) - MAX_LISTED} more torso images missing")
    absent = set(missing)
    present = [i for i in ids if i not in absent]
    if present and train is not None:
        first = torso / f"{present[0]}.png"
        info = found.attempt(_image_size, first, "torso image")
        if info is not None:
            size, mode, transparency = info
            if size != train["size"]:
                found.append(f"{first}: {size[0]}x{size[1]}, the transforms say {train['size']}")
            if mode not in ("RGBA", "LA") and not transparency:
                found.append(f"{first}: mode {mode}, the torso images need an alpha channel")
    if len(found) > start or track is None or au45 is None or train is None or val is None:
        return None

    frames = []
    for split, spec in (("train", train), ("val", val)):
        for img, aud in spec["frames"]:
            frames.append(
                SourceFrame(
                    img_id=img,
                    aud_id=aud,
                    split=split,
                    camera=camera_from_track(
                        track[0][img], track[1][img], spec["focal"], spec["size"]
                    ),
                    torso_path=torso / f"{img}.png",
                    au45=float(au45[img]),
                )
            )
    return {
        "size": train["size"],
        "focal": train["focal"],
        "background_path": background,
        "frames": tuple(frames),
        "track_frames": int(track[0].shape[0]),
    }
