"""``focus_moe``: FocusLLaVA's vision-guided sampler (Zhu et al. 2024, arXiv 2411.14228), as a connector.

No public code was found and the method section was not readable, so this follows the source notes and the abstract;
the choices they leave open are made here, and each is a setting:

- **Windows.** The (h, w) patch grid is cut into M local windows of ``window`` x ``window`` patches (raster order);
  a side the window does not divide is padded with copies of its edge patches (27x27 -> 28x28 at window 4).
- **Experts** are down-samplers of different scales: scale s average-pools a window by s x s, giving
  (window / s)^2 tokens (``scales=(1, 2, 4)``: 16, 4 or 1 tokens for a 4x4 window). All experts share one per-token
  projector to the LLM width (``inner``, default ``mlp2x_gelu``).
- **Router.** Each window is scored against the *global* feature: an MLP over [window mean; global mean; window std]
  (the std is the window's own spread, the information cue "low-information windows compress more" asks for) gives
  one logit per expert. It picks one expert per window (top-1).
- **Training** uses the straight-through Gumbel-softmax: the forward pass takes the hard top-1 expert and scales its
  tokens by the straight-through gate (exactly 1 in value), so the LM loss reaches the router; **inference** takes the
  hard argmax, deterministic.
- **Token budget** (``budget``: the target fraction of the N patch tokens, on average over images). Two parts:
  a global *offset* ``delta`` added to the logits as ``delta * log(tokens_e)`` (larger delta favours richer experts),
  calibrated during training (like a BatchNorm statistic, saved with the weights) so that the **hard top-1** choices
  on the last 4 training batches taken together meet the budget (a target ratio; it lags a router that is still
  moving, and is exact for a settled one); and, optionally, the
  auxiliary loss ``budget_weight * (E[tokens] / N - budget)^2`` (E under the router's softmax of the shifted logits)
  added to the LM loss. The offset alone holds the budget; the auxiliary loss is off by default because it pushes the
  logits to extremes faster than the running offset follows (measured: budget 0.4 gave 0.27 with it, 0.40 without).
  The offset is global, not per image, so images still get different counts: busy images more, flat ones fewer.
  ``calibrate(features)`` sets it without training.

Tokens of an image are the chosen experts' outputs, window by window, left-aligned; the mask marks each image's count.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from connector_zoo.settings import SettingError, check
from connectors import build_connector, register
from connectors.base import Connector, ConnectorOutput, PerTokenConnector
from encoders.base import EncoderInfo, VisionFeatures


@register("focus_moe")
class FocusMoE(Connector):
    """FocusLLaVA vision-guided sampler: per-window choice among multi-scale down-samplers, under a token budget."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        window: int = 4,
        scales: tuple[int, ...] | list[int] = (1, 2, 4),
        budget: float = 0.25,
        budget_weight: float = 0.0,
        router_hidden: int = 128,
        tau: float = 1.0,
        inner: str = "mlp2x_gelu",
        inner_settings: dict[str, Any] | None = None,
    ):
        super().__init__(in_dim, out_dim)
        check("focus_moe", "window", window, int, lo=1)
        check("focus_moe", "scales", scales, list)
        for s in scales:
            check("focus_moe", "scales[]", s, int, lo=1)
        scales = tuple(scales)
        if not scales or any(window % s for s in scales):
            raise SettingError(f"focus_moe: scales={list(scales)}: every scale must divide the window ({window})")
        check("focus_moe", "budget", budget, float, lo=0, hi=1, lo_open=True)
        check("focus_moe", "budget_weight", budget_weight, float, lo=0)
        check("focus_moe", "router_hidden", router_hidden, int, lo=1)
        check("focus_moe", "tau", tau, float, lo=0, lo_open=True)
        check("focus_moe", "inner", inner, str)
        check("focus_moe", "inner_settings", inner_settings, dict, optional=True)
        self.window, self.scales, self.budget, self.budget_weight, self.tau = window, scales, budget, budget_weight, tau
        self.tokens_per_expert = torch.tensor([(window // s) ** 2 for s in scales], dtype=torch.float32)
        self.router = nn.Sequential(
            nn.Linear(3 * in_dim, router_hidden), nn.GELU(), nn.Linear(router_hidden, len(scales))
        )
        self.inner = build_connector(inner, in_dim, out_dim, **(inner_settings or {}))
        if not isinstance(self.inner, PerTokenConnector):
            raise ValueError(f"focus_moe needs a per-token projector, {type(self.inner).__name__} is not one")
        self.register_buffer("offset", torch.zeros(()))
        self.register_buffer("calibrated", torch.zeros((), dtype=torch.bool))
        self.calibration_batches = 4

    # ---------------------------------------------------------------- pieces
    def padded(self, h: int, w: int) -> tuple[int, int]:
        """The grid rounded up to whole windows."""
        return -(-h // self.window) * self.window, -(-w // self.window) * self.window

    def windows(self, features: VisionFeatures) -> torch.Tensor:
        """(B, N, Dv) -> (B, M, window, window, Dv). A side the window does not divide (SigLIP-so400m/384's 27x27
        with window 4) is padded by repeating the edge patches to whole windows (28x28: 49 windows)."""
        h, w = features.grid
        H, W = self.padded(h, w)
        grid = features.patches.reshape(features.batch_size, h, w, -1)
        if (h, w) != (H, W):
            grid = F.pad(grid.permute(0, 3, 1, 2), (0, W - w, 0, H - h), mode="replicate").permute(0, 2, 3, 1)
        return rearrange(grid, "b (mh wh) (mw ww) d -> b (mh mw) wh ww d", wh=self.window, ww=self.window)

    def router_logits(self, windows: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        """(B, M, E): each window against the global feature."""
        flat = windows.flatten(2, 3)  # (B, M, w*w, Dv)
        local_mean, local_std = flat.mean(2), flat.std(2, unbiased=False)
        global_mean = patches.mean(1, keepdim=True).expand_as(local_mean)
        return self.router(torch.cat([local_mean, global_mean, local_std], dim=-1))

    def expert_tokens(self, windows: torch.Tensor) -> list[torch.Tensor]:
        """Per expert: (B, M, (window/s)^2, Dv) average-pooled tokens, raster order inside the window."""
        B, M = windows.shape[:2]
        x = rearrange(windows, "b m wh ww d -> (b m) d wh ww")
        out = []
        for s in self.scales:
            pooled = F.avg_pool2d(x, s) if s > 1 else x
            out.append(rearrange(pooled, "(b m) d ph pw -> b m (ph pw) d", b=B, m=M))
        return out

    def shifted(self, logits: torch.Tensor, offset: torch.Tensor | float) -> torch.Tensor:
        return logits + offset * torch.log(self.tokens_per_expert.to(logits.device, logits.dtype))

    def hard_counts(self, logits: torch.Tensor, offset: float) -> torch.Tensor:
        """(B,) tokens per image of the hard top-1 choice under ``offset``."""
        choice = self.shifted(logits, offset).argmax(-1)
        return self.tokens_per_expert.to(logits.device)[choice].sum(-1)

    @torch.no_grad()
    def batch_offset(self, logits: torch.Tensor, num_patches: int) -> float:
        """The offset whose hard top-1 choices come nearest the budget on this batch (counts rise with it)."""
        target = self.budget * num_patches
        mean = lambda d: float(self.hard_counts(logits, d).float().mean())  # noqa: E731
        lo, hi = -1e4, 1e4  # logits can grow large in training; the offset must be able to follow
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if mean(mid) < target else (lo, mid)
        return lo if abs(mean(lo) - target) < abs(mean(hi) - target) else hi

    @torch.no_grad()
    def update_offset(self, logits: torch.Tensor, num_patches: int) -> None:
        """Fit the offset on the logits of the last ``calibration_batches`` training batches together. (Averaging
        per-batch offsets is biased, because counts are not linear in the offset; one batch alone is noisy.)"""
        self._recent = [*getattr(self, "_recent", [])[-(self.calibration_batches - 1) :], logits]
        self.offset.fill_(self.batch_offset(torch.cat(self._recent), num_patches))
        self.calibrated.fill_(True)

    @torch.no_grad()
    def calibrate(self, features: VisionFeatures) -> float:
        """Set the offset so that these images meet the budget on average (no training needed)."""
        windows = self.windows(features)
        self.offset.fill_(self.batch_offset(self.router_logits(windows, features.patches), features.patches.shape[1]))
        self.calibrated.fill_(True)
        return float(self.offset)

    def gates(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, M, E) one-hot choice on the shifted logits; straight-through Gumbel-softmax in training, hard argmax
        at inference."""
        logits = self.shifted(logits, self.offset)
        if self.training:
            return F.gumbel_softmax(logits, tau=self.tau, hard=True)
        return F.one_hot(logits.argmax(-1), logits.shape[-1]).to(logits.dtype)

    # --------------------------------------------------------------- forward
    def forward(self, features: VisionFeatures) -> ConnectorOutput:
        windows = self.windows(features)
        logits = self.router_logits(windows, features.patches)
        if self.training:
            self.update_offset(logits.detach(), features.patches.shape[1])
        gates = self.gates(logits)  # (B, M, E), values exactly 0/1, gradients to the router in training
        experts = self.expert_tokens(windows)
        # every expert's tokens side by side, each scaled by its gate; keep those of the chosen expert
        tokens = torch.cat([t * gates[..., e, None, None] for e, t in enumerate(experts)], dim=2)  # (B, M, T_all, Dv)
        chosen = torch.cat([gates[..., e, None].expand(-1, -1, t.shape[2]) > 0.5 for e, t in enumerate(experts)], 2)
        tokens, chosen = tokens.flatten(1, 2), chosen.flatten(1, 2)
        # left-align each image's chosen tokens, preserving window order (stable sort on "not chosen")
        order = torch.sort((~chosen).to(torch.int8), dim=1, stable=True).indices
        counts = chosen.sum(1)
        keep = int(counts.max())
        order = order[:, :keep]
        tokens = torch.gather(tokens, 1, order[..., None].expand(-1, -1, tokens.shape[-1]))
        mask = torch.arange(keep, device=counts.device)[None] < counts[:, None]
        projected = self.inner.project(tokens) * mask[..., None]
        aux = self.budget_loss(logits, features) if self.training else None
        return ConnectorOutput(projected, mask, aux_loss=aux)

    def budget_loss(self, logits: torch.Tensor, features: VisionFeatures) -> torch.Tensor:
        per_expert = self.tokens_per_expert.to(logits.device, logits.dtype)
        expected = (self.shifted(logits, self.offset).softmax(-1) * per_expert).sum(dim=(1, 2))  # (B,)
        return self.budget_weight * ((expected / features.patches.shape[1] - self.budget) ** 2).mean()

    def max_tokens(self, info: EncoderInfo) -> int:
        H, W = self.padded(*info.grid)
        return H * W // self.window**2 * int(self.tokens_per_expert.max())
