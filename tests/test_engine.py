"""The engine: replay classes, metrics, checkpoint bit-identity, learning on real digits."""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tune_bir.config import SEED_STREAMS, BIRConfig
from tune_bir.engine import Engine
from tune_bir.evaluation import accuracy_metrics

BIR = dict(replay="generative", brain_inspired=True)


def engine(**overrides) -> Engine:
    values = dict(experiment="splitMNIST5k", iters=20, batch=32, device="cpu", seed=1) | overrides
    return Engine(BIRConfig(**values))


def test_replay_draws_only_classes_of_previous_tasks():
    e = engine(**BIR)
    e.train_task()
    e.train_task()  # now in task 3: previous classes are 0..3
    classes = torch.cat([e.replay._replay_classes(3) for _ in range(50)])
    assert classes.min() >= 0 and classes.max() <= 3
    assert set(classes.tolist()) == {0, 1, 2, 3}


def test_replay_scores_cover_previous_classes_only():
    e = engine(**BIR)
    e.train_task()
    h = e.data.train[1].x[:8]
    h_replay, scores = e.replay._replay(h, 2)
    assert h_replay.shape == (32, 1, 28, 28) and scores.shape == (32, 2)


def test_metrics_after_each_task_follow_the_design_vocabulary():
    e = engine(**BIR, val_fraction=0.1, iters=10)
    first = e.train_task()
    assert first["task"] == 1 and first["bwt"] == 0.0 and first["forgetting_avg"] == 0.0
    second = e.train_task()
    for key in ("acc_avg", "acc_task_1", "acc_task_2", "bwt", "forgetting_avg", "val_acc_avg",
                "val_acc_task_2", "val_bwt", "val_forgetting_avg", "loss/total", "loss/distillation",
                "loss/recon_replay", "task", "iters_done", "time_this_step_s"):
        assert key in second, key
    assert second["task"] == 2 and second["iters_done"] == 20
    assert second["acc_avg"] == pytest.approx((second["acc_task_1"] + second["acc_task_2"]) / 2)


def test_true_class_probability_is_the_softmax_over_the_active_columns():
    e = engine(**BIR, val_fraction=0.1, iters=10)
    e.train_task()
    metrics = e.train_task()
    scores = e.scores("val", 2)
    assert scores.accuracy == e.accuracies("val", 2)
    for k, data in enumerate(e.data.val[:2]):
        with torch.no_grad():
            logits = e.model.predict(data.x)[:, :4]   # class-IL after 2 tasks: 4 active columns
        expected = torch.softmax(logits, 1)[torch.arange(len(data.y)), data.y].mean()
        assert scores.probability[k] == pytest.approx(float(expected), rel=1e-5)
        assert scores.accuracy[k] == pytest.approx(float((logits.argmax(1) == data.y).float().mean()))
    assert metrics["val_prob_avg"] == pytest.approx(sum(scores.probability) / 2)
    assert 0.0 < metrics["prob_avg"] < 1.0


def test_outputs_finite_detects_a_blown_up_model():
    e = engine(**BIR)
    assert e.outputs_finite()
    with torch.no_grad():
        e.model.fcE[0].weight.fill_(1e38)   # finite weights whose sums overflow to inf
    assert not e.outputs_finite()


@pytest.mark.parametrize("flags", [dict(BIR), dict(BIR, si=True, c=0.1), dict(replay="generative")])
def test_bf16_autocast_trains_and_keeps_fp32_state(flags):
    def two_tasks(precision: str):
        e = engine(**flags, precision=precision, iters=15)
        e.train_task()
        return e, e.train_task()

    e, metrics = two_tasks("bf16")
    _, fp32 = two_tasks("fp32")
    # measured (seeds 1-3): the same acc_avg as fp32 to 0.01, task 2 at 0.89-0.93 after 15 iterations
    assert metrics["acc_avg"] == pytest.approx(fp32["acc_avg"], abs=0.05)
    assert metrics["acc_task_2"] > 0.8
    assert all(p.dtype == torch.float32 for p in e.model.parameters())
    assert all(torch.isfinite(p).all() for p in e.model.parameters())


EVERY_TERM = dict(repulsion=True, lamda_rep=10.0, kl_js="kl", use_rep_f=True, rep_f=3.0, n_rep=2,
                  recon_repulsion=True, lamda_recon_rep=0.1, recon_attraction=True, lamda_recon_atr=0.1,
                  contrastive=True, c_lr=1e-3, c_drop=0.3, c_scores=True)


