"""Losses and divergences of tune_bir.losses against docs/algorithm.md "Losses", "Latent and GMM prior" and
"Memory exaggeration"."""

import math

import pytest
import torch
import torch.nn.functional as F

from tune_bir import losses

DIVERGENCE_NAMES = sorted(losses.DIVERGENCES)


def _gaussians(n: int, z: int, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(n, z, generator=g, dtype=torch.float64) for _ in range(4))


# ---- reconstruction (docs/algorithm.md "Reconstruction loss")

def test_bce_of_half_target_and_half_recon_is_ln2():
    x = torch.full((3, 1, 4, 4), 0.5)
    torch.testing.assert_close(losses.recon_bce(x, x), torch.full((3,), math.log(2.0)))


def test_half_mse_is_mean_of_half_squared_error_per_sample():
    target = torch.tensor([[1.0, 0.0], [2.0, 2.0]])
    recon = torch.tensor([[0.5, 0.5], [0.0, 2.0]])
    torch.testing.assert_close(losses.recon_half_mse(target, recon), torch.tensor([0.125, 1.0]))


def test_half_mse_of_identical_inputs_is_zero():
    x = torch.randn(4, 256, 2, 2)
    assert torch.equal(losses.recon_half_mse(x, x.clone()), torch.zeros(4))


def test_bce_is_finite_with_gradient_at_recon_zero_and_one():
    target = torch.tensor([[1.0, 0.0, 1.0, 0.0]])
    recon = torch.tensor([[0.0, 1.0, 1.0, 0.0]], requires_grad=True)
    value = losses.recon_bce(target, recon)
    value.sum().backward()
    assert torch.isfinite(value).all() and torch.isfinite(recon.grad).all()
    assert value.item() == pytest.approx(50.0)  # two terms at torch's log clamp of -100, averaged over 4


def test_recon_losses_registry_names():
    assert losses.RECON_LOSSES == {"BCE": losses.recon_bce, "MSE": losses.recon_half_mse}
    assert losses.RECON_LOSSES_FROM_RAW == {"BCE": losses.recon_bce_from_logits, "MSE": losses.recon_half_mse}


def test_bce_from_logits_equals_bce_of_the_sigmoid_with_the_same_gradient():
    g = torch.Generator().manual_seed(0)
    target = torch.rand(6, 1, 4, 4, generator=g)
    logits = (4 * torch.randn(6, 1, 4, 4, generator=g)).requires_grad_()
    via_logits = losses.recon_bce_from_logits(target, logits)
    (grad_logits,) = torch.autograd.grad(via_logits.sum(), logits)
    via_sigmoid = losses.recon_bce(target, torch.sigmoid(logits))
    (grad_sigmoid,) = torch.autograd.grad(via_sigmoid.sum(), logits)
    torch.testing.assert_close(via_logits, via_sigmoid)
    torch.testing.assert_close(grad_logits, grad_sigmoid)
    # where the sigmoid saturates in float32, the logits form stays exact instead of hitting the log clamp
    assert losses.recon_bce_from_logits(torch.zeros(1, 1), torch.full((1, 1), 30.0)).item() == pytest.approx(30.0)


def test_bce_from_logits_matches_torch_in_float64_with_both_gradients():
    g = torch.Generator().manual_seed(1)
    logits = (6 * torch.randn(5, 1, 3, 3, generator=g, dtype=torch.float64)).requires_grad_()
    target = torch.rand(5, 1, 3, 3, generator=g, dtype=torch.float64).requires_grad_()
    expected = F.binary_cross_entropy_with_logits(logits, target, reduction="none").flatten(1).mean(1)
    torch.testing.assert_close(losses.recon_bce_from_logits(target, logits), expected, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(losses.recon_bce_from_logits, (target, logits))


def test_bce_from_logits_float32_is_within_rounding_of_torch():
    g = torch.Generator().manual_seed(2)
    logits, target = 8 * torch.randn(64, 784, generator=g), torch.rand(64, 784, generator=g)
    expected = F.binary_cross_entropy_with_logits(logits.double(), target.double(), reduction="none").mean(1)
    assert (losses.recon_bce_from_logits(target, logits).double() - expected).abs().max() < 1e-6


# ---- latent densities (docs/algorithm.md "Latent and GMM prior", "Variational loss")

def test_log_normal_diag_is_torch_log_prob_without_the_constant():
    z, mu, lv, _ = _gaussians(5, 7, seed=0)
    expected = torch.distributions.Normal(mu, torch.exp(0.5 * lv)).log_prob(z).sum(-1) + 3.5 * math.log(2 * math.pi)
    torch.testing.assert_close(losses.log_normal_diag(z, mu, lv), expected)


def test_log_normal_diag_broadcasts_samples_against_components():
    z, means, lvs, _ = _gaussians(4, 3, seed=1)
    out = losses.log_normal_diag(z[:, None], means[None, :3], lvs[None, :3])
    assert out.shape == (4, 3)
    torch.testing.assert_close(out[2, 1], losses.log_normal_diag(z[2], means[1], lvs[1]))


def test_gmm_with_one_hot_weights_equals_hard_log_likelihood():
    z, _, _, _ = _gaussians(6, 5, seed=2)
    means, lvs = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3, 1, 0])
    soft = losses.gmm_log_prob(z, means, lvs, F.one_hot(y, 4).double())
    torch.testing.assert_close(soft, losses.log_normal_diag(z, means[y], lvs[y]))


