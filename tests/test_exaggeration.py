"""Memory-exaggeration terms: shared replay state, masks, gradient directions, numerics
(docs/algorithm.md "Memory exaggeration")."""

import itertools
import math
import random

import pytest
import torch

from tune_bir import augment, losses
from tune_bir.augment import augment_cifar, augment_mnist
from tune_bir.config import BIRConfig
from tune_bir.engine import Engine
from tune_bir.errors import ConfigError
from tune_bir.exaggeration import DistributionRepulsion, ReconAttraction, ReconRepulsion
from tune_bir.replay_batch import ReplayBatch, ReplayState

Z = 4


def scores_for(own: list[int], second: list[int], k: int = 4, gap: float = 1.0) -> torch.Tensor:
    """Scores whose top-1 is `own` and top-2 is `second` (gap in logits between them)."""
    s = torch.zeros(len(own), k) - 5.0
    s[torch.arange(len(own)), torch.tensor(own)] = gap
    s[torch.arange(len(own)), torch.tensor(second)] = 0.0
    return s


class FakeModel:
    def __init__(self, k: int):
        self.z_class_means = torch.nn.Parameter(torch.randn(k, Z))
        self.z_class_logvars = torch.nn.Parameter(torch.zeros(k, Z))


def replay_batch(scores, mu, logvar, h=None, recon=None, n_rep=1, rep_f=None, seed=0, model=None):
    state = ReplayState.build(scores, n_rep, rep_f, torch.Generator().manual_seed(seed))
    n = len(scores)
    h = torch.rand(n, 1, 3, 3) if h is None else h
    recon = torch.rand(n, 1, 3, 3) if recon is None else recon
    return ReplayBatch(h=h, scores=scores, e=torch.zeros(n, 2), mu=mu, logvar=logvar, recon=recon, state=state,
                       model=model or FakeModel(scores.shape[1]), image_pixels=9)


# -- shared replay state (docs/algorithm.md "Replay-batch state") -----------------------------------------------------
def test_ranking_gives_own_and_competing_class():
    state = ReplayState.build(scores_for([0, 1, 2], [3, 0, 1]), 1, None, torch.Generator())
    assert state.own.tolist() == [0, 1, 2]
    assert state.competitors[:, 0].tolist() == [3, 0, 1]


def test_repulsion_factor_at_most_one_empties_the_gate_and_a_large_factor_keeps_all():
    s = scores_for([0, 1, 2, 3], [1, 2, 3, 0], gap=2.0)
    assert not ReplayState.build(s, 1, 1.0, torch.Generator()).gate.any()
    assert ReplayState.build(s, 1, 1e9, torch.Generator()).gate.all()
    # p_own / p_second = e^2 = 7.39: f = 6 gates out, f = 8 keeps
    assert not ReplayState.build(s, 1, 6.0, torch.Generator()).gate.any()
    assert ReplayState.build(s, 1, 8.0, torch.Generator()).gate.all()


def test_anchor_is_invalid_when_its_competing_class_is_absent_from_the_batch():
    state = ReplayState.build(scores_for([0, 0, 1], [3, 1, 0]), 1, None, torch.Generator())
    assert state.valid[:, 0].tolist() == [False, True, True]  # class 3 is nobody's top-1


def test_representatives_are_members_of_their_class_group_and_class_means_are_group_means():
    s = scores_for([0, 1, 0, 2, 1, 0], [1, 0, 1, 0, 2, 2])
    state = ReplayState.build(s, 1, None, torch.Generator().manual_seed(3))
    for c in range(3):
        assert state.own[state.representative[c]] == c
    h = torch.arange(6.0).view(6, 1)
    means = state.class_mean(h)
    assert means[:3, 0].tolist() == pytest.approx([(0 + 2 + 5) / 3, (1 + 4) / 2, 3.0])
    assert not state.present[3]


def test_n_rep_is_clamped_to_the_previous_classes_available():
    state = ReplayState.build(scores_for([0, 1], [1, 0], k=2), 5, None, torch.Generator())
    assert state.competitors.shape == (2, 1)


