"""Second views of replayed memories for contrastive learning and the not-hidden baseline (docs/algorithm.md
"Second views").

The transforms are kornia's; every random decision is drawn from a dedicated torch.Generator seeded
once from the run seed, so the global RNG is never reseeded or consumed by augmentation
(difference "seed-once", docs/algorithm.md). kornia is imported where a view is made: the engine and every run
without contrastive replay or --not-hidden work without it (a GPU machine may lack it, docs/architecture.md "GPU").
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

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
    if not crops_from_grids(dev):
        from kornia.geometry.transform import crop_and_resize

        return torch.where(apply.view(-1, 1, 1, 1), crop_and_resize(x, _boxes(x0, y0, w, h), (H, W)), x)
    chosen = apply.nonzero().squeeze(1)
    out = x.clone()
    if len(chosen):
        grids = crop_grids(x, (H, W), lambda: resized_crop_boxes((H, W), scale))
        out[chosen] = grids.crop(x[chosen], torch.stack([x0, y0, w, h], 1)[chosen])
    return out


def resized_crop_boxes(size: tuple[int, int], scale: tuple[float, float]) -> list[tuple[int, int, int, int]]:
    """Every box (x0, y0, w, h) `random_resized_crop` can draw on an image of `size`, and some it cannot: each side
    between the bounds that the extreme area and aspect give, at every position."""
    H, W = size
    short = math.floor(math.sqrt(scale[0] * H * W * 3 / 4))
    long = math.ceil(math.sqrt(scale[1] * H * W * 4 / 3))
    widths, heights = range(max(1, short), min(W, long) + 1), range(max(1, short), min(H, long) + 1)
    return [(x0, y0, w, h) for w in widths for h in heights for x0 in range(W - w + 1) for y0 in range(H - h + 1)]


def crops_from_grids(device: torch.device) -> bool:
    """On a CPU a crop replays kornia's sampling grids (`CropGrids`) on just the samples to crop; on a GPU kornia
    crops the whole batch, since looking boxes up or picking samples needs their values on the host (a
    synchronisation each step)."""
    return device.type == "cpu"


class _GridSampleCalls(TorchFunctionMode):
    """Records every torch.nn.functional.grid_sample call made inside it: arguments and result."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[tuple, dict, torch.Tensor]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        if func is F.grid_sample:
            self.calls.append((args, kwargs, result))
        return result


