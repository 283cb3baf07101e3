"""Ditto's LMDM denoiser: a diffusion transformer from audio to LivePortrait motion.

The network behind ``lmdm_v0.4_hubert.pth`` (upstream's ``MotionDecoder``), written for
farm. Given a noisy motion window ``x`` [B, S, 265], the motion frame it continues from
``cond_frame`` [B, 265], the per-frame condition ``cond`` [B, S, C] (HuBERT 1024 +
emotion 8 + eye-open 2 + eye-ball 6 + source keypoints 63 = 1103) and diffusion times
``t`` [B], it predicts the clean window x0 [B, S, 265].

Shape of the computation (every attention is pre-norm, with rotary position angles
applied to queries and keys across the whole latent width, before the heads split):

- the condition: ``cond_projection`` to the latent width, two transformer encoder
  layers; its mean over frames, through ``non_attn_cond_projection``, is added to the
  time embedding;
- the time: sinusoidal embedding, an MLP to 4x the latent width, then one vector ``t``
  for the FiLM layers and two extra memory tokens;
- the motion: ``[x, cond_frame]`` per frame through ``input_projection``, then decoder
  layers (self-attention, cross-attention to [condition tokens, time tokens], GELU
  feed-forward), each sub-block's output modulated by a FiLM of ``t`` as
  ``(1 + scale) * y + shift`` before its residual add; a final linear back to 265.

Classifier-free guidance: the unconditional pass swaps the encoded condition tokens for
the learned ``null_cond_embed`` and the pooled condition for ``null_cond_hidden`` (the
condition itself is then unused); ``cond_frame`` enters both passes. See ``guided``.

Attribute names mirror upstream's modules so ``state_dict()`` has exactly the keys and
shapes of the checkpoint's ``model_state_dict``, including one ``rotary.freqs`` buffer
per layer (upstream attaches the shared rotary module to every layer). Dropout is left
out: this module is for inference only.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from farm.errors import PermanentError
from models.weights import load_strict, tensor_shape

NAME = "LMDM"

_CHECKPOINT_WRAPPER = "model_state_dict"


@dataclass(frozen=True)
class Config:
    """Widths of the network; the defaults are upstream's (``lmdm_v0.4_hubert.pth``)."""

    motion_dim: int = 265  # scale 1, pitch/yaw/roll 66 bins each, t 3, exp 63
    cond_dim: int = 1103  # audio 1024 + emotion 8 + eye-open 2 + eye-ball 6 + keypoints 63
    latent_dim: int = 512
    ff_dim: int = 1024
    num_layers: int = 8  # FiLM decoder layers
    encoder_layers: int = 2  # condition encoder layers
    num_heads: int = 8  # not visible in a state dict
    seq_len: int = 80  # frames per window; fixed by the shape of null_cond_embed

    def __post_init__(self) -> None:
        if self.latent_dim % 2 or self.latent_dim % self.num_heads:
            raise ValueError(
                f"latent_dim {self.latent_dim} must be even and divisible by "
                f"num_heads {self.num_heads}"
            )


class _Rotary(nn.Module):
    """Rotary position angles over the full latent width, adjacent pairs rotated together.

    ``freqs`` [latent/2] is a checkpoint buffer: 10000^(-2i/latent)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        freqs = 1.0 / (10000 ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
        self.register_buffer("freqs", freqs)

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """Rotate [B, N, D] by position n along the frame axis."""
        positions = torch.arange(x.shape[-2], device=x.device, dtype=self.freqs.dtype)
        angles = torch.outer(positions, self.freqs).repeat_interleave(2, dim=-1).to(x)
        pairs = x.unflatten(-1, (-1, 2))
        rotated = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
        return x * angles.cos() + rotated * angles.sin()


class _Attention(nn.Module):
    """Multi-head attention with ``nn.MultiheadAttention``'s parameter layout
    (packed ``in_proj_weight`` [3D, D], ``in_proj_bias``, ``out_proj``)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        wq, wk, wv = self.in_proj_weight.chunk(3)
        bq, bk, bv = self.in_proj_bias.chunk(3)
        q, k, v = (
            F.linear(a, w, b).unflatten(-1, (self.heads, -1)).transpose(1, 2)
            for a, w, b in ((q, wq, bq), (k, wk, bk), (v, wv, bv))
        )
        out = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(out.transpose(1, 2).flatten(-2))