@pytest.mark.parametrize("terms", [EVERY_TERM, dict(contrastive=True, c_hard=True, not_hidden=True)])
def test_adopting_another_configs_first_task_continues_bit_identically(terms):
    flags = dict(BIR, si=True, c=0.1, iters=12, val_fraction=0.1)
    reference = engine(**flags, **terms)
    expected = [reference.train_task() for _ in range(3)]
    baseline = engine(**flags)
    first = baseline.train_task()
    adopter = engine(**flags, **terms)
    adopter.adopt_first_task(copy.deepcopy(baseline.state_dict()))
    got = [adopter.train_task() for _ in range(2)]
    strip = lambda m: {k: v for k, v in m.items() if k != "time_this_step_s"}  # noqa: E731
    assert strip(first) == strip(expected[0])
    assert [strip(m) for m in got] == [strip(m) for m in expected[1:]]
    for name, tensor in reference.model.state_dict().items():
        assert torch.equal(tensor, adopter.model.state_dict()[name]), name


def test_adopt_first_task_refuses_a_config_whose_first_task_differs():
    baseline = engine(**BIR, iters=5)
    baseline.train_task()
    with pytest.raises(ValueError, match=r"differs from the saved one in \['lr'\]"):
        engine(**BIR, iters=5, lr=1e-2).adopt_first_task(baseline.state_dict())
    trained = engine(**BIR, iters=5)
    trained.train_segment(2)
    with pytest.raises(ValueError, match="has not trained yet"):
        trained.adopt_first_task(baseline.state_dict())


def test_bwt_and_forgetting_from_an_accuracy_matrix():
    history = [[0.9], [0.7, 0.95]]
    m = accuracy_metrics([0.5, 0.8, 0.9], history, "")
    assert m["bwt"] == pytest.approx(((0.5 - 0.9) + (0.8 - 0.95)) / 2)
    assert m["forgetting_avg"] == pytest.approx(((0.9 - 0.5) + (0.95 - 0.8)) / 2)


def test_segments_add_up_to_a_task():
    e = engine(**BIR, iters=12)
    a = e.train_segment(5)
    assert a["task"] == 0 and e.iter_in_task == 5
    e.train_segment(5)
    b = e.train_segment(5)  # only 2 left in the task
    assert b["task"] == 1 and e.task == 1 and e.iters_done == 12


def test_total_loss_weights_current_by_one_over_t_and_replay_by_the_rest():
    e = engine(**BIR, iters=3)
    for t in (1, 2, 3):
        m = e.train_task()
        current = m["loss/recon_current"] + m["loss/variational_current"] + m["loss/prediction"]
        replay = (m["loss/recon_replay"] + m["loss/variational_replay"] + m["loss/distillation"]) if t > 1 else 0.0
        assert m["loss/total"] == pytest.approx(current / t + (1 - 1 / t) * replay, rel=1e-5)


def test_no_two_streams_of_any_two_seeds_share_a_seed():
    """SeedSequence(seed).spawn: the seed + offset scheme gave seed s's "init" stream seed s+1's "learner" seed."""
    seeds = {(s, stream): BIRConfig(seed=s).stream_seed(stream) for s in range(1000) for stream in SEED_STREAMS}
    assert len(set(seeds.values())) == len(seeds)
    assert all(0 <= v < 2**32 for v in seeds.values())    # torch's CPU generator keeps 32 bits of a seed
    # the streams are numpy's SeedSequence children, the learner's global torch seed the run seed itself
    child = np.random.SeedSequence(7).spawn(len(SEED_STREAMS))[SEED_STREAMS["init"]]
    assert BIRConfig(seed=7).stream_seed("init") == int(child.generate_state(1, np.uint32)[0])
    engine(seed=7, iters=1)
    assert torch.initial_seed() == 7


def test_same_seed_gives_identical_first_losses():
    a, b = engine(**BIR, iters=3), engine(**BIR, iters=3)
    assert a.train_task()["loss/total"] == b.train_task()["loss/total"]
    assert torch.equal(a.model.fromZ.mask, b.model.fromZ.mask)


def test_si_penalty_is_zero_in_task_one_and_positive_after():
    e = engine(**BIR, si=True, c=0.1, iters=10)
    assert e.train_task()["loss/si"] == 0.0
    assert e.train_task()["loss/si"] > 0.0


def test_si_scope_leaves_decoder_and_prior_without_importance():
    e = engine(**BIR, si=True, iters=10)
    e.train_task()
    names = set(e.state_dict()["plugins"]["si"]["omega"])
    assert names and all(n.startswith(("fcE.", "classifier.")) for n in names)


CHECKPOINT_SCRIPT = """
import json, sys, torch
from tune_bir.config import BIRConfig
from tune_bir.engine import Engine
cfg = BIRConfig(**json.loads(sys.argv[1]))
e = Engine(cfg)
e.load_state_dict(torch.load(sys.argv[2], weights_only=True))
m = e.train_task()
print(json.dumps({k: v for k, v in m.items() if k != "time_this_step_s"}))
"""