# -- distribution repulsion (docs/algorithm.md "Distribution repulsion") ----------------------------------------------
@pytest.mark.parametrize("target", ["prior", "sample", "class_mean"])
@pytest.mark.parametrize("divergence", ["kl", "js", "js_ref"])
def test_one_step_on_distribution_repulsion_increases_the_divergence(target, divergence):
    torch.manual_seed(0)
    s = scores_for([0, 1, 2, 0, 1, 2], [1, 2, 0, 2, 0, 1], k=3)
    mu = torch.randn(6, Z, requires_grad=True)
    logvar = (0.1 * torch.randn(6, Z)).requires_grad_(True)
    model = FakeModel(3)
    term = DistributionRepulsion(1.0, divergence, target, d_min=1e-6)
    batch = replay_batch(s, mu, logvar, model=model)

    def divergence_sum():
        mu_t, lv_t, mask = term._targets(batch)
        d = losses.DIVERGENCES[divergence](mu[:, None], logvar[:, None], mu_t, lv_t)
        return (d * mask).sum()

    before = divergence_sum().item()
    term(batch).backward()
    with torch.no_grad():
        for p in (mu, logvar, model.z_class_means, model.z_class_logvars):
            if p.grad is not None:
                p -= 1e-2 * p.grad / p.grad.norm()
    assert divergence_sum().item() > before


def test_distribution_repulsion_without_valid_anchor_is_exactly_zero():
    s = scores_for([0, 0, 0], [1, 1, 1])  # class 1 never top-1 -> no representative
    mu = torch.randn(3, Z, requires_grad=True)
    value = DistributionRepulsion(1.0, "js", "sample", 1e-3)(replay_batch(s, mu, torch.zeros(3, Z)))
    assert value.item() == 0.0
    value.backward()  # a graph, not an error
    assert torch.equal(mu.grad, torch.zeros_like(mu))


def test_distribution_repulsion_is_finite_for_identical_distributions():
    s = scores_for([0, 1, 0, 1], [1, 0, 1, 0])
    mu = torch.zeros(4, Z, requires_grad=True)
    for divergence in ("kl", "js", "js_ref"):
        term = DistributionRepulsion(1.0, divergence, "sample", 1e-3)
        value = term(replay_batch(s, mu, torch.zeros(4, Z)))
        assert math.isfinite(value.item())
        value.backward()
        assert torch.isfinite(mu.grad).all()
    assert term.stats(replay_batch(s, mu, torch.zeros(4, Z)))["stats/rep_valid_anchors"].item() == 4


def test_prior_target_is_scaled_by_image_pixels():
    s = scores_for([0, 1], [1, 0])
    mu, lv = torch.randn(2, Z), torch.zeros(2, Z)
    model = FakeModel(2)
    batch = replay_batch(s, mu, lv, model=model)
    d = losses.js_diag_gauss(mu, lv, model.z_class_means[[1, 0]], model.z_class_logvars[[1, 0]])
    expected = (1 / d.clamp(min=1e-3)).mean() / 9
    assert DistributionRepulsion(1.0, "js", "prior", 1e-3)(batch).item() == pytest.approx(expected.item(), rel=1e-5)


def test_further_neighbours_add_terms():
    s = torch.tensor([[3.0, 2.0, 1.0, 0.0]] * 2 + [[0.0, 3.0, 2.0, 1.0]] * 2 + [[1.0, 0.0, 3.0, 2.0]] * 2)
    mu, lv = torch.randn(6, Z), torch.zeros(6, Z)
    torch.manual_seed(0)
    model = FakeModel(4)
    one = DistributionRepulsion(1.0, "kl", "prior", 1e-3)(replay_batch(s, mu, lv, n_rep=1, model=model))
    three = DistributionRepulsion(1.0, "kl", "prior", 1e-3)(replay_batch(s, mu, lv, n_rep=3, model=model))
    assert three.item() > one.item() > 0