def test_gmm_with_zero_weights_equals_mixture_of_the_weighted_modes():
    z, _, _, _ = _gaussians(5, 3, seed=3)
    means, lvs = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    weights = torch.tensor([[0.3, 0.0, 0.7, 0.0]] * 5, dtype=torch.float64)
    kept = [0, 2]
    expected = torch.logsumexp(losses.log_normal_diag(z[:, None], means[kept], lvs[kept])
                               + weights[:, kept].log(), dim=1)
    torch.testing.assert_close(losses.gmm_log_prob(z, means, lvs, weights), expected)


def test_gmm_far_away_sample_is_finite_and_exact_for_one_hot():
    means = torch.tensor([[0.0, 0.0], [50.0, 50.0]], requires_grad=True)
    lvs = torch.zeros(2, 2, requires_grad=True)
    z = torch.tensor([[49.0, 50.0], [1e3, -1e3]])
    # sample 0 sits on the zero-weight mode, 70 nats above its own: the shift must not underflow it
    weights = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    out = losses.gmm_log_prob(z, means, lvs, weights)
    out.sum().backward()
    assert torch.isfinite(out).all()
    assert out[0].item() == pytest.approx(-0.5 * (49.0**2 + 50.0**2))
    assert torch.isfinite(means.grad).all() and torch.isfinite(lvs.grad).all()


def test_gmm_gradient_is_finite_for_zero_weight_components():
    z = torch.randn(3, 4)
    means = torch.randn(3, 4, requires_grad=True)
    weights = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.5, 0.5], [0.2, 0.0, 0.8]], requires_grad=True)
    losses.gmm_log_prob(z, means, torch.zeros(3, 4), weights).sum().backward()
    assert torch.isfinite(means.grad).all() and torch.isfinite(weights.grad).all()


def test_variational_loss_is_mean_log_ratio_over_pixels():
    z, mu, lv, log_prior = _gaussians(4, 3, seed=4)
    log_prior = log_prior[:, 0]
    expected = (losses.log_normal_diag(z, mu, lv) - log_prior).mean() / 3072
    torch.testing.assert_close(losses.variational_loss(z, mu, lv, log_prior, 3072), expected)


# ---- distillation (docs/algorithm.md "Distillation loss")

