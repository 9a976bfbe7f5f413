"""Per-batch augmentation on tensors: random resized crop, random crop with padding, horizontal flip, mixup
and cutmix, in that order, for the whole batch at once on the training device.

Randomness comes from a generator seeded by (seed, epoch, step), so a resumed run draws the same views and
the teacher can be run on exactly the batch the student sees (consistent teaching, Beyer et al. 2022).

Mixing pairs sample i with sample perm[i] of the same batch:
    mixup:  x = lam * x + (1 - lam) * x[perm],            lam ~ Beta(a, a)
    cutmix: a box of area (1 - lam) of x[perm] pasted into x; lam is then the kept area.
The hard-label loss is lam * CE(s, y) + (1 - lam) * CE(s, y[perm]) (losses.mixed_cross_entropy).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from edgekd.errors import EdgekdError


@dataclass(frozen=True)
class Mix:
    """How a batch was mixed: sample i holds lam of itself and (1 - lam) of sample perm[i]."""

    perm: torch.Tensor
    lam: float


@dataclass(frozen=True)
class BatchAugment:
    crop: int = 0
    flip: bool = False
    mixup: float = 0.0
    cutmix: float = 0.0
    resized_crop: tuple[float, float] | None = None   # (min_scale, max_scale) of the image area

    @property
    def mixes(self) -> bool:
        return self.mixup > 0 or self.cutmix > 0

    def without_mixing(self) -> BatchAugment:
        return replace(self, mixup=0.0, cutmix=0.0)

    def __call__(self, x: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, Mix | None]:
        if (self.crop or self.flip or self.cutmix or self.resized_crop) and x.dim() != 4:
            raise EdgekdError(f"[augment]: resized_crop, crop, flip and cutmix need (N, C, H, W) images, got a batch "
                              f"of shape {tuple(x.shape)}; use mixup only, or no augmentation")
        n = len(x)
        if self.resized_crop:
            x = random_resized_crop(x, self.resized_crop, gen)
        if self.crop:
            x = random_crop(x, self.crop, gen)
        if self.flip:
            flips = (torch.rand(n, generator=gen) < 0.5).to(x.device)
            x = torch.where(flips.view(-1, 1, 1, 1), x.flip(-1), x)
        if not self.mixes or n < 2:
            return x, None
        use_cutmix = self.cutmix > 0 and (self.mixup <= 0 or torch.rand(1, generator=gen).item() < 0.5)
        a = self.cutmix if use_cutmix else self.mixup
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))   # lam ~ Beta(a, a), seeded from `gen`:
        lam = float(np.random.default_rng(seed).beta(a, a))   # torch.distributions cannot take a generator
        perm = torch.randperm(n, generator=gen).to(x.device)
        if use_cutmix:
            x, lam = _cutmix(x, perm, lam, gen)
        else:
            x = lam * x + (1.0 - lam) * x[perm]
        return x, Mix(perm, lam)


def random_crop(x: torch.Tensor, pad: int, gen: torch.Generator) -> torch.Tensor:
    """Zero-pad by `pad` pixels and crop back to the original size at a random offset per sample."""
    n, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    oy = torch.randint(0, 2 * pad + 1, (n,), generator=gen).to(x.device)
    ox = torch.randint(0, 2 * pad + 1, (n,), generator=gen).to(x.device)
    rows = (oy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (ox[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    chans = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, chans, rows, cols]


RATIO = (3 / 4, 4 / 3)   # resized crop: width / height of the box, log-uniform (torchvision's default)
TRIES = 10               # boxes drawn per sample before falling back to the whole image (as torchvision)


def random_resized_crop(x: torch.Tensor, scale: tuple[float, float], gen: torch.Generator) -> torch.Tensor:
    """Per sample, a box of area s * H * W (s ~ U(scale)) and aspect w / h = exp(U(log ratio)), at a uniform
    position inside the image, resized back to (H, W) with bilinear sampling (torchvision's
    RandomResizedCrop, boxes in continuous coordinates). All samples at once: one affine_grid + grid_sample.
    A sample whose TRIES boxes all fall outside the image keeps the whole image."""
    n, _, h, w = x.shape
    area = torch.empty(n, TRIES).uniform_(scale[0], scale[1], generator=gen)
    log_r = torch.empty(n, TRIES).uniform_(math.log(RATIO[0]), math.log(RATIO[1]), generator=gen)
    # box size as fractions of the image's width and height: (bw * W) / (bh * H) = r, bw * bh = area
    bw = torch.sqrt(area * torch.exp(log_r) * h / w)
    bh = torch.sqrt(area / torch.exp(log_r) * w / h)
    fits = (bw <= 1) & (bh <= 1)
    first = torch.where(fits.any(1), fits.float().argmax(1), torch.full((n,), -1))
    pick = first.clamp(min=0)[:, None]
    bw = torch.where(first >= 0, bw.gather(1, pick)[:, 0], torch.ones(n))
    bh = torch.where(first >= 0, bh.gather(1, pick)[:, 0], torch.ones(n))
    left = torch.rand(n, generator=gen) * (1 - bw)
    top = torch.rand(n, generator=gen) * (1 - bh)
    # affine_grid maps output coordinates u in [-1, 1] to input coordinates: centre + half-size * u
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = bw, 2 * left + bw - 1
    theta[:, 1, 1], theta[:, 1, 2] = bh, 2 * top + bh - 1
    theta = theta.to(device=x.device, dtype=x.dtype if x.is_floating_point() else torch.float32)
    grid = F.affine_grid(theta, [n, x.shape[1], h, w], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _cutmix(x: torch.Tensor, perm: torch.Tensor, lam: float, gen: torch.Generator) -> tuple[torch.Tensor, float]:
    h, w = x.shape[2:]
    cut = (1.0 - lam) ** 0.5
    bh, bw = int(round(h * cut)), int(round(w * cut))
    cy = int(torch.randint(0, h, (1,), generator=gen))
    cx = int(torch.randint(0, w, (1,), generator=gen))
    y0, y1 = max(cy - bh // 2, 0), min(cy + (bh - bh // 2), h)
    x0, x1 = max(cx - bw // 2, 0), min(cx + (bw - bw // 2), w)
    out = x.clone()
    out[:, :, y0:y1, x0:x1] = x[perm][:, :, y0:y1, x0:x1]
    return out, 1.0 - (y1 - y0) * (x1 - x0) / float(h * w)


def step_generator(seed: int, epoch: int, step: int) -> torch.Generator:
    """The generator for one training step: the same (seed, epoch, step) always gives the same views."""
    state = np.random.SeedSequence([seed, epoch, step]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & (2**63 - 1))
