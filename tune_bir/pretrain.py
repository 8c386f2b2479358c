"""`python -m tune_bir.pretrain --experiment CIFAR10`: pre-train the conv layers used by CIFAR-100 BI-R.

Recipe of docs/algorithm.md "Pre-trained conv layers": conv layers C3-5x16-bn + fc 1024-2000-2000 + linear
to 10 classes, cross-entropy, Adam(1e-4), batch 256, 100 epochs, random crop (symmetric padding 4) + horizontal flip.
Only the conv layers are kept: `{'state': state_dict}` at ./models/conv-CIFAR10.pt by default.
"""

from __future__ import annotations

import sys
from pathlib import Path

PROG = "python -m tune_bir.pretrain"


def build_parser():
    from tune_bir.cli import OneLineArgumentParser

    p = OneLineArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("--experiment", default="CIFAR10", choices=["CIFAR10"], help="pre-training data set")
    p.add_argument("--epochs", type=int, default=100, help="epochs over the training set (default 100)")
    p.add_argument("--max-iters", type=int, default=0, help="stop after this many iterations (0 = no limit)")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default="./data")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="./models/conv-CIFAR10.pt", help="where the conv layers are written")
    p.add_argument("--aux-decoder", action="store_true",
                   help="also fit the auxiliary decoder (conv features -> image) used by --aux-decoder trained")
    return p


def check_args(args) -> None:
    """Every value in range and the output writable, before the data is read and 100 epochs are spent."""
    import math
    import os

    from tune_bir.config import check_device
    from tune_bir.errors import ConfigError

    for name in ("epochs", "batch"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.max_iters < 0:
        raise ConfigError(f"--max-iters must be >= 0 (0 = no limit), got {args.max_iters}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise ConfigError(f"--lr must be > 0, got {args.lr}")
    check_device(args.device)
    out = Path(args.out).expanduser().resolve()
    if out.is_dir():
        raise ConfigError(f"--out {args.out} is a folder; give the file to write, e.g. {args.out}/conv-CIFAR10.pt")
    existing = out.parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        what = "is a file, not a folder" if not existing.is_dir() else "is not writable"
        raise ConfigError(f"--out {args.out}: {existing} {what}; choose another --out")


def symmetric_pad(x, pad: int):
    """Mirror padding that repeats the edge pixel (torchvision's 'symmetric'), on the last two dims."""
    import torch

    x = torch.cat([x[..., :pad].flip(-1), x, x[..., -pad:].flip(-1)], dim=-1)
    return torch.cat([x[..., :pad, :].flip(-2), x, x[..., -pad:, :].flip(-2)], dim=-2)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_args(args)
    import kornia.augmentation as K
    import torch
    from torch import nn
    from tqdm import tqdm

    from tune_bir.data import load_protocol
    from tune_bir.device import resolve_device
    from tune_bir.nets import MLP, ConvLayers, adam, linear

    device = resolve_device(args.device)
    out = Path(args.out).expanduser().resolve()
    protocol = load_protocol("CIFAR10", data_dir=args.data_dir, seed=args.seed)
    torch.manual_seed(args.seed)
    conv = ConvLayers().to(device)
    head = nn.Sequential(nn.Flatten(), MLP([conv.out_units, 2000, 2000]), linear(2000, 10)).to(device)
    model = nn.Sequential(conv, head)
    optimizer = adam(model.parameters(), args.lr, device)
    augment = nn.Sequential(K.RandomCrop((32, 32)), K.RandomHorizontalFlip()).to(device)
    x_train, y_train = protocol.train[0].x, protocol.train[0].y
    rng = torch.Generator().manual_seed(args.seed)
    iters_per_epoch = len(y_train) // args.batch
    total = args.epochs * iters_per_epoch
    if args.max_iters:
        total = min(total, args.max_iters)
    model.train()
    with tqdm(total=total, desc="pre-training conv layers", unit="it", file=sys.stdout) as bar:
        it = 0
        while it < total:
            perm = torch.randperm(len(y_train), generator=rng)
            for b in range(iters_per_epoch):
                if it >= total:
                    break
                idx = perm[b * args.batch:(b + 1) * args.batch]
                x = augment(symmetric_pad(x_train[idx].to(device), 4))
                loss = nn.functional.cross_entropy(model(x), y_train[idx].to(device))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                it += 1
                bar.update(1)
                if it % 50 == 0:
                    bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    x_test, y_test = protocol.test[0].x, protocol.test[0].y
    with torch.no_grad():
        correct = sum(int((model(x_test[i:i + 1000].to(device)).argmax(1).cpu() == y_test[i:i + 1000]).sum())
                      for i in range(0, len(y_test), 1000))
    blob = {"state": {k: v.cpu() for k, v in conv.state_dict().items()}}
    if args.aux_decoder:
        blob["aux_decoder"] = fit_aux_decoder(conv, x_train, total, args, device, rng)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(blob, out)
    print(f"CIFAR-10 test accuracy {correct / len(y_test):.4f} after {total} iterations")
    print(f"conv layers written to {out}")
    return 0


def fit_aux_decoder(conv, x_train, total: int, args, device, rng) -> dict:
    """Fit D_aux to map frozen conv features back to the (normalised) image, MSE (docs/algorithm.md "Second views")."""
    import torch
    from tqdm import tqdm

    from tune_bir.augment import AuxDecoder
    from tune_bir.nets import adam

    conv.eval().requires_grad_(False)
    decoder = AuxDecoder().to(device).train()
    optimizer = adam(decoder.parameters(), args.lr * 10, device)
    for _ in tqdm(range(total), desc="fitting auxiliary decoder", unit="it", file=sys.stdout):
        idx = torch.randint(0, len(x_train), (args.batch,), generator=rng)
        x = x_train[idx].to(device)
        with torch.no_grad():
            h = conv(x)
        loss = torch.nn.functional.mse_loss(decoder(h), x)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return {k: v.cpu() for k, v in decoder.state_dict().items()}


if __name__ == "__main__":
    from tune_bir.cli import run_main

    sys.exit(run_main(PROG, main))