# -- reconstruction repulsion / attraction (docs/algorithm.md "Reconstruction repulsion and attraction") --------------
@pytest.mark.parametrize("averaged", [False, True])
@pytest.mark.parametrize("recon_loss", [losses.recon_bce, losses.recon_half_mse])
def test_recon_repulsion_pushes_away_and_attraction_pulls_towards_the_target(averaged, recon_loss):
    torch.manual_seed(1)
    s = scores_for([0, 1, 0, 1], [1, 0, 1, 0])
    h = torch.rand(4, 1, 3, 3)
    for term_cls, sign in ((ReconRepulsion, 1), (ReconAttraction, -1)):
        recon = torch.rand(4, 1, 3, 3).clamp(0.05, 0.95).requires_grad_(True)
        batch = replay_batch(s, torch.zeros(4, Z), torch.zeros(4, Z), h=h, recon=recon)
        term = term_cls(1.0, averaged, recon_loss, 1e-6)
        state = batch.state
        classes = state.competitors[:, 0] if term_cls is ReconRepulsion else state.own

        def distance(term=term, batch=batch, classes=classes, recon=recon):
            return recon_loss(term._target(batch, classes), recon).sum()

        before = distance().item()
        term(batch).backward()
        with torch.no_grad():
            recon -= 1e-2 * recon.grad / recon.grad.norm()
        assert sign * (distance().item() - before) > 0


def test_recon_terms_are_finite_for_identical_reconstructions_and_zero_without_anchors():
    s = scores_for([0, 0, 0, 0], [1, 1, 1, 1])
    h = torch.full((4, 1, 3, 3), 0.5)
    recon = h.clone().requires_grad_(True)
    batch = replay_batch(s, torch.zeros(4, Z), torch.zeros(4, Z), h=h, recon=recon)
    assert ReconRepulsion(1.0, False, losses.recon_half_mse, 1e-3)(batch).item() == 0.0  # class 1 absent
    s2 = scores_for([0, 1, 0, 1], [1, 0, 1, 0])
    batch2 = replay_batch(s2, torch.zeros(4, Z), torch.zeros(4, Z), h=h, recon=recon)
    value = ReconRepulsion(1.0, True, losses.recon_half_mse, 1e-3)(batch2)
    assert value.item() == pytest.approx(1e3)  # distance 0 clamped at d_min
    value.backward()
    assert torch.isfinite(recon.grad).all()
    assert ReconAttraction(1.0, True, losses.recon_half_mse, 1e-3)(batch2).item() == 0.0


# -- augmentation (docs/algorithm.md "Second views") ------------------------------------------------------------------
def test_augmentation_uses_its_own_random_stream_and_leaves_the_global_rng_alone():
    x = torch.rand(16, 1, 28, 28)
    state = torch.get_rng_state()
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    a, b = augment_mnist(x, g1), augment_mnist(x, g2)
    assert torch.equal(a, b) and a.shape == x.shape
    assert torch.equal(state, torch.get_rng_state())
    assert not torch.equal(augment_mnist(x, g1), a)  # the stream moves on


@pytest.mark.parametrize("seed", range(4))
def test_crops_from_kornias_captured_grids_are_kornias_crops_bit_for_bit(seed, monkeypatch):
    """The CPU's crops (CropGrids on the chosen samples) against kornia cropping the whole batch (the GPU's way),
    for MNIST's resized crops and CIFAR's fixed-size crops, at batch sizes from 1 up."""
    g = torch.Generator().manual_seed(seed)
    for n in (1, 2, 17, 128):
        x = torch.rand(n, 1, 28, 28, generator=g)
        u = torch.rand(n, 3, 32, 32, generator=g)
        views = {}
        for from_grids in (True, False):
            monkeypatch.setattr(augment, "crops_from_grids", lambda device, on=from_grids: on)
            rng = torch.Generator().manual_seed(seed * 1000 + n)
            views[from_grids] = (augment.random_resized_crop(x, 0.5, (0.75, 1.0), rng),
                                 augment.random_crop_batch(u, 24, 1.0, rng))
        assert all(torch.equal(a, b) for a, b in zip(views[True], views[False], strict=True))
        assert views[True][1].shape == (n, 3, 24, 24)


