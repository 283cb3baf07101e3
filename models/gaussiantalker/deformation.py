"""GaussianTalker's deformation network in farm: per output frame, the offsets that move
a trained model's canonical 3D Gaussians with the audio, the blink and the camera.

It computes what upstream's fine stage computes (KU-CVLAB/GaussianTalker,
``scene/deformation.py``, config ``64_dim_1_transformer``) and loads its
``deformation.pth`` unchanged: `Deformation` mirrors upstream's ``deform_network`` (keys
``pos_poc``, ``rotation_scaling_poc``, ``opacity_poc``, ``deformation_net.*``).

Per Gaussian: a feature from the tri-plane grid at its canonical position (d_model wide)
attends, through one cross-attention block, to four condition tokens (audio, eye,
camera, a learnt null token); five heads turn the result into additive offsets for the
position, log-scale, quaternion, opacity logit and SH coefficients. The offsets are added
to the PLY's raw values; render then activates them (`Deformed.activated`).

Upstream caches, in inference mode (``only_infer``), the positional encodings and the
grid features of the first batch it sees, then slices them for later batches. Farm keeps
no state: `Deformation.forward` is a pure function of its inputs. The grid features
depend on the Gaussians only, so a caller may compute them once
(`Deformation.canonical_features`) and pass them in.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from farm.errors import PermanentError
from models.weights import count_indexed, load_strict, tensor_shape

from .deform_parts import (
    AUDIO_CODE,
    AUDIO_FRAMES,
    AUDIO_ROWS,
    CAMERA_WIDTH,
    EYE_CODE,
    SH_COEFFS,
    AudioAttention,
    AudioEncoder,
    BiasFreeMLP,
    CanonicalTriPlane,
    ConditionTransformer,
    eye_encoding,
    head,
)

NAME = "GaussianTalker deformation"
NET = "deformation_net."


@dataclass(frozen=True)
class Config:
    """The network's sizes; the defaults are upstream's ``64_dim_1_transformer`` config
    over its argument defaults, with upstream's audio width (29, DeepSpeech).

    ``audio_in`` is the audio feature width C (29 DeepSpeech, 44 wav2vec2 esperanto
    logits, 1024 HuBERT); ``grid_channels`` x ``len(multires)`` must equal ``d_model``
    (the grid feature is the transformer's query). ``resolution`` is the level-1 plane
    size per axis, each level multiplies it by its ``multires`` entry. The ``*_pe``
    widths only size upstream's positional-encoding buffers, unused by the fine stage.
    ``bounds`` is the initial box, replaced by the one stored in the weights.
    """

    audio_in: int = 29
    grid_channels: int = 32
    resolution: tuple[int, int, int] = (64, 64, 64)
    multires: tuple[int, ...] = (1, 2)
    d_model: int = 64
    n_head: int = 2
    ffn_hidden: int = 128
    n_layer: int = 1
    net_width: int = 128
    defor_depth: int = 2
    posebase_pe: int = 10
    scale_rotation_pe: int = 2
    opacity_pe: int = 2
    bounds: float = 1.6

    def __post_init__(self) -> None:
        if self.grid_channels * len(self.multires) != self.d_model:
            raise ValueError(
                f"grid_channels x levels ({self.grid_channels} x {len(self.multires)}) "
                f"must equal d_model ({self.d_model})"
            )
        if self.d_model % self.n_head:
            raise ValueError(f"d_model {self.d_model} is not a multiple of n_head {self.n_head}")


class Deformed(NamedTuple):
    """One batch of frames' Gaussians, B frames of N Gaussians.

    From `Deformation.forward`, raw (before activation, as upstream's deformation
    returns them): xyz [B, N, 3], scales [B, N, 3] (log), rotations [B, N, 4]
    (unnormalised quaternion, w first), opacity [B, N, 1] (logit), shs [B, N, 16, 3].
    attention [B, layers, N, 4]: each Gaussian's attention to the (audio, eye, camera,
    null) tokens, averaged over heads (upstream's attention visualisations).
    """

    xyz: torch.Tensor
    scales: torch.Tensor
    rotations: torch.Tensor
    opacity: torch.Tensor
    shs: torch.Tensor
    attention: torch.Tensor

    def activated(self) -> Deformed:
        """What upstream's render hands the rasterizer: scales exp'd, rotations
        normalised (L2, eps 1e-12), opacity through a sigmoid; xyz and shs as they are."""
        return self._replace(
            scales=torch.exp(self.scales),
            rotations=F.normalize(self.rotations, dim=-1),
            opacity=torch.sigmoid(self.opacity),
        )


class DeformationNet(nn.Module):
    """Upstream's ``Deformation`` (``deformation_net.*``): grid, condition encoders,
    transformer and offset heads. ``aud_ch_att_net``, ``eye_att_net`` and ``enc_x_mlp``
    are unused by upstream's fine stage (kept so the weights load), as are the tri-plane's
    MLPs (see `CanonicalTriPlane`)."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        c = config
        d = c.d_model
        self.config = c
        self.tri_plane = CanonicalTriPlane(
            c.bounds, c.grid_channels, c.resolution, c.multires, c.defor_depth, c.net_width, d
        )
        self.transformer = ConditionTransformer(d, c.n_head, c.ffn_hidden, c.n_layer)
        self.pos_deform = head(d, c.net_width, 3)
        self.scales_deform = head(d, c.net_width, 3)
        self.rotations_deform = head(d, c.net_width, 4)
        self.opacity_deform = head(d, c.net_width, 1)
        self.shs_deform = head(d, c.net_width, SH_COEFFS * 3)
        self.audio_net = AudioEncoder(c.audio_in)
        self.audio_att_net = AudioAttention()
        self.audio_mlp = BiasFreeMLP(AUDIO_CODE, d, 64, 2)
        self.aud_ch_att_net = BiasFreeMLP(AUDIO_CODE, AUDIO_CODE, 64, 2)
        self.eye_att_net = BiasFreeMLP(AUDIO_CODE, 1, 16, 2)
        self.eye_mlp = BiasFreeMLP(EYE_CODE, d, 64, 2)
        self.cam_mlp = BiasFreeMLP(CAMERA_WIDTH, d, 64, 2)
        self.null_vector = nn.Parameter(torch.zeros(1, 1, d))
        self.enc_x_mlp = BiasFreeMLP(AUDIO_CODE, d, 64, 2)

    def conditions(
        self,
        audio: torch.Tensor,
        eye: torch.Tensor,
        camera: torch.Tensor,
        eye_code: Callable[[torch.Tensor], torch.Tensor] = eye_encoding,
    ) -> torch.Tensor:
        """The condition tokens [B, 4, d_model]: audio, eye, camera, null (see
        `Deformation.forward` for the inputs). `eye_code` computes the eye's encoding
        (the ONNX export passes one without float64, models/gaussiantalker/export.py)."""
        b = audio.shape[0]
        frames = audio.permute(0, 1, 3, 2).reshape(b * AUDIO_FRAMES, -1, audio.shape[2])
        codes = self.audio_net(frames).view(b, AUDIO_FRAMES, AUDIO_CODE)
        enc_audio = self.audio_att_net(codes).unsqueeze(1)  # [B, 1, 32]
        enc_eye = eye_code(eye).unsqueeze(1)  # [B, 1, 32]
        enc_camera = self.cam_mlp(camera).unsqueeze(1)  # [B, 1, d]
        if self.config.d_model != AUDIO_CODE:  # upstream's condition: widen to d_model
            enc_audio = self.audio_mlp(enc_audio)
            enc_eye = self.eye_mlp(enc_eye)
        null = self.null_vector.expand(b, 1, -1)
        return torch.cat([enc_audio, enc_eye, enc_camera, null], dim=1)


class Deformation(nn.Module):
    """Farm's module of upstream's ``deform_network`` (see the module docstring)."""

    Config = Config

    def __init__(self, config: Config | None = None) -> None:
        super().__init__()
        self.config = config = config or Config()
        for name, n in (
            ("pos_poc", config.posebase_pe),
            ("rotation_scaling_poc", config.scale_rotation_pe),
            ("opacity_poc", config.opacity_pe),
        ):
            self.register_buffer(name, 2.0 ** torch.arange(n, dtype=torch.float32))
        self.deformation_net = DeformationNet(config)

    def canonical_features(self, xyz: torch.Tensor) -> torch.Tensor:
        """xyz [N, 3] (the PLY's positions) -> the grid features [N, d_model] that
        `forward` queries with; the same for every frame of one model."""
        return self.deformation_net.tri_plane.grid(xyz)

    def forward(
        self,
        xyz: torch.Tensor,
        scales: torch.Tensor,
        rotations: torch.Tensor,
        opacity: torch.Tensor,
        shs: torch.Tensor,
        audio: torch.Tensor,
        eye: torch.Tensor,
        camera: torch.Tensor,
        features: torch.Tensor | None = None,
    ) -> Deformed:
        """The Gaussians of B frames, deformed (raw; `Deformed.activated` for render).

        The Gaussians, shared by the frames, are the PLY's raw values: xyz [N, 3],
        scales [N, 3] (log), rotations [N, 4] (unnormalised), opacity [N, 1] (logit),
        shs [N, 16, 3] (DC first, then the 15 rest coefficients, RGB last).

        Per frame b of B:
        - audio [B, 8, 16, C]: the feature windows of frames i-4 .. i+3 (`audio_window`),
          each 16 rows of C features as in upstream's ``aud_*.npy`` ([frames, 16, C]);
          zeros outside the clip.
        - eye [B, 1]: the blink, clip(AU45_r, 0, 2) / 2.
        - camera [B, 12]: the camera's R (3x3, row-major) then T, as upstream's Camera
          holds them (R = -(flip_x @ euler2rot(euler))^T, T = trans * (1, -1, -1)).
        - features [N, d_model]: `canonical_features(xyz)`, computed here if None.

        Each output is the input plus its head's offset (upstream's mask is 1 in this
        config and rotations are added, not composed); every attribute is deformed.
        """
        self.check_audio(audio)
        net = self.deformation_net
        b, n = audio.shape[0], xyz.shape[0]
        if features is None:
            features = self.canonical_features(xyz)
        hidden, attention = net.transformer(
            features.unsqueeze(0).expand(b, n, -1), net.conditions(audio, eye, camera)
        )
        return Deformed(
            xyz=xyz + net.pos_deform(hidden),
            scales=scales + net.scales_deform(hidden),
            rotations=rotations + net.rotations_deform(hidden),
            opacity=opacity + net.opacity_deform(hidden),
            shs=shs + net.shs_deform(hidden).view(b, n, SH_COEFFS, 3),
            attention=attention,
        )

    def check_audio(self, audio: torch.Tensor) -> None:
        """ValueError unless audio is [B, 8, W, C] with 1 <= W <= 16; PermanentError
        (one line) when C is not the width the model was trained on."""
        # W rows per window: 16 for wav2vec2 logits, 2 for HuBERT (upstream slices [:16]).
        if (
            audio.ndim != 4
            or audio.shape[1] != AUDIO_FRAMES
            or not 1 <= audio.shape[2] <= AUDIO_ROWS
        ):
            raise ValueError(f"audio must be [B, 8, W <= 16, C], got {list(audio.shape)}")
        if audio.shape[-1] != self.config.audio_in:
            raise PermanentError(
                f"{NAME}: audio features are {audio.shape[-1]} wide, the model was "
                f"trained on {self.config.audio_in}-wide features"
            )

    @classmethod
    def config_from_state_dict(
        cls, state_dict: Mapping[str, object], *, n_head: int = Config.n_head
    ) -> Config:
        """The sizes of a ``deformation.pth`` state dict, read from its shapes. The head
        count is not in the shapes: it is ``n_head`` in the model's ``cfg_args``."""
        grid = NET + "tri_plane.grid.grids."
        audio_in = tensor_shape(state_dict, NET + "audio_net.encoder_conv.0.weight", 3, NAME)[1]
        xy = tensor_shape(state_dict, grid + "0.0", 4, NAME)
        xz = tensor_shape(state_dict, grid + "0.1", 4, NAME)
        levels = count_indexed(state_dict, grid, ".0")
        multires = tuple(
            tensor_shape(state_dict, f"{grid}{i}.0", 4, NAME)[-1] // xy[-1] for i in range(levels)
        )
        d_model = tensor_shape(state_dict, NET + "null_vector", 3, NAME)[-1]
        ffn = tensor_shape(state_dict, NET + "transformer.layers.0.ffn.linear1.weight", 2, NAME)
        values = dict(
            audio_in=audio_in,
            grid_channels=xy[1],
            resolution=(xy[-1], xy[-2], xz[-2]),
            multires=multires,
            d_model=d_model,
            n_head=n_head,
            ffn_hidden=ffn[0],
            n_layer=count_indexed(state_dict, NET + "transformer.layers.", ".norm1.gamma"),
            net_width=tensor_shape(state_dict, NET + "pos_deform.1.weight", 2, NAME)[0],
            defor_depth=count_indexed(
                state_dict, NET + "tri_plane.feature_out.", ".weight", step=2
            ),
            posebase_pe=tensor_shape(state_dict, "pos_poc", 1, NAME)[0],
            scale_rotation_pe=tensor_shape(state_dict, "rotation_scaling_poc", 1, NAME)[0],
            opacity_pe=tensor_shape(state_dict, "opacity_poc", 1, NAME)[0],
        )
        try:
            return Config(**values)
        except ValueError as e:
            raise PermanentError(f"{NAME}: inconsistent sizes: {e}") from None

    @classmethod
    def from_state_dict(
        cls, state_dict: Mapping[str, object], *, n_head: int = Config.n_head
    ) -> Deformation:
        """The module for a ``deformation.pth`` state dict, loaded strictly, in eval mode.
        PermanentError (one line) naming the first missing, unexpected or misshapen key."""
        if not isinstance(state_dict, Mapping):
            raise PermanentError(f"{NAME}: expected a state dict, got {type(state_dict).__name__}")
        module = cls(cls.config_from_state_dict(state_dict, n_head=n_head))
        load_strict(module, state_dict, NAME)
        return module.eval()


def audio_window(features: torch.Tensor, index: int) -> torch.Tensor:
    """Upstream's window for frame ``index`` (``get_audio_features``, att_mode 2): rows
    index-4 .. index+3 of features [T, 16, C], zero rows outside 0 .. T-1 -> [8, 16, C]."""
    half = AUDIO_FRAMES // 2
    out = features.new_zeros((AUDIO_FRAMES, *features.shape[1:]))
    lo, hi = max(index - half, 0), min(index + half, features.shape[0])
    if lo < hi:
        out[lo - (index - half) : hi - (index - half)] = features[lo:hi]
    return out
