"""A tiny synthetic GaussianTalker model and training data directory, written at test time.

`write_synthetic_model(root)` writes upstream's layout (models/gaussiantalker/layout.py)
under root/model and root/data, small enough to write in well under a second:

- model/cfg_args: `str(argparse.Namespace(...))` as upstream's train.py writes it, with
  upstream's ModelParams/ModelHiddenParams keys and `source_path` = the data directory;
- model/point_cloud/iteration_<iteration>/point_cloud.ply: a binary little-endian 3DGS
  PLY (x y z nx ny nz f_dc_0..2 f_rest_0..44 opacity scale_0..2 rot_0..3, float32) of a
  blob of Gaussians around the world origin, which every camera sees about 1 unit in
  front of it (radius ~0.08, so ~1/6 of the image);
- .../deformation.pth: `deformation_state_dict` if given; else the random state dict of
  farm's own `models.gaussiantalker.deformation.Deformation` when that module exists
  (its Config with the audio width and the small grids of REDUCED); else a placeholder holding only
  upstream's key `deformation_net.audio_net.encoder_conv.0.weight` [32, audio_dim, 3]
  (enough for the layout, not for rendering; a warning says so);
- data/transforms_{train,val}.json (focal_len, cx, cy, frames with img_id, aud_id,
  transform_matrix), track_params.pt (euler, trans, focal, vertices: small angles and
  trans z = -1), au.csv (OpenFace columns, " AU45_r" = AU45_VALUES cycled), bc.jpg, and
  torso_imgs/<id>.png (RGBA, the lower quarter opaque).

Frames 0..frames-1: the last max(1, frames // 3) are the val split (all of them both
train and val when frames == 1).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import importlib
import importlib.util
import inspect
import json
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

AU45_VALUES = (0.0, 0.4, 2.7, 1.0, 0.0, 4.1)  # cycled over the frames
FOCAL_SCALE = 2.0  # focal_len = FOCAL_SCALE * width: fovx ~ 28 degrees
BLOB_RADIUS = 0.08
DEFORMATION_MODULE = "models.gaussiantalker.deformation"
AUDIO_KEY = "deformation_net.audio_net.encoder_conv.0.weight"  # upstream's key
# farm's deformation Config, reduced: small tri-plane grids, upstream's other sizes
REDUCED = {"resolution": (16, 16, 16)}


def write_synthetic_model(
    root: str | Path,
    *,
    gaussians: int = 300,
    frames: int = 3,
    audio_dim: int = 44,
    size: tuple[int, int] = (64, 64),
    seed: int = 0,
    iteration: int = 10000,
    deformation_state_dict: dict[str, torch.Tensor] | None = None,
) -> tuple[Path, Path]:
    """(model_dir, data_dir) of a synthetic GaussianTalker model under root."""
    root = Path(root)
    model_dir, data_dir = root / "model", root / "data"
    it_dir = model_dir / "point_cloud" / f"iteration_{iteration}"
    it_dir.mkdir(parents=True, exist_ok=True)
    data_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    w, h = size

    (model_dir / "cfg_args").write_text(str(argparse.Namespace(**cfg_args(model_dir, data_dir))))
    write_ply(it_dir / "point_cloud.ply", random_gaussians(gaussians, rng))
    if deformation_state_dict is None:
        deformation_state_dict = farm_deformation_state_dict(audio_dim, seed)
    if deformation_state_dict is None:
        warnings.warn(
            "deformation.pth is a placeholder with only the audio encoder's first weight "
            f"({DEFORMATION_MODULE} not available): enough for the layout, not to render",
            stacklevel=2,
        )
        g = torch.Generator().manual_seed(seed)
        deformation_state_dict = {AUDIO_KEY: torch.randn(32, audio_dim, 3, generator=g) * 0.1}
    torch.save(deformation_state_dict, it_dir / "deformation.pth")

    # training data
    euler = rng.uniform(-0.05, 0.05, size=(frames, 3))
    trans = np.stack(
        [rng.uniform(-0.02, 0.02, frames), rng.uniform(-0.02, 0.02, frames), -np.ones(frames)],
        axis=1,
    )
    focal = FOCAL_SCALE * w
    torch.save(
        {
            "id": torch.zeros(1, 100),
            "exp": torch.zeros(frames, 79),
            "euler": torch.tensor(euler, dtype=torch.float32),
            "trans": torch.tensor(trans, dtype=torch.float32),
            "focal": torch.tensor([focal], dtype=torch.float32),
            "vertices": torch.tensor(rng.normal(0, 0.05, (frames, 16, 3)), dtype=torch.float32),
        },
        data_dir / "track_params.pt",
    )
    n_val = max(1, frames // 3)
    ids = list(range(frames))
    splits = {"train": ids[: frames - n_val] or ids, "val": ids[frames - n_val :]}
    for split, split_ids in splits.items():
        doc = {
            "focal_len": float(focal),
            "cx": w / 2.0,
            "cy": h / 2.0,
            "frames": [
                {"img_id": i, "aud_id": i, "transform_matrix": np.eye(4).tolist()}
                for i in split_ids
            ],
        }
        (data_dir / f"transforms_{split}.json").write_text(json.dumps(doc, indent=2))
    write_au_csv(data_dir / "au.csv", [AU45_VALUES[i % len(AU45_VALUES)] for i in ids])

    bg = np.zeros((h, w, 3), np.uint8)
    bg[..., :] = (40, 90, 160)
    Image.fromarray(bg).save(data_dir / "bc.jpg", quality=95)
    torso_dir = data_dir / "torso_imgs"
    torso_dir.mkdir(exist_ok=True)
    for i in ids:
        torso = np.zeros((h, w, 4), np.uint8)
        torso[..., :3] = (200, 60 + 10 * (i % 10), 60)
        torso[h - h // 4 :, :, 3] = 255
        Image.fromarray(torso, "RGBA").save(torso_dir / f"{i}.png")
    return model_dir, data_dir


def cfg_args(model_dir: Path, data_dir: Path) -> dict[str, Any]:
    """What upstream's train.py writes (a subset: the keys rendering reads, and a few
    others of each type), sizes matching the deformation weights the fixture writes."""
    return {
        "sh_degree": 3,
        "source_path": str(data_dir.resolve()),
        "model_path": str(model_dir.resolve()),
        "images": "images",
        "resolution": -1,
        "white_background": True,
        "data_device": "cuda",
        "eval": True,
        "render_process": False,
        "add_points": False,
        "extension": ".png",
        "llffhold": 8,
        "net_width": 64,
        "defor_depth": 1,
        "posebase_pe": 10,
        "bounds": 1.6,
        "kplanes_config": {
            "grid_dimensions": 2,
            "input_coordinate_dim": 4,
            "output_coordinate_dim": 32,
            "resolution": [16, 16, 16, 25],  # REDUCED's grids
        },
        "multires": [1, 2],
        "no_do": True,
        "d_model": 64,
        "n_head": 2,
        "drop_prob": 0.2,
        "ffn_hidden": 128,
        "n_layer": 1,
        "only_infer": False,
        "train_tri_plane": True,
        "pos_emb": True,
        "iterations": 10000,
        "custom_sampler": None,
        "train_l": ["xyz", "deformation", "grid", "f_dc", "f_rest", "opacity"],
        "save_iterations": [1000, 3000, 10000],
        "start_checkpoint": None,
        "configs": "arguments/64_dim_1_transformer.py",
        "expname": "synthetic",
    }


def random_gaussians(n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Raw 3DGS parameters of a blob around the origin, keyed by PLY property."""
    xyz = rng.normal(0.0, BLOB_RADIUS / 2, (n, 3))
    q = rng.normal(0.0, 1.0, (n, 4))
    q[:, 0] += 2.0
    props = {"x": xyz[:, 0], "y": xyz[:, 1], "z": xyz[:, 2]}
    props.update({k: np.zeros(n) for k in ("nx", "ny", "nz")})
    dc = rng.normal(0.0, 0.6, (n, 3))
    props.update({f"f_dc_{i}": dc[:, i] for i in range(3)})
    rest = rng.normal(0.0, 0.05, (n, 45))
    props.update({f"f_rest_{i}": rest[:, i] for i in range(45)})
    props["opacity"] = rng.normal(1.5, 0.5, n)
    scale = np.log(rng.uniform(0.005, 0.02, (n, 3)))
    props.update({f"scale_{i}": scale[:, i] for i in range(3)})
    props.update({f"rot_{i}": q[:, i] for i in range(4)})
    return props