def test_distillation_padded_target_columns_are_zero():
    # d loss / d logits = T/N * (softmax_T(logits) - q): columns >= K must carry q = 0
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(8, 6, generator=g, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(8, 4, generator=g, dtype=torch.float64)
    T, n = 2.0, logits.shape[0]
    losses.distillation_loss(logits, teacher, T).backward()
    q = torch.softmax(logits.detach() / T, dim=1) - logits.grad * n / T
    torch.testing.assert_close(q[:, 4:], torch.zeros(8, 2, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(q[:, :4], torch.softmax(teacher / T, dim=1))


def test_distillation_equals_t_squared_cross_entropy_of_padded_distributions():
    g = torch.Generator().manual_seed(6)
    logits, teacher, T = torch.randn(5, 10, generator=g), torch.randn(5, 7, generator=g), 2.0
    padded = torch.cat([torch.softmax(teacher / T, dim=1), torch.zeros(5, 3)], dim=1)
    expected = T**2 * F.cross_entropy(logits / T, padded)
    torch.testing.assert_close(losses.distillation_loss(logits, teacher, T), expected)


def test_distillation_gradient_vanishes_when_student_equals_teacher():
    teacher = torch.randn(4, 5, dtype=torch.float64)
    student = teacher.clone().requires_grad_(True)
    losses.distillation_loss(student, teacher, 2.0).backward()
    torch.testing.assert_close(student.grad, torch.zeros_like(student), atol=1e-12, rtol=0)


def test_distillation_rejects_more_teacher_classes_than_student_classes():
    with pytest.raises(ValueError):
        losses.distillation_loss(torch.randn(2, 3), torch.randn(2, 4), 2.0)


# ---- divergences (docs/algorithm.md "Distribution repulsion")

@pytest.mark.parametrize(("mu_b", "lv_b", "per_dim"), [(1.0, 0.0, 0.5), (0.0, 1.0, 0.5 * math.exp(-1.0))])
def test_kl_test_vectors_summed_over_dims(mu_b, lv_b, per_dim):
    z = 100
    zeros = torch.zeros(z)
    d = losses.kl_diag_gauss(zeros, zeros, torch.full((z,), mu_b), torch.full((z,), lv_b))
    assert d.item() == pytest.approx(z * per_dim, rel=1e-6)


def test_kl_matches_torch_distributions_for_random_gaussians():
    mu_a, lv_a, mu_b, lv_b = _gaussians(6, 5, seed=7)
    normal = torch.distributions.Normal
    expected = torch.distributions.kl_divergence(
        normal(mu_a, torch.exp(0.5 * lv_a)), normal(mu_b, torch.exp(0.5 * lv_b))).sum(-1)
    torch.testing.assert_close(losses.kl_diag_gauss(mu_a, lv_a, mu_b, lv_b), expected)


@pytest.mark.parametrize("name", ["kl", "js"])
def test_divergence_of_identical_gaussians_is_exactly_zero(name):
    mu, lv, _, _ = _gaussians(5, 100, seed=8)
    assert torch.equal(losses.DIVERGENCES[name](mu, lv, mu, lv), torch.zeros(5, dtype=torch.float64))


def test_js_ref_of_identical_gaussians_is_0_153426_per_dim():
    z = 100
    mu, lv = torch.randn(3, z) * 3, torch.randn(3, z) * 3
    d = losses.js_ref_diag_gauss(mu, lv, mu, lv)
    # 0.153426 = (1 - ln 2) / 2, to the digits the test's name gives
    torch.testing.assert_close(d, torch.full((3,), 0.153426 * z), atol=1e-5 * z, rtol=0)


@pytest.mark.parametrize("name", ["js", "js_ref"])
def test_js_is_symmetric(name):
    mu_a, lv_a, mu_b, lv_b = _gaussians(6, 5, seed=9)
    d = losses.DIVERGENCES[name]
    assert torch.equal(d(mu_a, lv_a, mu_b, lv_b), d(mu_b, lv_b, mu_a, lv_a))


def test_js_equals_moment_matched_definition():
    mu_a, lv_a, mu_b, lv_b = _gaussians(6, 5, seed=10)
    mu_m = 0.5 * (mu_a + mu_b)
    lv_m = torch.log(0.5 * (lv_a.exp() + lv_b.exp()) + 0.25 * (mu_a - mu_b) ** 2)
    expected = 0.5 * (losses.kl_diag_gauss(mu_a, lv_a, mu_m, lv_m) + losses.kl_diag_gauss(mu_b, lv_b, mu_m, lv_m))
    torch.testing.assert_close(losses.js_diag_gauss(mu_a, lv_a, mu_b, lv_b), expected)
    assert (expected > 0).all()


def test_js_ref_equals_reference_definition():
    mu_a, lv_a, mu_b, lv_b = _gaussians(6, 5, seed=11)
    mu_m, lv_m = 0.5 * (mu_a + mu_b), torch.log(0.25 * (lv_a.exp() + lv_b.exp()))
    expected = 0.5 * (losses.kl_diag_gauss(mu_a, lv_a, mu_m, lv_m) + losses.kl_diag_gauss(mu_b, lv_b, mu_m, lv_m))
    torch.testing.assert_close(losses.js_ref_diag_gauss(mu_a, lv_a, mu_b, lv_b), expected)


@pytest.mark.parametrize("name", DIVERGENCE_NAMES)
def test_divergences_broadcast_anchors_against_targets(name):
    mu, lv, _, _ = _gaussians(4, 3, seed=12)
    out = losses.DIVERGENCES[name](mu[:, None], lv[:, None], mu[None, :2], lv[None, :2])
    assert out.shape == (4, 2)
    torch.testing.assert_close(out[3, 1], losses.DIVERGENCES[name](mu[3], lv[3], mu[1], lv[1]))


@pytest.mark.parametrize("name", DIVERGENCE_NAMES)
@pytest.mark.parametrize("lv_scale", [1.0, 20.0])
def test_divergences_are_finite_for_large_and_small_logvars(name, lv_scale):
    mu_a, lv_a, mu_b, lv_b = _gaussians(8, 10, seed=13)
    lv_a, lv_b = (lv_a.clamp(-1, 1) * lv_scale).float().requires_grad_(), (lv_b.clamp(-1, 1) * lv_scale).float()
    d = losses.DIVERGENCES[name](mu_a.float(), lv_a, mu_b.float(), lv_b)
    d.sum().backward()
    assert torch.isfinite(d).all() and (d >= 0).all() and torch.isfinite(lv_a.grad).all()


@pytest.mark.parametrize("name", DIVERGENCE_NAMES)
@pytest.mark.parametrize("moved", ["a", "b"])
def test_sgd_step_on_inverse_divergence_pushes_means_apart(name, moved):
    mu_a, lv_a, mu_b, lv_b = _gaussians(1, 5, seed=14)
    divergence = losses.DIVERGENCES[name]
    mu = (mu_a if moved == "a" else mu_b).clone().requires_grad_(True)

    def d(m: torch.Tensor) -> torch.Tensor:
        return divergence(m, lv_a, mu_b, lv_b) if moved == "a" else divergence(mu_a, lv_a, m, lv_b)

    before = d(mu).detach()
    losses.inverse_clamped(d(mu), 1e-3).sum().backward()
    assert torch.isfinite(mu.grad).all() and mu.grad.abs().sum() > 0
    after = d(mu.detach() - 1e-2 * mu.grad)
    assert (after > before).all()


@pytest.mark.parametrize("name", DIVERGENCE_NAMES)
def test_inverse_divergence_is_finite_for_identical_gaussians(name):
    mu = torch.randn(3, 5, requires_grad=True)
    lv = torch.randn(3, 5)
    inv = losses.inverse_clamped(losses.DIVERGENCES[name](mu, lv, mu.detach(), lv), 1e-3)
    inv.sum().backward()
    assert torch.isfinite(inv).all() and torch.isfinite(mu.grad).all()
    if name != "js_ref":  # js_ref never reaches 0 (0.1534 per dim)
        torch.testing.assert_close(inv, torch.full((3,), 1e3))


def _unguarded_kl(mu_a, lv_a, mu_b, lv_b):
    """The KL formula without the guards: the case the guards exist for must break it."""
    log_ratio = lv_a - lv_b
    return 0.5 * (torch.expm1(log_ratio) - log_ratio + (mu_b - mu_a).square() * torch.exp(-lv_b)).sum(-1)


def _unguarded_js(mu_a, lv_a, mu_b, lv_b, var_scale=0.5, mean_gap_scale=0.25):
    """The JS formulas (js; js_ref with var_scale=0.25, mean_gap_scale=0) without the guards."""
    def kl_to_midpoint(log_ratio, sq_diff, lv):
        return 0.5 * (torch.expm1(-log_ratio) + log_ratio + 0.25 * sq_diff * torch.exp(-lv - log_ratio))

    sq_diff = (mu_a - mu_b).square()
    ratio_a = torch.log(var_scale * (1.0 + torch.exp(lv_b - lv_a)) + mean_gap_scale * sq_diff * torch.exp(-lv_a))
    ratio_b = torch.log(var_scale * (1.0 + torch.exp(lv_a - lv_b)) + mean_gap_scale * sq_diff * torch.exp(-lv_b))
    return (0.5 * (kl_to_midpoint(ratio_a, sq_diff, lv_a) + kl_to_midpoint(ratio_b, sq_diff, lv_b))).sum(-1)


UNGUARDED = {"kl": _unguarded_kl, "js": _unguarded_js,
             "js_ref": lambda *args: _unguarded_js(*args, var_scale=0.25, mean_gap_scale=0.0)}


def _posteriors_from_parameters(logvar_bias: float) -> tuple[torch.nn.Linear, torch.Tensor, torch.Tensor]:
    """A layer (the parameters) and its finite posterior (mu, logvar) [4, 6] with log-variances near logvar_bias."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(3, 12)
    with torch.no_grad():
        layer.bias[6:] = logvar_bias
    mu, lv = layer(torch.randn(4, 3)).split(6, dim=1)
    assert torch.isfinite(mu).all() and torch.isfinite(lv).all()
    return layer, mu, lv


@pytest.mark.parametrize("name", DIVERGENCE_NAMES)
@pytest.mark.parametrize("logvar_bias", [-100.0, 100.0, -1e4])
@pytest.mark.parametrize("target", ["same_mean", "other_mean", "huge_mean_gap"])
def test_gradient_of_inverse_divergence_stays_finite_for_extreme_finite_posteriors(name, logvar_bias, target):
    # exp(-logvar) overflows float32 at logvar < -88.7: unguarded, the value is inf (or NaN where the means
    # agree) and the backward multiplies 0 by inf, so NaN reaches the parameters whatever inverse_clamped does
    layer, mu, lv = _posteriors_from_parameters(logvar_bias)
    shift = {"same_mean": 0.0, "other_mean": 1.0, "huge_mean_gap": 1e20}[target]
    mu_t, lv_t = mu.detach() + shift, lv.detach().flip(0)
    d = losses.DIVERGENCES[name](mu[:, None], lv[:, None], mu_t[None, :2], lv_t[None, :2])
    (1e8 * losses.inverse_clamped(d, 1e-3)).sum().backward()   # the largest weight the repulsion space searches
    assert not torch.isnan(d).any()
    for param in layer.parameters():
        assert torch.isfinite(param.grad).all(), (name, logvar_bias, target)


def test_the_unguarded_formula_does_send_nan_into_the_gradient_there():
    layer, mu, lv = _posteriors_from_parameters(-100.0)
    d = _unguarded_kl(mu[:, None], lv[:, None], mu.detach()[None, :2], lv.detach()[None, :2])
    losses.inverse_clamped(d, 1e-3).sum().backward()
    assert not torch.isfinite(d).all() and torch.isnan(layer.bias.grad).any()


@pytest.mark.parametrize("name", DIVERGENCE_NAMES)
@pytest.mark.parametrize("targets", ["broadcast", "per_anchor"])
def test_divergence_guards_change_nothing_inside_their_bounds(name, targets):
    # the bounds are far outside any working posterior: values AND gradients equal the unguarded ones bit for
    # bit (the golden runs depend on it; the order of autograd's gradient sums follows the order of the ops)
    mu_a, lv_a, mu_b, lv_b = (t.float().mul(8).requires_grad_() for t in _gaussians(16, 32, seed=21))
    assert lv_a.abs().max() < losses.LOGVAR_BOUND and lv_b.abs().max() < losses.LOGVAR_BOUND
    pairs = ((mu_a[:, None], lv_a[:, None], mu_b[None, :3], lv_b[None, :3]) if targets == "broadcast" else
             (mu_a[:, None], lv_a[:, None], torch.stack([mu_b, mu_b.flip(0)], 1), torch.stack([lv_b, lv_a], 1)))
    results = []
    for divergence in (losses.DIVERGENCES[name], UNGUARDED[name]):
        d = divergence(*pairs)
        results.append((d, torch.autograd.grad(losses.inverse_clamped(d, 1e-3).sum(), (mu_a, lv_a, mu_b, lv_b))))
    (d, grads), (d_ref, ref_grads) = results
    assert torch.equal(d, d_ref)
    assert all(torch.equal(g, r) for g, r in zip(grads, ref_grads, strict=True))


def test_inverse_clamped_floors_small_negative_and_nan_distances():
    d = torch.tensor([2.0, 1e-6, 0.0, -1.0, float("nan"), float("inf")], requires_grad=True)
    inv = losses.inverse_clamped(d, 1e-3)
    inv.sum().backward()
    torch.testing.assert_close(inv.detach(), torch.tensor([0.5, 1e3, 1e3, 1e3, 1e3, 0.0]))
    assert torch.isfinite(d.grad).all() and d.grad[0].item() == pytest.approx(-0.25)
    assert d.grad[1:5].abs().sum() == 0


# ---- supervised contrastive (docs/algorithm.md "Supervised contrastive replay")

def _two_orthogonal_samples_two_views() -> torch.Tensor:
    return torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])


@pytest.mark.parametrize(("labels", "expected"), [([0, 1], 7.87778), ([0, 0], 17.40159)])
def test_supcon_hand_examples(labels, expected):
    y = torch.tensor(labels)
    weights = losses.label_positive_weights(torch.cat([y, y])[[0, 2, 1, 3]])  # rows: s0 v1, s0 v2, s1 v1, s1 v2
    value = losses.supcon_loss(_two_orthogonal_samples_two_views(), weights, temperature=1.0)
    assert value.item() == pytest.approx(expected, abs=1e-4)
    if labels == [0, 1]:
        assert value.item() == pytest.approx((math.log(math.e + 2) - 1) / 0.07, abs=1e-5)


def test_supcon_equals_straightforward_computation():
    g = torch.Generator().manual_seed(15)
    features = F.normalize(torch.randn(6, 4, generator=g, dtype=torch.float64), dim=1)
    weights = losses.soft_positive_weights(torch.randn(6, 3, generator=g, dtype=torch.float64), 2.0)
    tau = 0.5
    expected = 0.0
    for i in range(6):
        others = [k for k in range(6) if k != i]
        log_den = torch.log(sum(torch.exp(features[i] @ features[k] / tau) for k in others))
        lp = [features[i] @ features[j] / tau - log_den for j in others]
        expected += -(tau / 0.07) * sum(weights[i, j] * lp[n] for n, j in enumerate(others)) / weights[i].sum()
    torch.testing.assert_close(losses.supcon_loss(features, weights, tau), expected / 6)


def test_label_positive_weights_match_labels_with_zero_diagonal():
    w = losses.label_positive_weights(torch.tensor([3, 1, 3, 3]))
    expected = torch.tensor([[0, 0, 1, 1], [0, 0, 0, 0], [1, 0, 0, 1], [1, 0, 1, 0]], dtype=torch.float32)
    assert torch.equal(w, expected)


def test_hard_label_positives_per_anchor_at_least_one_with_both_views():
    y = torch.randint(0, 10, (32,))
    w = losses.label_positive_weights(torch.cat([y, y]))
    assert (w.sum(1) >= 1).all()


def test_soft_positive_weights_are_probabilities_products_with_zero_diagonal():
    scores = torch.randn(12, 5) * 10
    w = losses.soft_positive_weights(scores, 2.0)
    assert (w >= 0).all() and (w <= 1).all() and torch.equal(w.diagonal(), torch.zeros(12))
    q = torch.softmax(scores / 2.0, dim=1)
    torch.testing.assert_close(w[0, 1], q[0] @ q[1])


def _hard_negative_reference(features, weights, tau, tau_plus, beta, base):
    """Per-anchor loops over the --c-hard formula (docs/algorithm.md "Supervised contrastive replay"), with
    unshifted exponentials."""
    n = features.shape[0]
    e = torch.exp(features @ features.T / tau)
    total = 0.0
    for i in range(n):
        pos = [j for j in range(n) if j != i and weights[i, j] > 0]
        neg = [j for j in range(n) if j != i and weights[i, j] == 0]
        mean_imp = sum(e[i, k] ** beta for k in neg) / len(neg)
        reweighted = sum(e[i, k] ** beta / mean_imp * e[i, k] for k in neg)
        pos_mean = sum(e[i, p] for p in pos) / len(pos)
        ng = max((reweighted - tau_plus * len(neg) * pos_mean) / (1 - tau_plus), len(neg) * math.exp(-1 / tau))
        log_den = torch.log(sum(e[i, p] for p in pos) + ng)
        total += -(tau / base) * sum(weights[i, j] * (torch.log(e[i, j]) - log_den) for j in pos) / weights[i].sum()
    return total / n


@pytest.mark.parametrize("beta", [1.0, 0.5])
def test_hard_negative_supcon_equals_straightforward_computation(beta):
    g = torch.Generator().manual_seed(16)
    features = F.normalize(torch.randn(8, 5, generator=g, dtype=torch.float64), dim=1)
    y = torch.tensor([0, 1, 2, 1])
    weights = losses.label_positive_weights(torch.cat([y, y]))
    value = losses.hard_negative_supcon_loss(features, weights, 0.5, tau_plus=0.05, beta=beta)
    assert torch.isfinite(value)
    torch.testing.assert_close(value, _hard_negative_reference(features, weights, 0.5, 0.05, beta, 0.07))


def test_hard_negative_floor_applies_when_debiased_sum_is_small():
    # all negatives orthogonal but positives identical: the debiased estimate falls below n*exp(-1/tau)
    features = torch.tensor([[1.0, 0.0]] * 4 + [[0.0, 1.0]] * 2, dtype=torch.float64)
    weights = losses.label_positive_weights(torch.tensor([0, 0, 0, 0, 1, 1]))
    value = losses.hard_negative_supcon_loss(features, weights, 1.0, tau_plus=0.5)
    torch.testing.assert_close(value, _hard_negative_reference(features, weights, 1.0, 0.5, 1.0, 0.07))


@pytest.mark.parametrize("loss_fn", [losses.supcon_loss, losses.hard_negative_supcon_loss])
@pytest.mark.parametrize("weights_kind", ["labels", "soft"])
def test_contrastive_losses_have_no_nan_with_constant_features(loss_fn, weights_kind):
    features = F.normalize(torch.ones(6, 4), dim=1).requires_grad_(True)
    if weights_kind == "labels":
        weights = losses.label_positive_weights(torch.tensor([0, 1, 2, 0, 1, 2]))
    else:
        weights = losses.soft_positive_weights(torch.randn(6, 3), 2.0)
    value = loss_fn(features, weights, 1.0)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(features.grad).all()


@pytest.mark.parametrize("loss_fn", [losses.supcon_loss, losses.hard_negative_supcon_loss])
def test_contrastive_losses_are_finite_at_low_temperature(loss_fn):
    features = F.normalize(torch.randn(16, 8), dim=1).requires_grad_(True)
    weights = losses.label_positive_weights(torch.arange(8).repeat(2))
    value = loss_fn(features, weights, 0.005)  # self logit minus the shift would overflow exp()
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(features.grad).all()


@pytest.mark.parametrize("loss_fn", [losses.supcon_loss, losses.hard_negative_supcon_loss])
def test_contrastive_losses_of_a_single_anchor_are_zero(loss_fn):
    features = torch.tensor([[1.0, 0.0]], requires_grad=True)
    value = loss_fn(features, torch.zeros(1, 1), 1.0)
    value.backward()
    assert value.item() == 0.0 and torch.equal(features.grad, torch.zeros(1, 2))


def test_component_log_densities_match_the_broadcast_form_and_its_gradient():
    g = torch.Generator().manual_seed(7)
    z = (3 * torch.randn(64, 100, generator=g, dtype=torch.float64)).requires_grad_()
    means = torch.randn(20, 100, generator=g, dtype=torch.float64).requires_grad_()
    lvs = torch.randn(20, 100, generator=g, dtype=torch.float64).requires_grad_()
    fast = losses.component_log_densities(z, means, lvs)
    slow = losses.log_normal_diag(z[:, None], means[None], lvs[None])
    torch.testing.assert_close(fast, slow)
    cotangent = torch.randn(64, 20, generator=g, dtype=torch.float64)
    grads_fast = torch.autograd.grad(fast, (z, means, lvs), cotangent)
    grads_slow = torch.autograd.grad(slow, (z, means, lvs), cotangent)
    for a, b in zip(grads_fast, grads_slow, strict=True):
        torch.testing.assert_close(a, b)


def test_component_log_densities_stay_fp32_under_bf16_autocast():
    g = torch.Generator().manual_seed(8)
    z, means, lvs = (torch.randn(32, 100, generator=g), torch.randn(10, 100, generator=g),
                     torch.randn(10, 100, generator=g))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = losses.component_log_densities(z, means, lvs)
    assert out.dtype == torch.float32
    # bf16 matmuls would be off by whole nats here; fp32 stays within float rounding of the float64 form
    exact = losses.log_normal_diag(z.double()[:, None], means.double()[None], lvs.double()[None])
    assert (out.double() - exact).abs().max().item() < 1e-2
