"""A trained GaussianTalker model as one archive: what farm keeps of it in the store.

`farm avatar add NAME --backend gaussiantalker --model DIR [--data DIR]` packs, in a
child process (the CLI never imports torch), exactly the files rendering reads, after
the whole layout was checked (models/gaussiantalker/layout.py): the PLY and the
deformation weights of the latest iteration, cfg_args, and from the training data the
transforms, track parameters, AU45 values, background and torso images. The archive
goes into the store like any avatar source, so a GPU worker on another host renders
from it. Inside, the model is under `model/` and the data under `data/`:

    model/cfg_args
    model/point_cloud/iteration_N/{point_cloud.ply, deformation.pth}
    data/{transforms_train.json, transforms_val.json, track_params.pt, au.csv, bc.jpg}
    data/torso_imgs/{id}.png

`python -m models.gaussiantalker.archive MODEL_DIR DATA_DIR|- OUT.tar` writes it, or
prints every problem of the layout, one line each, and exits 1.
"""

from __future__ import annotations

import hashlib
import io
import sys
import tarfile
import tempfile
from pathlib import Path

from farm.errors import PermanentError
from models.gaussiantalker.layout import Model, open_model, problems

DATA_FILES = ("transforms_train.json", "transforms_val.json", "track_params.pt", "au.csv")


def members(model: Model) -> list[tuple[Path, str]]:
    """(file on disk, name in the archive) of every file rendering reads."""
    iteration = f"model/point_cloud/iteration_{model.iteration}"
    files = [
        (model.model_dir / "cfg_args", "model/cfg_args"),
        (model.ply_path, f"{iteration}/point_cloud.ply"),
        (model.deformation_path, f"{iteration}/deformation.pth"),
        (model.background_path, "data/bc.jpg"),
    ]
    files += [(model.data_dir / name, f"data/{name}") for name in DATA_FILES]
    torso = {f.torso_path for f in model.frames}
    files += [(path, f"data/torso_imgs/{path.name}") for path in sorted(torso)]
    return files


def pack(model_dir: Path, data_dir: Path | None, out: Path) -> Model:
    """Check the layout and write the archive (uncompressed tar: PNGs and weights do
    not shrink). PermanentError with every problem, one per line, otherwise."""
    found = problems(model_dir, data_dir)
    if found:
        raise PermanentError("\n".join(found))
    model = open_model(model_dir, data_dir)
    with tarfile.open(out, "w") as tar:
        for path, name in members(model):
            tar.add(path, arcname=name, recursive=False)
    return model


def unpack(data: bytes) -> Model:
    """An archive's model, opened from a folder of this process's temp directory named
    by the archive's hash (unpacked once per archive and machine)."""
    digest = hashlib.sha256(data).hexdigest()[:24]
    root = Path(tempfile.gettempdir()) / f"farm-gaussiantalker-{digest}"
    if not (root / ".complete").exists():
        staging = Path(tempfile.mkdtemp(prefix="farm-gaussiantalker-", dir=root.parent))
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            tar.extractall(staging, filter="data")  # no links, no paths outside
        (staging / ".complete").touch()
        try:
            staging.rename(root)
        except OSError:  # another process unpacked the same archive first
            pass
    return open_model(root / "model", root / "data")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 3:
        print("usage: python -m models.gaussiantalker.archive MODEL DATA|- OUT", file=sys.stderr)
        return 2
    model_dir, data_dir, out = Path(args[0]), args[1], Path(args[2])
    try:
        pack(model_dir, None if data_dir == "-" else Path(data_dir), out)
    except PermanentError as exc:
        print(str(exc))
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