def write_ply(path: Path, props: dict[str, np.ndarray], types: dict[str, str] | None = None):
    """A binary little-endian PLY with one vertex element of the given properties, in
    order; every property float unless `types` says otherwise (PLY type names)."""
    types = types or {}
    kinds = {"float": "<f4", "double": "<f8", "uchar": "u1", "int": "<i4"}
    n = len(next(iter(props.values())))
    dtype = np.dtype([(k, kinds[types.get(k, "float")]) for k in props])
    data = np.empty(n, dtype=dtype)
    for k, v in props.items():
        data[k] = v
    header = ["ply", "format binary_little_endian 1.0", f"element vertex {n}"]
    header += [f"property {types.get(k, 'float')} {k}" for k in props]
    header.append("end_header")
    with path.open("wb") as f:
        f.write(("\n".join(header) + "\n").encode("ascii"))
        f.write(data.tobytes())


def write_au_csv(path: Path, au45: list[float]) -> None:
    """OpenFace's CSV: header names after the first have a leading space."""
    names = ["frame", "face_id", "timestamp", "confidence", "success"]
    names += ["AU01_r", "AU02_r", "AU45_r", "AU01_c", "AU45_c"]
    with path.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow([names[0]] + [" " + n for n in names[1:]])
        for i, v in enumerate(au45):
            out.writerow([i + 1, 0, f"{i * 0.04:.2f}", 0.98, 1, 0.1, 0.2, v, 0, int(v > 1)])