class _FiLM(nn.Module):
    """(scale, shift) [B, 1, D] each, from the time vector [B, D]: Mish then linear."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Mish(), nn.Linear(dim, 2 * dim))

    def forward(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scale, shift = self.block(t).unsqueeze(1).chunk(2, dim=-1)
        return scale, shift


def _modulate(y: torch.Tensor, film: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    scale, shift = film
    return (scale + 1) * y + shift


class _EncoderLayer(nn.Module):
    """Pre-norm self-attention (rotary on queries and keys) and GELU feed-forward."""

    def __init__(self, cfg: Config, rotary: _Rotary) -> None:
        super().__init__()
        d = cfg.latent_dim
        self.self_attn = _Attention(d, cfg.num_heads)
        self.linear1 = nn.Linear(d, cfg.ff_dim)
        self.linear2 = nn.Linear(cfg.ff_dim, d)
        self.norm1 = nn.LayerNorm(d)
        self.norm2 = nn.LayerNorm(d)
        self.rotary = rotary

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        qk = self.rotary.rotate(h)
        x = x + self.self_attn(qk, qk, h)
        return x + self.linear2(F.gelu(self.linear1(self.norm2(x))))


class _DecoderLayer(nn.Module):
    """Pre-norm self-attention, cross-attention and feed-forward, each FiLM-modulated."""

    def __init__(self, cfg: Config, rotary: _Rotary) -> None:
        super().__init__()
        d = cfg.latent_dim
        self.self_attn = _Attention(d, cfg.num_heads)
        self.multihead_attn = _Attention(d, cfg.num_heads)
        self.linear1 = nn.Linear(d, cfg.ff_dim)
        self.linear2 = nn.Linear(cfg.ff_dim, d)
        self.norm1 = nn.LayerNorm(d)
        self.norm2 = nn.LayerNorm(d)
        self.norm3 = nn.LayerNorm(d)
        self.film1 = _FiLM(d)
        self.film2 = _FiLM(d)
        self.film3 = _FiLM(d)
        self.rotary = rotary

    def forward(self, x: torch.Tensor, memory: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        qk = self.rotary.rotate(h)
        x = x + _modulate(self.self_attn(qk, qk, h), self.film1(t))
        h = self.norm2(x)
        y = self.multihead_attn(self.rotary.rotate(h), self.rotary.rotate(memory), memory)
        x = x + _modulate(y, self.film2(t))
        y = self.linear2(F.gelu(self.linear1(self.norm3(x))))
        return x + _modulate(y, self.film3(t))


class _DecoderStack(nn.Module):
    """Holds the decoder layers under ``stack`` (upstream's key prefix)."""

    def __init__(self, layers: list[_DecoderLayer]) -> None:
        super().__init__()
        self.stack = nn.ModuleList(layers)


class _TimeEmbedding(nn.Module):
    """Sinusoidal embedding of the diffusion time: [sin(t w_i), cos(t w_i)],
    w_i = 10000^(-i/(D/2 - 1))."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        step = math.log(10000) / (half - 1)
        w = torch.exp(torch.arange(half, device=t.device) * -step)
        angles = t[:, None] * w[None, :]
        return torch.cat((angles.sin(), angles.cos()), dim=-1)


class LMDM(nn.Module):
    """The denoiser: ``forward`` predicts the clean window; ``guided`` mixes the
    conditioned and unconditioned predictions (classifier-free guidance)."""

    def __init__(self, config: Config | None = None) -> None:
        super().__init__()
        cfg = config or Config()
        self.config = cfg
        d = cfg.latent_dim
        self.rotary = _Rotary(d)
        self.time_mlp = nn.Sequential(_TimeEmbedding(d), nn.Linear(d, 4 * d), nn.Mish())
        self.to_time_cond = nn.Sequential(nn.Linear(4 * d, d))
        self.to_time_tokens = nn.Sequential(nn.Linear(4 * d, 2 * d))
        self.null_cond_embed = nn.Parameter(torch.randn(1, cfg.seq_len, d))
        self.null_cond_hidden = nn.Parameter(torch.randn(1, d))
        self.norm_cond = nn.LayerNorm(d)
        self.input_projection = nn.Linear(2 * cfg.motion_dim, d)
        self.cond_encoder = nn.Sequential(
            *(_EncoderLayer(cfg, self.rotary) for _ in range(cfg.encoder_layers))
        )
        self.cond_projection = nn.Linear(cfg.cond_dim, d)
        self.non_attn_cond_projection = nn.Sequential(
            nn.LayerNorm(d), nn.Linear(d, d), nn.SiLU(), nn.Linear(d, d)
        )
        self.seqTransDecoder = _DecoderStack(
            [_DecoderLayer(cfg, self.rotary) for _ in range(cfg.num_layers)]
        )
        self.final_layer = nn.Linear(d, cfg.motion_dim)

    def forward(
        self,
        x: torch.Tensor,
        cond_frame: torch.Tensor,
        cond: torch.Tensor | None,
        t: torch.Tensor,
    ) -> torch.Tensor:
        """Predicted clean motion [B, S, motion_dim].

        x [B, S, motion_dim] noisy motion; cond_frame [B, motion_dim]; cond [B, S,
        cond_dim], or None for the unconditional (null-condition) prediction; t [B]
        integer diffusion times in [0, 1000)."""
        if cond is None:
            tokens, pooled = self._null_condition(x.shape[0], x.dtype)
        else:
            tokens, pooled = self._encode_condition(cond)
        return self._denoise(x, cond_frame, tokens, pooled, t)

    def guided(
        self,
        x: torch.Tensor,
        cond_frame: torch.Tensor,
        cond: torch.Tensor,
        t: torch.Tensor,
        guidance: float,
    ) -> torch.Tensor:
        """Classifier-free guidance: uncond + guidance * (cond - uncond).

        The same as two ``forward`` calls, run as one doubled batch through the decoder
        (the condition encoder runs for the conditioned half only)."""
        batch = x.shape[0]
        null_tokens, null_pooled = self._null_condition(batch, x.dtype)
        tokens, pooled = self._encode_condition(cond)
        both = self._denoise(
            torch.cat((x, x)),
            torch.cat((cond_frame, cond_frame)),
            torch.cat((null_tokens, tokens)),
            torch.cat((null_pooled, pooled)),
            torch.cat((t, t)),
        )
        uncond, conditioned = both[:batch], both[batch:]
        return uncond + (conditioned - uncond) * guidance

    def _encode_condition(self, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Condition tokens [B, S, D] and their pooled summary [B, D]."""
        tokens = self.cond_projection(cond)
        for layer in self.cond_encoder:
            tokens = layer(tokens)
        return tokens, self.non_attn_cond_projection(tokens.mean(dim=-2))

    def _null_condition(self, batch: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The learned stand-ins for the condition in the unconditional pass."""
        tokens = self.null_cond_embed.expand(batch, -1, -1).to(dtype)
        return tokens, self.null_cond_hidden.expand(batch, -1).to(dtype)

    def _denoise(
        self,
        x: torch.Tensor,
        cond_frame: torch.Tensor,
        tokens: torch.Tensor,
        pooled: torch.Tensor,
        t: torch.Tensor,
    ) -> torch.Tensor:
        batch, frames = x.shape[0], x.shape[1]
        frame = cond_frame.unsqueeze(1).expand(batch, frames, cond_frame.shape[-1])
        h = self.input_projection(torch.cat((x, frame), dim=-1))
        t_hidden = self.time_mlp(t)
        t_vec = self.to_time_cond(t_hidden) + pooled
        t_tokens = self.to_time_tokens(t_hidden).unflatten(-1, (2, -1))
        memory = self.norm_cond(torch.cat((tokens, t_tokens), dim=-2))
        for layer in self.seqTransDecoder.stack:
            h = layer(h, memory, t_vec)
        return self.final_layer(h)

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, torch.Tensor], *, num_heads: int = 8) -> LMDM:
        """Build the network a checkpoint describes and load it strictly, in eval mode.

        Accepts the network's state dict or the checkpoint file's wrapper
        ``{"model_state_dict": ...}``. The widths are read from the tensors
        (``cond_projection.weight`` gives the condition width) and the layer counts
        from the key names; the number of heads is not recorded, so it is a parameter
        (upstream's is 8). Raises ``PermanentError`` naming the first missing,
        unexpected or misshapen key."""
        sd = _unwrap(state_dict)
        model = cls(infer_config(sd, num_heads=num_heads))
        load_strict(model, sd, NAME)
        return model.eval()


def _unwrap(state_dict: Mapping[str, object]) -> Mapping[str, torch.Tensor]:
    inner = state_dict.get(_CHECKPOINT_WRAPPER) if isinstance(state_dict, Mapping) else None
    sd = inner if isinstance(inner, Mapping) else state_dict
    if not isinstance(sd, Mapping):
        raise PermanentError(f"LMDM checkpoint: expected a state dict, found {type(sd).__name__}")
    for key, value in sd.items():
        if not isinstance(value, torch.Tensor):
            raise PermanentError(
                f"LMDM checkpoint: key {key!r} holds {type(value).__name__}, expected a tensor"
            )
    return sd  # type: ignore[return-value]


def _count_layers(sd: Mapping[str, torch.Tensor], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    indices = {int(m.group(1)) for key in sd if (m := pattern.match(key))}
    return max(indices) + 1 if indices else 0


def infer_config(sd: Mapping[str, torch.Tensor], *, num_heads: int = 8) -> Config:
    """The ``Config`` a state dict was saved from (number of heads given)."""
    motion_dim, latent = tensor_shape(sd, "final_layer.weight", 2, NAME)
    cond_dim = tensor_shape(sd, "cond_projection.weight", 2, NAME)[1]
    seq_len = tensor_shape(sd, "null_cond_embed", 3, NAME)[1]
    ff_dim = tensor_shape(sd, "seqTransDecoder.stack.0.linear1.weight", 2, NAME)[0]
    try:
        return Config(
            motion_dim=motion_dim,
            cond_dim=cond_dim,
            latent_dim=latent,
            ff_dim=ff_dim,
            num_layers=_count_layers(sd, "seqTransDecoder.stack."),
            encoder_layers=_count_layers(sd, "cond_encoder."),
            num_heads=num_heads,
            seq_len=seq_len,
        )
    except ValueError as exc:
        raise PermanentError(f"LMDM checkpoint: {exc}") from None
