"""Second views of replayed memories for contrastive learning and the not-hidden baseline (docs/algorithm.md
"Second views").

The transforms are kornia's; every random decision is drawn from a dedicated torch.Generator seeded
once from the run seed, so the global RNG is never reseeded or consumed by augmentation
(difference "seed-once", docs/algorithm.md). kornia is imported where a view is made: the engine and every run
without contrastive replay or --not-hidden work without it (a GPU machine may lack it, docs/architecture.md "GPU").
"""

from __future__ import annotations

import math

import torch
from torch import nn

MINMAX_EPS = 1e-8  # constant maps must not divide by zero (difference "minmax-eps", docs/algorithm.md)


def _bernoulli(n: int, p: float, rng: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.rand(n, generator=rng, device=device) < p


def _boxes(x0: torch.Tensor, y0: torch.Tensor, w: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """kornia box corners [N, 4, 2] (x, y; inclusive pixel positions) from top-left corner and size."""
    x1, y1 = x0 + w - 1, y0 + h - 1
    return torch.stack([torch.stack([x0, y0], -1), torch.stack([x1, y0], -1),
                        torch.stack([x1, y1], -1), torch.stack([x0, y1], -1)], dim=1)


def random_hflip(x: torch.Tensor, p: float, rng: torch.Generator) -> torch.Tensor:
    from kornia.geometry.transform import hflip

    flip = _bernoulli(len(x), p, rng, x.device).view(-1, 1, 1, 1)
    return torch.where(flip, hflip(x), x)


def random_resized_crop(x: torch.Tensor, p: float, scale: tuple[float, float],
                        rng: torch.Generator) -> torch.Tensor:
    """Per sample with probability p: crop a random area share in `scale` (aspect 3/4..4/3), resize back."""
    n, _, H, W = x.shape
    dev = x.device
    area = torch.empty(n, device=dev).uniform_(*scale, generator=rng) * H * W
    log_ratio = torch.empty(n, device=dev).uniform_(math.log(3 / 4), math.log(4 / 3), generator=rng)
    ratio = torch.exp(log_ratio)
    w = torch.sqrt(area * ratio).round().clamp(1, W)
    h = torch.sqrt(area / ratio).round().clamp(1, H)
    x0 = (torch.rand(n, generator=rng, device=dev) * (W - w + 1)).floor()
    y0 = (torch.rand(n, generator=rng, device=dev) * (H - h + 1)).floor()
    apply = _bernoulli(n, p, rng, dev)
    return crop_where(x, _boxes(x0, y0, w, h), apply, only_chosen=crops_only_chosen(dev))


def crops_only_chosen(device: torch.device) -> bool:
    """On the CPU only the samples to crop are cropped (half of them: a third of a contrastive step's extra time);
    on a GPU the whole batch, since picking samples needs their count on the host (a synchronisation)."""
    return device.type == "cpu"


def crop_where(x: torch.Tensor, boxes: torch.Tensor, apply: torch.Tensor, only_chosen: bool) -> torch.Tensor:
    """x with each sample where `apply` holds cropped to its box and resized back; `only_chosen` crops just
    those samples, the same values (kornia crops each sample on its own), less work."""
    from kornia.geometry.transform import crop_and_resize

    size = tuple(x.shape[-2:])
    if not only_chosen:
        return torch.where(apply.view(-1, 1, 1, 1), crop_and_resize(x, boxes, size), x)
    chosen = apply.nonzero().squeeze(1)
    out = x.clone()
    if len(chosen):
        out[chosen] = crop_and_resize(x[chosen], boxes[chosen], size)
    return out


def random_channel_shuffle(x: torch.Tensor, p: float, rng: torch.Generator) -> torch.Tensor:
    n, c = x.shape[:2]
    perm = torch.rand(n, c, generator=rng, device=x.device).argsort(dim=1)
    shuffled = x.gather(1, perm.view(n, c, 1, 1).expand_as(x))
    return torch.where(_bernoulli(n, p, rng, x.device).view(-1, 1, 1, 1), shuffled, x)


def random_crop_batch(x: torch.Tensor, size: int, p: float, rng: torch.Generator) -> torch.Tensor:
    """With probability p decided once for the batch: a random size x size crop of every sample."""
    from kornia.geometry.transform import crop_and_resize

    if not bool(_bernoulli(1, p, rng, x.device).cpu()):  # one draw per batch; batch shape depends on it
        return x
    n, _, H, W = x.shape
    x0 = torch.randint(0, W - size + 1, (n,), generator=rng, device=x.device).float()
    y0 = torch.randint(0, H - size + 1, (n,), generator=rng, device=x.device).float()
    side = torch.full((n,), float(size), device=x.device)
    return crop_and_resize(x, _boxes(x0, y0, side, side), (size, size))


def random_grayscale(x: torch.Tensor, p: float, rng: torch.Generator) -> torch.Tensor:
    from kornia.color import rgb_to_grayscale

    gray = rgb_to_grayscale(x).expand_as(x)
    return torch.where(_bernoulli(len(x), p, rng, x.device).view(-1, 1, 1, 1), gray, x)


def augment_mnist(x: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
    """MNIST second view: horizontal flip (p 0.5), random resized crop to 28x28 (scale 0.75-1, p 0.5)."""
    return random_resized_crop(random_hflip(x, 0.5, rng), 0.5, (0.75, 1.0), rng)


def augment_cifar(u: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
    """CIFAR second view: per-sample min-max to [0, 1], kornia ops, back to the original range
    (docs/algorithm.md "Second views")."""
    flat = u.flatten(1)
    lo = flat.min(1).values.view(-1, 1, 1, 1)
    hi = flat.max(1).values.view(-1, 1, 1, 1)
    x = (u - lo) / (hi - lo + MINMAX_EPS)
    x = random_hflip(x, 0.5, rng)
    x = random_channel_shuffle(x, 0.75, rng)
    x = random_crop_batch(x, 24, 0.5, rng)
    x = random_grayscale(x, 0.25, rng)
    return x * (hi - lo + MINMAX_EPS) + lo


class AuxDecoder(nn.Module):
    """Maps 256x2x2 conv features to a 3x32x32 image; random (reference) or pre-trained
    (docs/algorithm.md "Second views")."""

    def __init__(self):
        super().__init__()
        chans = (256, 128, 64, 32, 16)
        layers: list[nn.Module] = []
        for c_in, c_out in zip(chans[:-1], chans[1:], strict=True):
            layers += [nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1), nn.BatchNorm2d(c_out), nn.ReLU()]
        layers.append(nn.Conv2d(16, 3, 3, stride=1, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h)
