"""Ditto's official checkpoint layout, read safely (BACKENDS.md, "Checkpoint layout").

A user who downloads upstream's checkpoints (huggingface digital-avatar/ditto-talkinghead)
has, under one root:

    ditto_cfg/v0.4_hubert_cfg_pytorch.pkl          pickled dict: base_cfg, audio2motion_cfg,
                                                   default_kwargs (plain data and numpy arrays)
    ditto_pytorch/models/*.pth                     the six networks' state dicts
    ditto_pytorch/aux_models/*.onnx                face detector, 106/203 landmarks, HuBERT
    ditto_pytorch/aux_models/face_landmarker.task  MediaPipe; farm does not need it (below)

farm reads these files unchanged. The `.pkl` is read with a restricted unpickler that
builds plain containers and numpy arrays only and refuses every other global; the `.pth`
files with `torch.load(weights_only=True)`. Every failure is a one-line PermanentError
that names the file (and, for a tensor of the wrong shape, the key).

`face_landmarker.task` is MediaPipe's FaceLandmarker bundle. Upstream runs it once per
avatar, on the 512 crop, for 478 landmarks from which it derives the LMDM's eye
conditions (eye openness [2] and eye-ball direction [6], core/utils/eye_info.py). It is
optional here: farm derives those values without MediaPipe.
"""

from __future__ import annotations

import collections
import hashlib
import importlib
import logging
import os
import pickle
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from farm.errors import PermanentError

log = logging.getLogger("farm.ditto")

CONFIG = "ditto_cfg/v0.4_hubert_cfg_pytorch.pkl"
MODELS = "ditto_pytorch/models"
AUX = "ditto_pytorch/aux_models"

# Every file farm needs, by role, relative to the checkpoint root.
FILES: dict[str, str] = {
    "config": CONFIG,
    "appearance": f"{MODELS}/appearance_extractor.pth",
    "motion_extractor": f"{MODELS}/motion_extractor.pth",
    "warp": f"{MODELS}/warp_network.pth",
    "decoder": f"{MODELS}/decoder.pth",
    "stitch": f"{MODELS}/stitch_network.pth",
    "lmdm": f"{MODELS}/lmdm_v0.4_hubert.pth",
    "detector": f"{AUX}/det_10g.onnx",
    "landmark106": f"{AUX}/2d106det.onnx",
    "landmark203": f"{AUX}/landmark203.onnx",
    "hubert": f"{AUX}/hubert_streaming_fix_kv.onnx",
}
# Part of upstream's download, not read by farm (see the module docstring).
OPTIONAL_FILES: dict[str, str] = {"face_landmarker": f"{AUX}/face_landmarker.task"}

Container = Literal["plain", "lmdm", "stitch"]


@dataclass(frozen=True)
class NetworkSpec:
    """One network: farm's class (models.ditto.<module>.<cls>), its file role in FILES and
    how upstream wraps its state dict."""

    name: str
    module: str
    cls: str
    container: Container

    @property
    def file(self) -> str:
        return FILES[self.name]


NETWORKS: tuple[NetworkSpec, ...] = (
    NetworkSpec("appearance", "models.ditto.appearance", "AppearanceExtractor", "plain"),
    NetworkSpec("motion_extractor", "models.ditto.motion_extractor", "MotionExtractor", "plain"),
    NetworkSpec("warp", "models.ditto.warp", "WarpingNetwork", "plain"),
    NetworkSpec("decoder", "models.ditto.decoder", "SPADEDecoder", "plain"),
    NetworkSpec("stitch", "models.ditto.stitch", "StitchingNetwork", "stitch"),
    NetworkSpec("lmdm", "models.ditto.lmdm", "LMDM", "lmdm"),
)

# What upstream's parse_cfg indexes without a default (core/atomic_components/cfg.py).
CONFIG_SECTIONS = ("base_cfg", "audio2motion_cfg", "default_kwargs")
BASE_CFG_KEYS = (
    "insightface_det_cfg",
    "landmark106_cfg",
    "landmark203_cfg",
    "landmark478_cfg",
    "appearance_extractor_cfg",
    "motion_extractor_cfg",
    "stitch_network_cfg",
    "warp_network_cfg",
    "decoder_cfg",
    "hubert_cfg",
)
AUDIO2MOTION_INT_KEYS = ("seq_frames", "motion_feat_dim", "audio_feat_dim")
AUDIO2MOTION_FLAG_KEYS = ("use_emo", "use_sc", "use_eye_open", "use_eye_ball")


