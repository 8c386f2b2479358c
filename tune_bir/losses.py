"""Batched loss and divergence functions of BI-R and the exaggeration terms (docs/algorithm.md "Losses",
"Memory exaggeration").

Pure tensor functions: no models, no configuration objects, no loops over samples.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

# ----------------------------------------------------------------------------------------------------
# Reconstruction (docs/algorithm.md "Reconstruction loss")


def recon_bce(target: Tensor, recon: Tensor) -> Tensor:
    """Per-sample mean binary cross-entropy of a sigmoid reconstruction, shape [N]
    (docs/algorithm.md "Reconstruction loss")."""
    # torch's BCE clamps log at -100 and guards its gradient, so recon values of exactly 0 or 1 are safe
    return F.binary_cross_entropy(recon, target, reduction="none").flatten(1).mean(1)


def recon_half_mse(target: Tensor, recon: Tensor) -> Tensor:
    """Per-sample mean of 0.5 * squared error, shape [N]; the 0.5 is the reference's "MSE"
    (difference "image-pixel-scale", docs/algorithm.md)."""
    return (0.5 * (target - recon).square()).flatten(1).mean(1)


def recon_bce_from_logits(target: Tensor, logits: Tensor) -> Tensor:
    """`recon_bce(target, sigmoid(logits))` computed from the logits: exact where sigmoid saturates, ~4x faster."""
    return _BCEWithLogitsPerSample.apply(logits, target)


class _BCEWithLogitsPerSample(torch.autograd.Function):
    """Per-sample mean of softplus(x) - t*x, the BCE of sigmoid(x) against t, with its analytic gradient.

    torch's own BCE-with-logits goes through log_sigmoid (and log1p), which the CPU runs element by
    element: 1.5 ms forward for one 256 x 784 batch, a tenth of a splitMNIST step. Here softplus(x) =
    max(x, 0) + log(1 + exp(-|x|)); with exp(-|x|) in (0, 1], log(1 + u) differs from log1p(u) by at
    most fp32 rounding of 1 (6e-8 per pixel), and every op is vectorised (~0.15 ms).
    """

    @staticmethod
    def forward(ctx, logits: Tensor, target: Tensor) -> Tensor:
        x, t = logits.flatten(1), target.flatten(1)
        softplus = torch.exp(-x.abs()).add_(1).log_().add_(x.clamp_min(0))
        ctx.save_for_backward(logits, target)
        return (softplus - t * x).mean(1)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:
        logits, target = ctx.saved_tensors
        scale = (grad / logits[0].numel()).view(-1, *([1] * (logits.dim() - 1)))
        grad_logits = (torch.sigmoid(logits) - target) * scale if ctx.needs_input_grad[0] else None
        grad_target = -logits * scale if ctx.needs_input_grad[1] else None
        return grad_logits, grad_target


RECON_LOSSES = {"BCE": recon_bce, "MSE": recon_half_mse}
# the same losses, taking the decoder's raw output (`BIRModel.decode_raw`) instead of the reconstruction
RECON_LOSSES_FROM_RAW = {"BCE": recon_bce_from_logits, "MSE": recon_half_mse}

# ----------------------------------------------------------------------------------------------------
# Latent densities and the variational term (docs/algorithm.md "Latent and GMM prior", "Variational loss")


def log_normal_diag(z: Tensor, mu: Tensor, logvar: Tensor) -> Tensor:
    """log N(z; mu, exp(logvar)) summed over the last dim, without the -0.5*log(2*pi) constant (notation)."""
    return -0.5 * (logvar + (z - mu).square() * torch.exp(-logvar)).sum(-1)


def component_log_densities(z: Tensor, means: Tensor, logvars: Tensor) -> Tensor:
    """[N, C] `log_normal_diag(z[:, None], means[None], logvars[None])`, with the squared distances as matmuls.

    sum_d (z - m)^2 p = z^2 @ p.T - 2 z @ (m p).T + sum_d m^2 p, with p = exp(-logvar): two [N, D] x [D, C]
    products instead of four elementwise passes over an [N, C, D] tensor (~15 ms of a CIFAR-100 step at
    C = 20). Always fp32, also under bf16 autocast: the expansion cancels, and bf16 would lose whole nats.
    """
    with torch.autocast(z.device.type, enabled=False):
        z = z.to(torch.promote_types(z.dtype, torch.float32))
        precision = torch.exp(-logvars)                                    # [C, D]
        squared = (z.square() @ precision.T - 2 * (z @ (means * precision).T)
                   + (means.square() * precision).sum(1))
        # a sum of squares: the clamp removes the tiny negative values that cancellation can leave
        return -0.5 * (logvars.sum(1) + squared.clamp_min(0))


def gmm_log_prob(z: Tensor, means: Tensor, logvars: Tensor, weights: Tensor) -> Tensor:
    """log sum_c weights[n, c] * N(z_n; means_c, logvars_c), shape [N], shifted and floored as in
    docs/algorithm.md "Latent and GMM prior"."""
    log_density = component_log_densities(z, means, logvars)  # [N, C]
    tiny = torch.finfo(log_density.dtype).tiny
    # Shifting by the largest WEIGHTED term (not by the largest density) keeps a one-hot mixture exact when z
    # lies far closer to a zero-weight mode; the clamp keeps log(0) out of the gradient of zero weights.
    log_weights = torch.where(weights > 0, weights.clamp_min(tiny).log(), -math.inf)
    terms = log_density + log_weights
    shift = terms.amax(1, keepdim=True)
    shift = torch.where(torch.isfinite(shift), shift, log_density.amax(1, keepdim=True))  # all-zero row
    total = torch.exp(terms - shift).sum(1, keepdim=True)
    return (shift + total.clamp_min(1e-40).log()).squeeze(1)


def variational_per_sample(z: Tensor, mu: Tensor, logvar: Tensor, log_prior: Tensor, n_pixels: int) -> Tensor:
    """[N] single-sample KL estimates (log q(z|x) - log p(z)) / n_pixels: IMAGE pixels
    (difference "image-pixel-scale", docs/algorithm.md)."""
    return (log_normal_diag(z, mu, logvar) - log_prior) / n_pixels


def variational_loss(z: Tensor, mu: Tensor, logvar: Tensor, log_prior: Tensor, n_pixels: int) -> Tensor:
    """Mean over the batch of `variational_per_sample` (docs/algorithm.md "Variational loss")."""
    return variational_per_sample(z, mu, logvar, log_prior, n_pixels).mean()


# ----------------------------------------------------------------------------------------------------
# Distillation (docs/algorithm.md "Distillation loss")


def distillation_loss(logits: Tensor, target_logits: Tensor, temperature: float) -> Tensor:
    """T^2 * mean cross-entropy from zero-padded softmax_T(teacher) to log_softmax_T(student)
    (docs/algorithm.md "Distillation loss")."""
    n_active, n_previous = logits.shape[1], target_logits.shape[1]
    if n_previous > n_active:
        raise ValueError(f"teacher has {n_previous} classes but the student only {n_active}")
    # the teacher's scores are targets: no gradient reaches them
    q = F.pad(torch.softmax(target_logits.detach() / temperature, dim=1), (0, n_active - n_previous))
    log_p = F.log_softmax(logits / temperature, dim=1)
    return temperature**2 * -(q * log_p).sum(1).mean()


# ----------------------------------------------------------------------------------------------------
# Divergences between diagonal Gaussians, summed over the last dim; all broadcast
# (docs/algorithm.md "Distribution repulsion")
#
# Finite inputs give a finite divergence AND a finite gradient (difference "divergence-guards",
# docs/algorithm.md): an overflow inside (exp(-lv) of a log-variance near -100) would make the value inf
# and its backward 0 * inf = NaN, which no guard after the divergence (`inverse_clamped`) can stop.
# Log-variances count as clamped to +-LOGVAR_BOUND (exp(2 * 40) = 5.5e34 is still a float32), and every
# per-dim mean-gap term is capped at MEAN_TERM_CAP (a divergence that large has an inverse of 0 anyway);
# a capped or clamped entry passes no gradient. Inside the bounds the numbers are exactly the unguarded ones.
LOGVAR_BOUND = 40.0
MEAN_TERM_CAP = 1e30


def _guard_logvar(lv: Tensor) -> Tensor:
    return lv.clamp(-LOGVAR_BOUND, LOGVAR_BOUND)


def _squared_gap(mu_a: Tensor, mu_b: Tensor) -> Tensor:
    """(mu_a - mu_b)^2, inf (|gap| > 1.8e19 in float32) replaced by the largest finite value."""
    sq = (mu_a - mu_b).square()
    return sq.clamp_max(torch.finfo(sq.dtype).max)


def kl_diag_gauss(mu_a: Tensor, lv_a: Tensor, mu_b: Tensor, lv_b: Tensor) -> Tensor:
    """KL(a || b) between diagonal Gaussians, summed over the last dim
    (docs/algorithm.md "Distribution repulsion")."""
    lv_a, lv_b = _guard_logvar(lv_a), _guard_logvar(lv_b)
    log_ratio = lv_a - lv_b
    # expm1(r) - r is exactly 0 at r = 0: identical inputs give exactly 0 instead of rounding noise
    return 0.5 * (torch.expm1(log_ratio) - log_ratio
                  + (_squared_gap(mu_b, mu_a) * torch.exp(-lv_b)).clamp_max(MEAN_TERM_CAP)).sum(-1)


def _kl_to_midpoint(log_ratio: Tensor, sq_diff: Tensor, lv: Tensor) -> Tensor:
    """Per-dim KL(x || m) with mean_m = mean of the two means and log_ratio = lv_m - lv_x."""
    # expm1(-r) + r is exactly 0 at r = 0: identical inputs give exactly 0 instead of rounding noise
    return 0.5 * (torch.expm1(-log_ratio) + log_ratio
                  + (0.25 * sq_diff * torch.exp(-lv - log_ratio)).clamp_max(MEAN_TERM_CAP))


def _js_with_midpoint(mu_a: Tensor, lv_a: Tensor, mu_b: Tensor, lv_b: Tensor, var_scale: float,
                      mean_gap_scale: float) -> Tensor:
    """0.5*(KL(a||m) + KL(b||m)) with var_m = var_scale*(var_a + var_b) + mean_gap_scale*(mu_a - mu_b)^2."""
    lv_a, lv_b = _guard_logvar(lv_a), _guard_logvar(lv_b)
    sq_diff = _squared_gap(mu_a, mu_b)
    # lv_m - lv_a computed relative to var_a, so that it is exactly log(1) = 0 when a == b. Every op in the
    # order of the unguarded formula: autograd sums a tensor's gradients in an order that follows the order
    # the ops were created in, and the gradients must stay bit-identical to it
    ratio_a = torch.log(var_scale * (1.0 + torch.exp(lv_b - lv_a))
                        + (mean_gap_scale * sq_diff * torch.exp(-lv_a)).clamp_max(MEAN_TERM_CAP))
    ratio_b = torch.log(var_scale * (1.0 + torch.exp(lv_a - lv_b))
                        + (mean_gap_scale * sq_diff * torch.exp(-lv_b)).clamp_max(MEAN_TERM_CAP))
    per_dim = 0.5 * (_kl_to_midpoint(ratio_a, sq_diff, lv_a) + _kl_to_midpoint(ratio_b, sq_diff, lv_b))
    return per_dim.sum(-1)


def js_diag_gauss(mu_a: Tensor, lv_a: Tensor, mu_b: Tensor, lv_b: Tensor) -> Tensor:
    """Jensen-Shannon via the moment-matched mixture ("js"): symmetric, zero iff a == b
    (difference "js-moment-matched", docs/algorithm.md)."""
    return _js_with_midpoint(mu_a, lv_a, mu_b, lv_b, var_scale=0.5, mean_gap_scale=0.25)


def js_ref_diag_gauss(mu_a: Tensor, lv_a: Tensor, mu_b: Tensor, lv_b: Tensor) -> Tensor:
    """The reference's JS formula ("js_ref"): midpoint variance 0.25*(var_a + var_b)
    (difference "js-moment-matched", docs/algorithm.md)."""
    return _js_with_midpoint(mu_a, lv_a, mu_b, lv_b, var_scale=0.25, mean_gap_scale=0.0)


DIVERGENCES = {"kl": kl_diag_gauss, "js": js_diag_gauss, "js_ref": js_ref_diag_gauss}


def inverse_clamped(d: Tensor, d_min: float) -> Tensor:
    """1 / max(d, d_min) elementwise; NaN distances count as d_min and pass no gradient to `d` (what made
    `d` must keep its own backward finite: the divergences above do, difference "divergence-guards")
    (difference "d-min-clamp", docs/algorithm.md)."""
    d = torch.where(torch.isnan(d), torch.full_like(d, d_min), d)
    return d.clamp_min(d_min).reciprocal()


# ----------------------------------------------------------------------------------------------------
# Supervised contrastive learning (docs/algorithm.md "Supervised contrastive replay")


def label_positive_weights(labels: Tensor) -> Tensor:
    """[N, N] float: 1 where labels are equal, 0 elsewhere and on the diagonal."""
    same = labels[:, None] == labels[None, :]
    same.fill_diagonal_(False)
    return same.to(torch.get_default_dtype())


def soft_positive_weights(scores: Tensor, temperature: float) -> Tensor:
    """[N, N] q_i . q_j with q = softmax(scores / T), zero diagonal, values in [0, 1] (--c-scores;
    difference "c-scores-probabilities", docs/algorithm.md)."""
    q = torch.softmax(scores / temperature, dim=1)
    weights = q @ q.T
    return weights.masked_fill(torch.eye(len(q), dtype=torch.bool, device=q.device), 0.0)


def _without_self(weights: Tensor) -> tuple[Tensor, Tensor]:
    """The boolean self mask [N, N] and the weights with their diagonal zeroed."""
    eye = torch.eye(weights.shape[0], dtype=torch.bool, device=weights.device)
    return eye, weights.masked_fill(eye, 0.0)


def _mean_over_positives(log_prob: Tensor, weights: Tensor, temperature: float, base_temperature: float,
                         ) -> Tensor:
    """mean_i -(T / T_base) * sum_j w_ij lp_ij / max(sum_j w_ij, 1e-8)."""
    per_anchor = (weights * log_prob).sum(1) / weights.sum(1).clamp_min(1e-8)
    return -(temperature / base_temperature) * per_anchor.mean()


def supcon_loss(features: Tensor, positive_weights: Tensor, temperature: float,
                base_temperature: float = 0.07) -> Tensor:
    """Supervised contrastive loss on L2-normalised features [N, D], self excluded everywhere
    (docs/algorithm.md "Supervised contrastive replay")."""
    if features.shape[0] < 2:
        return features.sum() * 0.0
    eye, weights = _without_self(positive_weights)
    logits = features @ features.T / temperature
    others = logits.masked_fill(eye, -math.inf)
    # shift by the largest NON-self logit: every denominator is then >= 1 and cannot underflow
    shift = others.amax(1, keepdim=True).detach()
    log_denominator = torch.exp(others - shift).sum(1, keepdim=True).log()
    log_prob = (logits - shift - log_denominator).masked_fill(eye, 0.0)
    return _mean_over_positives(log_prob, weights, temperature, base_temperature)


def hard_negative_supcon_loss(features: Tensor, positive_weights: Tensor, temperature: float,
                              tau_plus: float = 0.05, beta: float = 1.0, base_temperature: float = 0.07) -> Tensor:
    """SupCon with debiased, hardness-reweighted negatives Neg(i) = {j != i : w_ij = 0} (--c-hard;
    difference "c-hard-rows", docs/algorithm.md)."""
    if features.shape[0] < 2:
        return features.sum() * 0.0
    eye, weights = _without_self(positive_weights)
    positive = (weights > 0) & ~eye
    negative = (weights == 0) & ~eye
    n_pos, n_neg = positive.sum(1).to(features.dtype), negative.sum(1).to(features.dtype)
    logits = features @ features.T / temperature
    # The denominator is homogeneous of degree 1 in exp(logits) except for the floor n*exp(-1/T), so shifting
    # each row by its largest non-self logit (and the floor with it) is exact and cannot overflow.
    shift = logits.masked_fill(eye, -math.inf).amax(1, keepdim=True).detach()
    logits = logits - shift
    e = torch.exp(logits.masked_fill(eye, -math.inf))
    # hardness weights e^beta / mean_Neg e^beta, taken relative to the hardest negative so the mean cannot
    # underflow; exp(beta * x) rather than pow() keeps the gradient finite where exp(x) underflows to 0
    neg_logits = logits.masked_fill(~negative, -math.inf)
    hardest = neg_logits.amax(1, keepdim=True)
    hardest = torch.where(torch.isfinite(hardest), hardest, torch.zeros_like(hardest))  # anchors without negatives
    mean_importance = torch.exp(beta * (neg_logits - hardest)).sum(1) / n_neg.clamp_min(1.0)
    reweighted = torch.exp(hardest.squeeze(1)) * torch.exp((beta + 1.0) * (neg_logits - hardest)).sum(1) \
        / torch.where(n_neg > 0, mean_importance, torch.ones_like(mean_importance))
    positive_sum = torch.where(positive, e, torch.zeros_like(e)).sum(1)
    debiased = (reweighted - tau_plus * n_neg * positive_sum / n_pos.clamp_min(1.0)) / (1.0 - tau_plus)
    floor = n_neg * torch.exp(-1.0 / temperature - shift.squeeze(1))
    denominator = positive_sum + torch.maximum(debiased, floor)
    log_prob = (logits - denominator.clamp_min(torch.finfo(e.dtype).tiny).log()[:, None]).masked_fill(eye, 0.0)
    return _mean_over_positives(log_prob, weights, temperature, base_temperature)
