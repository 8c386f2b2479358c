"""The BI-R model: encoder -> classifier, latent (VAE) with per-class GMM prior -> decoder -> sampling.

One network serves as classifier and generator ("replay-through-feedback",
docs/algorithm.md "The model").
Parts are optional so the same class also builds the baselines: a classifier alone
(`--replay=none`) and a separate VAE generator (`--replay=generative` without `--feedback`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from tune_bir.nets import MLP, GatedLinear, linear


@dataclass(frozen=True)
class ModelSpec:
    """Sizes and parts of a BIRModel (derived from the config and the protocol)."""

    in_shape: tuple[int, ...]     # shape of one "hidden" input: 1x28x28 pixels or 256x2x2 conv features
    n_classes: int
    fc_units: int
    fc_layers: int = 3
    z_dim: int = 100
    classifier: bool = True
    decoder: bool = True
    gmm_prior: bool = False        # one prior mode per class (conditional replay)
    dg_prop: float = 0.0           # 0 disables the decoder gates
    output: str = "sigmoid"        # decoder output non-linearity: sigmoid (pixels) or linear (features)

    @property
    def in_units(self) -> int:
        return int(np.prod(self.in_shape))

    @property
    def hidden_sizes(self) -> list[int]:
        # fc-layers 3 -> encoder [in, F, F]; sizes follow linspace(F, h_dim, fc_layers-1) with h_dim = F
        return [self.in_units] + [self.fc_units] * (self.fc_layers - 1)


class BIRModel(nn.Module):
    """Encoder, classifier, VAE latent with standard or per-class GMM prior, gated decoder."""

    def __init__(self, spec: ModelSpec, rng: torch.Generator):
        super().__init__()
        self.spec = spec
        sizes = spec.hidden_sizes
        h_dim = sizes[-1]
        self.fcE = MLP(sizes)
        self.classifier = linear(h_dim, spec.n_classes) if spec.classifier else None
        if spec.decoder:
            self.toZ_mean = linear(h_dim, spec.z_dim)
            self.toZ_logvar = linear(h_dim, spec.z_dim, bias=False)
            down = list(reversed(sizes))  # [F, ..., F, in]
            if spec.dg_prop > 0:
                self.fromZ = GatedLinear(spec.z_dim, down[0], spec.n_classes, spec.dg_prop, rng)
                self.fcD_hidden = nn.ModuleList(
                    GatedLinear(a, b, spec.n_classes, spec.dg_prop, rng)
                    for a, b in zip(down[:-2], down[1:-1], strict=True))
            else:
                self.fromZ = linear(spec.z_dim, down[0])
                self.fcD_hidden = nn.ModuleList(linear(a, b) for a, b in zip(down[:-2], down[1:-1], strict=True))
            self.fcD_out = linear(down[-2], down[-1])
            if spec.gmm_prior:
                self.z_class_means = nn.Parameter(torch.randn(spec.n_classes, spec.z_dim, generator=rng))
                self.z_class_logvars = nn.Parameter(torch.randn(spec.n_classes, spec.z_dim, generator=rng))

    @property
    def gated(self) -> bool:
        return self.spec.decoder and self.spec.dg_prop > 0

    # -- encoder and classifier
    def encode(self, h: torch.Tensor) -> torch.Tensor:
        """Encoder features e = fcE(flatten(h))."""
        return self.fcE(h.flatten(1))

    def encode_keeping_inputs(self, h: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """`encode`, and the input of each of fcE's linear layers (for `MLP.rows_alone`)."""
        return self.fcE.forward_keeping_inputs(h.flatten(1))

    def classify(self, e: torch.Tensor) -> torch.Tensor:
        """Logits over all classes from encoder features (classify "beforeZ")."""
        return self.classifier(e).float()   # fp32 logits even under bf16 autocast (softmax, distillation)

    def predict(self, h: torch.Tensor) -> torch.Tensor:
        return self.classify(self.encode(h))

    # -- latent
    def posterior(self, e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and log-variance of q(z | h)."""
        # fp32 even under bf16 autocast: exp(logvar), the GMM prior and the KL terms need the precision
        return self.toZ_mean(e).float(), self.toZ_logvar(e).float()

    @staticmethod
    def reparameterise(mu: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """z = mu + sigma * eps, the noise drawn by the caller (`latent_noise`) so that the pass stays a pure
        function of its inputs (torch.compile takes it whole)."""
        return mu + torch.exp(0.5 * logvar) * eps

    def latent_noise(self, n: int, rng: torch.Generator, device: torch.device) -> torch.Tensor:
        """The [n, z_dim] noise of a pass of n samples: fp32, as `posterior` is, also under bf16 autocast."""
        return torch.randn((n, self.spec.z_dim), generator=rng, device=device, dtype=torch.float32)

    # -- decoder
    def decode(self, z: torch.Tensor, gate_input: torch.Tensor | None) -> torch.Tensor:
        """Decode z; `gate_input` [N x n_classes] (one-hot or soft class weights) picks the gates."""
        return self.activate(self.decode_raw(z, gate_input))

    def activate(self, raw: torch.Tensor) -> torch.Tensor:
        """The decoder's output non-linearity applied to `decode_raw` (sigmoid for pixels, none for features)."""
        return torch.sigmoid(raw) if self.spec.output == "sigmoid" else raw

    def decode_raw(self, z: torch.Tensor, gate_input: torch.Tensor | None) -> torch.Tensor:
        """The decoder's output before its non-linearity (logits for pixels), shaped like an input."""
        if self.gated:
            a = self.fromZ(z, gate_input)
            for layer in self.fcD_hidden:
                a = layer(a, gate_input)
        else:
            a = torch.relu_(self.fromZ(z))
            for layer in self.fcD_hidden:
                a = torch.relu_(layer(a))
        return self.fcD_out(a).float().view(-1, *self.spec.in_shape)   # fp32 under bf16 autocast too

    # -- sampling (reads the prior parameters directly; never changes train/eval mode,
    # difference "sampling-keeps-mode", docs/algorithm.md)
    def sample_latent(self, classes: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
        """z from the prior: the GMM mode of each class, or N(0, I) for the standard prior."""
        n = classes.shape[0]
        eps = torch.randn(n, self.spec.z_dim, generator=rng, device=classes.device)
        if not self.spec.gmm_prior:
            return eps
        return self.z_class_means[classes] + torch.exp(0.5 * self.z_class_logvars[classes]) * eps

    def generate(self, classes: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
        """Decoded samples of the given classes (gates = one-hot class)."""
        gate = nn.functional.one_hot(classes, self.spec.n_classes).float() if self.gated else None
        return self.decode(self.sample_latent(classes, rng), gate)