def _line(text: object, limit: int = 240) -> str:
    """The first line of a message, bounded: errors here are one line each."""
    first = str(text).strip().splitlines()[0] if str(text).strip() else ""
    return first if len(first) <= limit else first[: limit - 3] + "..."


# ---------------------------------------------------------------------------------------
# The config: a restricted unpickler


class _Refused(Exception):
    pass


def _ndarray_reconstruct(cls: object, shape: object, dtype: object) -> np.ndarray:
    # numpy's ndarray.__reduce__: (_reconstruct, (ndarray, (0,), b"b"), state); the BUILD
    # opcode then calls ndarray.__setstate__ with the real shape, dtype and bytes.
    if cls is not np.ndarray:
        raise _Refused(f"_reconstruct of {cls!r}")
    return np.ndarray(shape, dtype=_safe_dtype(dtype))  # type: ignore[arg-type]


def _safe_dtype(obj: object, align: bool = False, copy: bool = False) -> np.dtype:
    if isinstance(obj, np.dtype):
        dtype = obj
    else:
        if not isinstance(obj, str | bytes):
            raise _Refused(f"numpy.dtype({type(obj).__name__})")
        dtype = np.dtype(obj.decode("latin1") if isinstance(obj, bytes) else obj, align, copy)
    if dtype.hasobject:
        raise _Refused("numpy.dtype with Python objects")
    return dtype


def _numpy_scalar(dtype: object, data: object = None) -> object:
    dt = _safe_dtype(dtype)
    if isinstance(data, str):  # protocol-2 pickles from Python 2
        data = data.encode("latin1")
    if not isinstance(data, bytes | bytearray):
        raise _Refused("numpy scalar without bytes")
    return np.frombuffer(bytes(data), dtype=dt, count=1)[0]


def _numpy_frombuffer(buf: object, dtype: object, shape: object, order: object) -> np.ndarray:
    # Protocol 5: numpy.core.numeric._frombuffer(buffer, dtype, shape, order).
    dt = _safe_dtype(dtype)
    if not isinstance(buf, bytes | bytearray | memoryview | pickle.PickleBuffer):
        raise _Refused("numpy buffer of an unexpected type")
    arr = np.frombuffer(bytes(memoryview(buf)), dtype=dt)
    return arr.reshape(shape, order="F" if order == "F" else "C").copy()  # type: ignore[arg-type]


def _codecs_encode(text: object, encoding: object = "utf-8") -> bytes:
    # Protocols 0-2 write bytes as _codecs.encode(str, "latin1").
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1", "utf-8", "utf8"):
        raise _Refused("_codecs.encode of a non-string")
    return text.encode(str(encoding))


_NUMPY = ("numpy.core.multiarray", "numpy._core.multiarray")
_NUMERIC = ("numpy.core.numeric", "numpy._core.numeric")
_ALLOWED: dict[tuple[str, str], Any] = {
    **{(m, "_reconstruct"): _ndarray_reconstruct for m in _NUMPY},
    **{(m, "scalar"): _numpy_scalar for m in _NUMPY},
    **{(m, "_frombuffer"): _numpy_frombuffer for m in _NUMERIC},
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _safe_dtype,
    ("_codecs", "encode"): _codecs_encode,
    ("collections", "OrderedDict"): collections.OrderedDict,
    **{(b, "set"): set for b in ("builtins", "__builtin__")},
    **{(b, "frozenset"): frozenset for b in ("builtins", "__builtin__")},
}


class _ConfigUnpickler(pickle.Unpickler):
    """Builds dicts, lists, tuples, sets, str, bytes, numbers, bool, None and numpy
    arrays/scalars of plain dtypes; any other global is refused before it is called."""

    def find_class(self, module: str, name: str) -> Any:
        found = _ALLOWED.get((module, name))
        if found is None:
            raise _Refused(f"global {module}.{name}")
        return found

    def persistent_load(self, pid: Any) -> Any:
        raise _Refused("persistent id")