def test_a_crop_grid_outside_the_candidates_is_captured_when_first_seen():
    from kornia.geometry.transform import crop_and_resize

    grids = augment.CropGrids((28, 28), (20, 20), lambda: [(0, 0, 28, 28)])
    x = torch.rand(3, 2, 28, 28, generator=torch.Generator().manual_seed(0))
    boxes = torch.tensor([[0.0, 0.0, 28.0, 28.0], [3.0, 5.0, 1.0, 9.0], [7.0, 0.0, 21.0, 28.0]])
    expected = crop_and_resize(x, augment._boxes(*boxes.unbind(1)), (20, 20))
    same = lambda a, b: torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)  # noqa: E731
    same(grids.crop(x, boxes), expected)   # a side of 1 pixel too: kornia crops it to NaN
    assert grids.replays and len(grids.rows) == 3
    same(grids.crop(x[1:], boxes[1:]), expected[1:])


def test_crop_grids_leave_the_crop_to_kornia_when_it_is_not_one_grid_sample_of_its_input(monkeypatch):
    """The capture's checks are real: a crop that samples a changed input (here: the input plus one) is not
    replayed from its grid; kornia's own result is returned."""
    import kornia.geometry.transform as kornia_transform

    crop_and_resize = kornia_transform.crop_and_resize
    monkeypatch.setattr(kornia_transform, "crop_and_resize", lambda x, boxes, size: crop_and_resize(x + 1, boxes, size))
    grids = augment.CropGrids((28, 28), (28, 28), lambda: augment.resized_crop_boxes((28, 28), (0.75, 1.0)))
    x = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    boxes = torch.tensor([[0.0, 0.0, 28.0, 28.0], [2.0, 3.0, 22.0, 25.0]] * 2)
    got = grids.crop(x, boxes)
    assert grids.replays is False
    assert torch.equal(got, crop_and_resize(x + 1, augment._boxes(*boxes.unbind(1)), (28, 28)))


def test_resized_crop_candidates_hold_every_box_the_crop_draws(monkeypatch):
    """Not needed for the values (a box outside is captured when seen), but for the speed: the first crop's one
    capture should be the last."""
    monkeypatch.setattr(augment, "_CROP_GRIDS", {})
    rng, x = torch.Generator().manual_seed(0), torch.rand(256, 1, 28, 28)
    for _ in range(50):
        augment.random_resized_crop(x, 1.0, (0.75, 1.0), rng)
    (grids,) = augment._CROP_GRIDS.values()
    assert grids.replays and len(grids.rows) == len(augment.resized_crop_boxes((28, 28), (0.75, 1.0)))


def test_square_crop_candidates_hold_every_box_the_batch_crop_draws(monkeypatch):
    monkeypatch.setattr(augment, "_CROP_GRIDS", {})
    rng, x = torch.Generator().manual_seed(0), torch.rand(256, 3, 32, 32)
    for _ in range(20):
        augment.random_crop_batch(x, 24, 1.0, rng)
    (grids,) = augment._CROP_GRIDS.values()
    assert grids.replays and len(grids.rows) == len(augment.square_crop_boxes((32, 32), 24)) == 81


def test_cifar_views_are_finite_for_constant_inputs():
    g = torch.Generator().manual_seed(0)
    for _ in range(6):
        out = augment_cifar(torch.full((8, 3, 32, 32), 0.3), g)
        assert torch.isfinite(out).all() and out.shape[-1] in (24, 32)


# -- the engine with every term --------------------------------------------------------------------
BIR = dict(experiment="splitMNIST5k", replay="generative", brain_inspired=True, si=True, c=0.1, device="cpu",
           batch=32, seed=0)


def make_engine(**flags) -> Engine:
    return Engine(BIRConfig(**(BIR | dict(iters=4) | flags)))


def train_tasks(e: Engine, tasks_to_train: int = 2) -> dict:
    """Train whole tasks; the metrics (losses included) of the last."""
    for _ in range(tasks_to_train):
        metrics = e.train_task()
    return metrics


def run_engine(tasks_to_train=2, **flags) -> dict:
    return train_tasks(make_engine(**flags), tasks_to_train)