class CropGrids:
    """kornia's crop_and_resize replayed from its own sampling grids, one per integer box (x0, y0, w, h).

    A crop's grid depends on its box and the output size only, but kornia derives it afresh on each call with
    about 300 small tensor operations (the box-to-box perspective solve, its fallback, the normalisation and
    inverse, the grid), a millisecond on a CPU whatever the batch: on MNIST a fifth of a contrastive step's extra
    cost. Here each box's grid is captured from kornia once, at its one grid_sample call, and a crop is that same
    grid_sample call on the looked-up grids: kornia's values, bit for bit (tests/test_exaggeration.py). The first
    crop captures every box `candidates` lists in one call; a box outside them is captured when first seen.
    Should kornia ever crop otherwise (no single grid_sample of its input, or a result other than that call's, or
    a box's grid depending on the rest of the batch), the check at capture sees it and kornia crops directly."""

    def __init__(self, in_size: tuple[int, int], out_size: tuple[int, int],
                 candidates: Callable[[], list[tuple[int, int, int, int]]]):
        self.in_size, self.out_size, self.candidates = in_size, out_size, candidates
        self.rows: dict[tuple[int, int, int, int], int] = {}
        self.grids: torch.Tensor | None = None
        self.sample_args: dict[str, Any] = {}
        self.replays: bool | None = None   # None until the first capture has been checked

    def crop(self, x: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """x [N, C, H, W] cropped to `boxes` [N, 4] (x0, y0, w, h; integer values) and resized to out_size."""
        keys = [tuple(box) for box in boxes.long().tolist()]
        if self.replays is None:
            self.replays = self._capture(self.candidates(), x) and self._same_alone(next(iter(self.rows)), x)
        if not self.replays:
            from kornia.geometry.transform import crop_and_resize

            return crop_and_resize(x, _boxes(*boxes.to(x.dtype).unbind(1)), self.out_size)
        missing = [key for key in dict.fromkeys(keys) if key not in self.rows]
        if missing and not self._capture(missing, x):
            self.replays = False
            return self.crop(x, boxes)
        rows = torch.tensor([self.rows[key] for key in keys], device=x.device)
        return F.grid_sample(x, self.grids.index_select(0, rows), **self.sample_args)

    def _grids_of(self, boxes: list[tuple[int, int, int, int]], like: torch.Tensor) -> tuple[torch.Tensor, dict] | None:
        """kornia's sampling grids for `boxes` and its grid_sample arguments; None if kornia's crop is not one
        grid_sample of its input whose result it returns."""
        from kornia.geometry.transform import crop_and_resize

        n, (H, W) = len(boxes), self.in_size
        # distinct values (not the global random stream: augmentation leaves it alone), so that the comparison
        # below can tell one grid_sample's result from another
        probe = torch.arange(n * H * W, dtype=like.dtype, device=like.device).div_(n * H * W).view(n, 1, H, W)
        corners = _boxes(*torch.tensor(boxes, dtype=like.dtype, device=like.device).unbind(1))
        with _GridSampleCalls() as sampled:
            cropped = crop_and_resize(probe, corners, self.out_size)
        if len(sampled.calls) != 1:
            return None
        (args, kwargs, result), = sampled.calls
        if len(args) != 2 or args[0] is not probe or not _same(result, cropped):
            return None
        return args[1].detach(), kwargs

    def _capture(self, boxes: list[tuple[int, int, int, int]], like: torch.Tensor) -> bool:
        captured = self._grids_of(boxes, like)
        if captured is None or (self.sample_args and captured[1] != self.sample_args):
            return False
        grids, self.sample_args = captured
        self.rows |= {box: len(self.rows) + i for i, box in enumerate(boxes)}
        self.grids = grids if self.grids is None else torch.cat([self.grids, grids])
        return True

    def _same_alone(self, box: tuple[int, int, int, int], like: torch.Tensor) -> bool:
        """Whether a box's grid captured alone is the one captured among all the others."""
        alone = self._grids_of([box], like)
        return alone is not None and _same(alone[0][0], self.grids[self.rows[box]])


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit for bit, NaN where NaN (kornia crops a box with a side of 1 pixel to NaN)."""
    return a.shape == b.shape and torch.allclose(a, b, rtol=0.0, atol=0.0, equal_nan=True)


# one table per image size, crop size, dtype, device and autocast state (under autocast kornia's matrix products
# run in the lower precision, so its grids differ)
_CROP_GRIDS: dict[tuple, CropGrids] = {}


def crop_grids(x: torch.Tensor, out_size: tuple[int, int],
               candidates: Callable[[], list[tuple[int, int, int, int]]]) -> CropGrids:
    """The `CropGrids` for crops of images like x to out_size (made on first use)."""
    device_type = x.device.type
    autocast = torch.is_autocast_enabled(device_type) and torch.get_autocast_dtype(device_type)
    key = (tuple(x.shape[-2:]), tuple(out_size), x.dtype, x.device, autocast)
    if key not in _CROP_GRIDS:
        _CROP_GRIDS[key] = CropGrids(tuple(x.shape[-2:]), tuple(out_size), candidates)
    return _CROP_GRIDS[key]


def random_channel_shuffle(x: torch.Tensor, p: float, rng: torch.Generator) -> torch.Tensor:
    n, c = x.shape[:2]
    perm = torch.rand(n, c, generator=rng, device=x.device).argsort(dim=1)
    shuffled = x.gather(1, perm.view(n, c, 1, 1).expand_as(x))
    return torch.where(_bernoulli(n, p, rng, x.device).view(-1, 1, 1, 1), shuffled, x)


def square_crop_boxes(image_size: tuple[int, int], size: int) -> list[tuple[int, int, int, int]]:
    """Every box (x0, y0, w, h) `random_crop_batch` can draw on an image of `image_size`: size x size at every
    position."""
    H, W = image_size
    return [(i, j, size, size) for i in range(W - size + 1) for j in range(H - size + 1)]


def random_crop_batch(x: torch.Tensor, size: int, p: float, rng: torch.Generator) -> torch.Tensor:
    """With probability p decided once for the batch: a random size x size crop of every sample."""
    if not bool(_bernoulli(1, p, rng, x.device).cpu()):  # one draw per batch; batch shape depends on it
        return x
    n, _, H, W = x.shape
    x0 = torch.randint(0, W - size + 1, (n,), generator=rng, device=x.device).float()
    y0 = torch.randint(0, H - size + 1, (n,), generator=rng, device=x.device).float()
    side = torch.full((n,), float(size), device=x.device)
    if crops_from_grids(x.device):
        grids = crop_grids(x, (size, size), lambda: square_crop_boxes((H, W), size))
        return grids.crop(x, torch.stack([x0, y0, side, side], 1))
    from kornia.geometry.transform import crop_and_resize

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