def farm_deformation_state_dict(audio_dim: int, seed: int) -> dict[str, torch.Tensor] | None:
    """A random state dict of farm's Deformation (reduced when its Config offers it), or
    None when the module is not there or cannot be built (with a warning why)."""
    try:
        if importlib.util.find_spec(DEFORMATION_MODULE) is None:
            return None
    except ModuleNotFoundError:
        return None
    try:
        mod = importlib.import_module(DEFORMATION_MODULE)
        cls = mod.Deformation
        config = getattr(mod, "Config", None)
        torch.manual_seed(seed)
        if config is None:
            net = cls(audio_in=audio_dim)
        else:
            names = _parameters(config)
            kwargs: dict[str, Any] = {
                k: audio_dim for k in ("audio_in", "audio_dim", "audio_in_dim") if k in names
            }
            kwargs.update({k: v for k, v in REDUCED.items() if k in names})
            reduce = getattr(config, "reduced", None)
            cfg = reduce(**kwargs) if callable(reduce) else config(**kwargs)
            net = cls(cfg)
        sd = {k: v.detach().clone() for k, v in net.state_dict().items()}
    except Exception as e:  # the module is someone else's work in progress
        warnings.warn(f"could not build {DEFORMATION_MODULE}.Deformation: {e!r}", stacklevel=2)
        return None
    widths = [v.shape[1] for k, v in sd.items() if k.endswith("audio_net.encoder_conv.0.weight")]
    if widths != [audio_dim]:
        warnings.warn(
            f"{DEFORMATION_MODULE}.Deformation has audio widths {widths}, asked {audio_dim}",
            stacklevel=2,
        )
        return None
    return sd


def _parameters(config: Any) -> set[str]:
    if dataclasses.is_dataclass(config):
        return {f.name for f in dataclasses.fields(config)}
    try:
        return set(inspect.signature(config).parameters)
    except (TypeError, ValueError):
        return set()


def camera_space(model: Any, frame: int, points: np.ndarray) -> np.ndarray:
    """points [N, 3] in the view space of model.frames[frame] (x_view = R^T x + T)."""
    cam = model.frames[frame].camera
    return points @ cam.R.astype(np.float64) + cam.T.astype(np.float64)


def project(model: Any, frame: int, points: np.ndarray) -> np.ndarray:
    """Pixel coordinates [N, 2] of points seen by model.frames[frame] (pinhole, centred)."""
    v = camera_space(model, frame, points)
    w, h = model.size
    cam = model.frames[frame].camera
    fx = w / (2 * math.tan(cam.fovx / 2))
    fy = h / (2 * math.tan(cam.fovy / 2))
    return np.stack([fx * v[:, 0] / v[:, 2] + w / 2, fy * v[:, 1] / v[:, 2] + h / 2], axis=1)


# Tiny transformers extractors, saved as a user's local directory would hold them.
SMALL_EXTRACTOR = dict(
    conv_dim=(16,) * 7,
    num_hidden_layers=1,
    intermediate_size=32,
    num_conv_pos_embeddings=8,
)


def _save_extractor(model: Any, path: Path) -> Path:
    import transformers

    model.save_pretrained(path)
    transformers.Wav2Vec2FeatureExtractor(
        do_normalize=True, return_attention_mask=True
    ).save_pretrained(path)
    return path


def write_tiny_wav2vec2(path: str | Path, vocab: int = 44, seed: int = 0) -> Path:
    """A randomly initialised wav2vec2 CTC model with `vocab` logits (44: the esperanto
    XLSR model's width), small everywhere else."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.Wav2Vec2Config(
        vocab_size=vocab,
        hidden_size=32,
        num_attention_heads=2,
        num_conv_pos_embedding_groups=4,
        feat_extract_norm="layer",
        do_stable_layer_norm=True,
        **SMALL_EXTRACTOR,
    )
    return _save_extractor(transformers.Wav2Vec2ForCTC(config), Path(path))


def write_tiny_hubert(path: str | Path, seed: int = 1) -> Path:
    """A randomly initialised HuBERT with hidden size 1024 (the feature width), one
    small layer."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.HubertConfig(
        hidden_size=1024, num_attention_heads=4, num_conv_pos_embedding_groups=16, **SMALL_EXTRACTOR
    )
    return _save_extractor(transformers.HubertModel(config), Path(path))