@pytest.mark.parametrize("flags, logged", [
    (dict(repulsion=True, lamda_rep=1e8), "loss/repulsion"),
    (dict(repulsion=True, kl_js="kl", use_rep_f=True, rep_f=6.0, rep_target="sample"), "stats/rep_gate_size"),
    (dict(recon_repulsion=True, recon_attraction=True, recon_rep_aver=True, lamda_recon_rep=1e8,
          lamda_recon_atr=1e8), "loss/recon_attraction"),
    (dict(contrastive=True, c_scores=True, c_lr=1e-3), "loss/contrastive"),
    (dict(contrastive=True, c_hard=True, contr_grad_mode="reference"), "loss/contrastive"),
], ids=["repulsion-huge", "repulsion-gated", "recon-huge", "contrastive-soft", "contrastive-hard-ref"])
def test_engine_logs_each_term_and_stays_finite(flags, logged):
    metrics = run_engine(**flags)
    assert logged in metrics
    assert all(math.isfinite(v) for v in metrics.values())


def test_contrastive_training_never_touches_the_global_rng(monkeypatch):
    e = make_engine(iters=3, contrastive=True, not_hidden=True)
    calls = []
    monkeypatch.setattr(torch, "manual_seed", lambda *a: calls.append(a))
    monkeypatch.setattr(torch.random, "manual_seed", lambda *a: calls.append(a))
    monkeypatch.setattr(torch, "set_rng_state", lambda *a: calls.append(a))
    e.train_task()
    first = torch.get_rng_state()
    e.train_task()
    assert calls == []
    # dropout and augmentation draw from the plugin's random stream: other engines in the process cannot
    # change this one's results by using (or reseeding) the global stream
    assert torch.equal(first, torch.get_rng_state())


def test_not_hidden_alone_builds_views_but_trains_like_bir_si():
    plain = run_engine()
    not_hidden = run_engine(not_hidden=True)
    assert "loss/contrastive" not in not_hidden
    assert not_hidden["loss/distillation"] == pytest.approx(plain["loss/distillation"])


def test_separate_gradient_mode_keeps_the_contrastive_gradient_out_of_the_main_step():
    # with c_lr = 0 the encoder optimiser does not move: separate mode must train exactly like BI-R+SI,
    # while the reference mode lets grad L_con into the main step on fcE
    def encoder_weight(**flags):
        e = make_engine(**flags)
        train_tasks(e)
        return e.model.fcE[0].weight.detach()

    plain = encoder_weight()
    separate = encoder_weight(contrastive=True, c_lr=0.0, c_drop=0.0)
    reference = encoder_weight(contrastive=True, c_lr=0.0, c_drop=0.0, contr_grad_mode="reference")
    assert torch.allclose(separate, plain, atol=1e-7)
    assert not torch.allclose(reference, plain, atol=1e-7)


BOOL_FLAGS = ["repulsion", "recon_repulsion", "recon_attraction", "recon_rep_aver", "contrastive", "c_scores",
              "c_hard", "not_hidden", "use_rep_f"]


def test_every_flag_combination_runs_or_is_rejected_at_config_time():
    rng = random.Random(0)
    combos = [dict.fromkeys(c, True) for n in (1, 2) for c in itertools.combinations(BOOL_FLAGS, n)]
    combos += [dict.fromkeys(rng.sample(BOOL_FLAGS, rng.randint(3, len(BOOL_FLAGS))), True) for _ in range(12)]
    ran = rejected = 0
    for flags in combos:
        flags |= dict(kl_js=rng.choice(["kl", "js", "js_ref"]), rep_target=rng.choice(["prior", "sample",
                                                                                        "class_mean"]))
        try:
            BIRConfig(**(BIR | dict(iters=2) | flags)).resolved()
        except ConfigError as err:
            assert "\n" not in str(err)
            rejected += 1
            continue
        metrics = run_engine(iters=2, **flags)
        assert all(math.isfinite(v) for v in metrics.values()), flags
        ran += 1
    assert ran > 20 and rejected > 5


def test_terms_weighted_by_zero_leave_the_learner_bit_identical_to_the_baseline():
    # the terms draw from their own random stream: switching one on changes no batch, replay or noise the learner
    # sees, so a sweep's inert configs tie exactly with the baseline instead of differing by their RNG streams
    def weights(**flags):
        e = make_engine(**flags)
        train_tasks(e)
        return e.model.state_dict()

    baseline = weights()
    zeroed = weights(repulsion=True, lamda_rep=0.0, recon_repulsion=True, lamda_recon_rep=0.0,
                     recon_attraction=True, lamda_recon_atr=0.0)
    assert all(torch.equal(baseline[k], zeroed[k]) for k in baseline)