def read_config(path: str | os.PathLike[str]) -> dict:
    """Upstream's `.pkl` config as a dict, through the restricted unpickler (never
    pickle.load). PermanentError, one line naming the file, for a missing or corrupt
    file, a refused global or a top level that is not a dict."""
    path = Path(path)
    if not path.is_file():
        raise PermanentError(f"{path}: missing")
    try:
        with path.open("rb") as f:
            cfg = _ConfigUnpickler(f).load()
    except _Refused as e:
        msg = f"{path}: refused {_line(e)} (the config may hold plain data only)"
        raise PermanentError(msg) from None
    except Exception as e:  # truncated or not a pickle: EOFError, UnpicklingError, ...
        msg = f"{path}: not a readable config ({type(e).__name__}: {_line(e)})"
        raise PermanentError(msg) from e
    if not isinstance(cfg, dict):
        raise PermanentError(f"{path}: the config is a {type(cfg).__name__}, not a dict")
    return cfg


def config_problems(cfg: Mapping, path: str | os.PathLike[str] = CONFIG) -> list[str]:
    """What is missing from a config that upstream's parse_cfg would need, one line each."""
    out: list[str] = []
    for section in CONFIG_SECTIONS:
        if not isinstance(cfg.get(section), Mapping):
            out.append(f"{path}: no '{section}' dict")
    base = cfg.get("base_cfg")
    if isinstance(base, Mapping):
        out += [
            f"{path}: base_cfg has no '{k}' dict"
            for k in BASE_CFG_KEYS
            if not isinstance(base.get(k), Mapping)
        ]
    a2m = cfg.get("audio2motion_cfg")
    if isinstance(a2m, Mapping):
        for k in AUDIO2MOTION_INT_KEYS:
            v = a2m.get(k)
            if isinstance(v, bool) or not isinstance(v, int | np.integer) or v <= 0:
                out.append(f"{path}: audio2motion_cfg['{k}'] is {v!r}, not a positive integer")
        for k in AUDIO2MOTION_FLAG_KEYS:
            if not isinstance(a2m.get(k), bool | np.bool_):
                out.append(f"{path}: audio2motion_cfg['{k}'] is not a bool")
    return out


# ---------------------------------------------------------------------------------------
# State dicts


def load_state_dict(path: str | os.PathLike[str], container: Container = "plain") -> dict:
    """The tensors of one `.pth` file, unwrapped from upstream's container: "lmdm" reads
    ["model_state_dict"], "stitch" reads ["retarget_shoulder"] and strips the DDP prefix
    `module.`, "plain" is the state dict itself. torch.load(weights_only=True) only.
    PermanentError, one line naming the file: missing, truncated/corrupt, wrong
    container."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise PermanentError(f"{path}: missing")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # RuntimeError, UnpicklingError, EOFError, zipfile errors, ...
        raise PermanentError(
            f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {_line(e)})"
        ) from e

    def keys_of(o: object) -> str:
        if not isinstance(o, Mapping):
            return f"a {type(o).__name__}"
        names = [str(k) for k in list(o)[:4]]
        return "keys " + ", ".join(names) + (", ..." if len(o) > 4 else "")

    wrapper = {"lmdm": "model_state_dict", "stitch": "retarget_shoulder"}.get(container)
    if wrapper is not None:
        if not isinstance(obj, Mapping) or wrapper not in obj:
            raise PermanentError(
                f"{path}: expected the state dict under '{wrapper}', found {keys_of(obj)}"
            )
        obj = obj[wrapper]
    if not isinstance(obj, Mapping) or not obj:
        raise PermanentError(f"{path}: expected a state dict of tensors, found {keys_of(obj)}")
    sd: dict[str, Any] = collections.OrderedDict()
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            what = f"{type(value).__name__}"
            raise PermanentError(
                f"{path}: expected a state dict of tensors, '{key}' is a {what}"
                + (f" (is the container right? {keys_of(obj)})" if container == "plain" else "")
            )
        if container == "stitch" and key.startswith("module."):
            key = key[len("module.") :]
        sd[key] = value
    return sd


def network_class(spec: NetworkSpec) -> Any:
    """farm's class for a network, imported lazily."""
    return getattr(importlib.import_module(spec.module), spec.cls)