def test_checkpoint_after_two_tasks_continues_bit_identically_in_a_new_process(tmp_path):
    values = dict(experiment="splitMNIST5k", iters=15, batch=32, device="cpu", seed=3, si=True,
                  val_fraction=0.1, **BIR)
    straight = Engine(BIRConfig(**values))
    straight.train_task()
    straight.train_task()
    path = tmp_path / "ckpt.pt"
    torch.save(straight.state_dict(), path)
    expected = {k: v for k, v in straight.train_task().items() if k != "time_this_step_s"}
    # the test process's threads (a CPU's sums are ordered by them), through the variable torch starts from
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))
    out = subprocess.run([sys.executable, "-c", CHECKPOINT_SCRIPT, json.dumps(values), str(path)], env=env,
                         capture_output=True, text=True, check=True, cwd=Path(__file__).parent.parent)
    resumed = json.loads(out.stdout.strip().splitlines()[-1])
    assert resumed == expected


def test_checkpoint_in_the_middle_of_a_task_continues_bit_identically():
    values = dict(**BIR, iters=10, si=True)
    a = engine(**values)
    a.train_task()
    a.train_segment(4)
    state = copy.deepcopy(a.state_dict())  # like torch's, the state dict references live tensors
    rest_a = a.train_task()
    b = engine(**values)
    b.load_state_dict(state)
    rest_b = b.train_task()
    rest_a.pop("time_this_step_s"), rest_b.pop("time_this_step_s")
    assert rest_a == rest_b


@pytest.mark.parametrize("replay", ["none", "current", "offline"])
def test_classifier_baselines_train(replay):
    e = engine(replay=replay, iters=10)
    while not e.done:
        metrics = e.train_task()
    assert metrics["task"] == 5
    # class-IL after 5 tasks (measured, seeds 1-3): without replay task 1 is gone (0.0); LwF keeps it by
    # distillation (0.985-1.0); joint training keeps it (0.96-0.975) and the rest (acc_avg 0.61-0.68)
    if replay == "none":
        assert metrics["acc_task_1"] < 0.05
    else:
        assert metrics["acc_task_1"] > 0.9
    if replay == "offline":
        assert metrics["acc_avg"] > 0.5


def test_generative_replay_with_a_separate_generator_trains_both_models():
    e = engine(replay="generative", distill=True, iters=10)
    assert e.replay.generator_model is not None and e.model.spec.decoder is False
    e.train_task()
    generator, classifier = (copy.deepcopy(m.state_dict()) for m in (e.replay.generator_model, e.model))
    m = e.train_task()
    # in task 2 both models learn, each on current and replayed inputs (their replay losses are logged)
    for model, before in ((e.replay.generator_model, generator), (e.model, classifier)):
        moved = [k for k, v in model.state_dict().items() if v.is_floating_point() and not torch.equal(v, before[k])]
        assert moved, type(model).__name__
    assert "loss/generator_replay" in m and "loss/distillation" in m


@pytest.mark.parametrize("scenario", ["task", "domain"])
def test_task_and_domain_scenarios_without_replay(scenario):
    e = engine(scenario=scenario, iters=30, si=True)
    e.train_task()
    m = e.train_task()
    # binary tasks, chance 0.5; measured (seeds 1-3): task 2 at 0.94 (task) / 0.90-0.96 (domain); task 1 kept at
    # 1.0 by task-IL's own head, at 0.62-0.77 by domain-IL's shared one
    assert m["acc_task_2"] > 0.8
    assert m["acc_task_1"] > (0.9 if scenario == "task" else 0.55)


def test_brain_inspired_replay_beats_no_replay_on_real_digits():
    """A short budget (150 iterations per task, batch 128, seed 1); BI-R and BI-R+SI land in a band pinned by
    measurement, far above no replay (~0.20)."""
    def final(**kw):
        e = engine(iters=150, batch=128, seed=1, **kw)
        while not e.done:
            m = e.train_task()
        return m["acc_avg"]

    none, bir, bir_si = final(replay="none"), final(**BIR), final(**BIR, si=True, c=0.1)
    assert none < 0.25
    # Final acc_avg at this budget under the SeedSequence streams (issue #19), measured 2026-12-03 on an AMD EPYC
    # (Zen 5; torch 2.14.1, fp32, 1 thread) for seeds 1-4: BI-R 0.830 0.821 0.823 0.830 (mean 0.826, sd 0.0047);
    # BI-R+SI (c 0.1) 0.829 0.824 0.830 0.824 (mean 0.8268, sd 0.0032). Seed 1 under the other instruction sets
    # (ATEN_CPU_CAPABILITY avx2 / default with MKL and oneDNN capped to match): BI-R 0.827 / 0.829, BI-R+SI
    # 0.830 / 0.833. Bounds: mean +- max(4 sd, 0.04): the seed-to-seed spread, with room for another CPU kind's
    # arithmetic (one seed moved 2 points between an AMD and an Intel machine at 500 iterations, issue #18); a
    # broken replay, distillation or SI path lands far outside (no replay: ~0.2).
    assert 0.786 <= bir <= 0.866, bir
    assert 0.7868 <= bir_si <= 0.8668, bir_si