def build_network(spec: NetworkSpec, path: str | os.PathLike[str]) -> Any:
    """The network built by its class's from_state_dict from the file, on the CPU.
    A mismatch becomes one line naming the file (from_state_dict names the key)."""
    sd = load_state_dict(path, spec.container)
    cls = network_class(spec)
    try:
        return cls.from_state_dict(sd)
    except PermanentError as e:
        raise PermanentError(f"{path}: {_line(e)}") from e
    except Exception as e:  # a class that let torch's own error through
        msg = f"{path}: does not fit {spec.cls} ({type(e).__name__}: {_line(e)})"
        raise PermanentError(msg) from e


# ---------------------------------------------------------------------------------------
# Hashes and the opened layout

_HASHES: dict[tuple[str, int, int], str] = {}
_LOGGED: set[tuple[str, tuple[tuple[str, str], ...]]] = set()


def sha256(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, streamed; cached per (path, size, mtime) in this process."""
    path = Path(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key in _HASHES:
        return _HASHES[key]
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    _HASHES[key] = digest = h.hexdigest()
    return digest


@dataclass(frozen=True)
class Checkpoints:
    """An opened checkpoint root: the config dict and each file's sha256 (by FILES role)."""

    root: Path
    config: dict = field(repr=False)
    sha256: dict[str, str] = field(repr=False)

    def path(self, role: str) -> Path:
        return self.root / FILES[role]


def open_checkpoints(root: str | os.PathLike[str]) -> Checkpoints:
    """Checks that every file in FILES exists, reads and validates the config, hashes the
    files (logged once per process and root on logger "farm.ditto"). Loads no network."""
    root = Path(root)
    missing = [rel for rel in FILES.values() if not (root / rel).is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise PermanentError(f"{root / missing[0]}: missing{more}")
    cfg = read_config(root / CONFIG)
    problems = config_problems(cfg, root / CONFIG)
    if problems:
        raise PermanentError(problems[0])
    hashes = {role: sha256(root / rel) for role, rel in FILES.items()}
    mark = (str(root.resolve()), tuple(sorted(hashes.items())))
    if mark not in _LOGGED:
        _LOGGED.add(mark)
        log.info(
            "ditto checkpoints %s: %s",
            root,
            ", ".join(f"{FILES[r]}={h[:16]}" for r, h in hashes.items()),
        )
    return Checkpoints(root=root, config=cfg, sha256=hashes)


def load_networks(ckpt: Checkpoints, device: Any = "cpu") -> dict[str, Any]:
    """The six networks by name (NETWORKS), each built by farm's from_state_dict, in
    eval mode, on `device`."""
    nets = {}
    for spec in NETWORKS:
        net = build_network(spec, ckpt.path(spec.name))
        nets[spec.name] = net.eval().to(device)
    return nets


def check(root: str | os.PathLike[str]) -> list[str]:
    """Every problem with a checkpoint root, one line each, without rendering: missing
    files, a bad config, each state dict against farm's network (on the CPU), each ONNX
    model against the inputs/outputs farm feeds it. Empty when all is well."""
    from models.ditto import aux

    root = Path(root)
    problems: list[str] = []
    for rel in FILES.values():
        if not (root / rel).is_file():
            problems.append(f"{root / rel}: missing")
    if (root / CONFIG).is_file():
        try:
            problems += config_problems(read_config(root / CONFIG), root / CONFIG)
        except PermanentError as e:
            problems.append(str(e))
    for spec in NETWORKS:
        path = root / spec.file
        if not path.is_file():
            continue
        try:
            build_network(spec, path)
        except PermanentError as e:
            problems.append(str(e))
        except ImportError as e:
            problems.append(f"{path}: farm's {spec.module}.{spec.cls} is not available ({e})")
    for role, cls in aux.MODELS.items():
        path = root / FILES[role]
        if path.is_file():
            problems += cls.problems(path)
    return problems


def main(argv: list[str] | None = None) -> int:
    """`python -m models.ditto.checkpoints ROOT`: check() as lines, exit 1 on a problem
    (what `farm models check ditto` runs, in a child, so the CLI never imports torch)."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m models.ditto.checkpoints CHECKPOINT_ROOT", file=sys.stderr)
        return 2
    problems = check(args[0])
    for line in problems:
        print(line)
    if not problems:
        print(f"{args[0]}: every Ditto checkpoint file is present and loads")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
