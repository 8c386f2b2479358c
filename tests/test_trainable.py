"""BIRTrainable without a Ray session: checkpoints, actor reuse, data once per node, seeds, divergence."""

import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from ray.tune.schedulers import ASHAScheduler

import tune_bir.data
from trainables import BIRTrainable, data_cache, first_task_cache
from trainables import bir as trainable_module
from trainables.bir import EXACT_TIE_WEIGHT, SCHEDULER_METRIC, TIE_BREAK_WEIGHT, tie_rank
from trainables.node_cache import CACHE_DIR_ENV
from tune_bir.config import BIRConfig
from tune_bir.errors import ConfigError

BASE = dict(replay="generative", brain_inspired=True, si=True, val_fraction=0.1, iters=6, batch=32, device="cpu")
VOLATILE = ("time_this_step_s", "time_this_iter_s", "time_total_s", "timestamp", "date", "time_since_restore",
            "iterations_since_restore", "hostname", "node_ip", "pid", "done", "config", "trial_id",
            "checkpoint_dir_name")


@pytest.fixture(autouse=True)
def node_cache(tmp_path, monkeypatch):
    """A fresh node cache folder and process memo per test."""
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "node-cache"))
    data_cache.clear_memo()
    yield tmp_path / "node-cache"
    data_cache.clear_memo()


def comparable(result: dict) -> dict:
    return {k: v for k, v in result.items() if k not in VOLATILE and not k.startswith("worker/")}


def test_save_and_restore_continue_bit_identically(tmp_path):
    config = dict(BASE, repulsion=True, lamda_rep=10.0, segment_iters=4)   # segments end inside tasks too
    first = BIRTrainable(config=config)
    for _ in range(3):                       # 4 | 2 (task 1 ends) | 4 iterations into task 2
        first.train()
    checkpoint = first.save(str(tmp_path / "ckpt"))
    expected = [comparable(first.train()) for _ in range(3)]

    second = BIRTrainable(config=config)
    second.restore(checkpoint)
    assert second.iteration == 3
    resumed = [comparable(second.train()) for _ in range(3)]
    assert resumed == expected
    assert resumed[-1]["task"] == 3 and resumed[-1]["training_iteration"] == 6


def test_task_one_is_trained_once_per_node_and_adopted_by_other_configs():
    trained, adopted = first_task_cache.STATS["trained"], first_task_cache.STATS["adopted"]
    extras = ({}, dict(repulsion=True, lamda_rep=10.0), dict(contrastive=True, c_lr=1e-3))
    sharing = [BIRTrainable(config=dict(BASE, **extra)) for extra in extras]
    firsts = [t.train() for t in sharing]
    assert [r[first_task_cache.SHARED_KEY] for r in firsts] == [0.0, 1.0, 1.0]
    assert (first_task_cache.STATS["trained"], first_task_cache.STATS["adopted"]) == (trained + 1, adopted + 2)
    # each learner goes on exactly as if it had trained task 1 itself
    for extra, trainable, first in zip(extras, sharing, firsts, strict=True):
        alone = BIRTrainable(config=dict(BASE, **extra, share_first_task=False))
        own = [alone.train() for _ in range(2)]
        assert first_task_cache.SHARED_KEY not in own[0]
        strip = {first_task_cache.SHARED_KEY}
        assert {k: v for k, v in comparable(first).items() if k not in strip} == comparable(own[0])
        assert comparable(trainable.train()) == comparable(own[1])


def test_a_different_first_task_config_is_not_shared():
    BIRTrainable(config=BASE).train()
    result = BIRTrainable(config=dict(BASE, lr=2e-3)).train()
    assert result[first_task_cache.SHARED_KEY] == 0.0


def test_reset_config_reuses_the_actor_and_its_data():
    loads, setups = tune_bir.data.LOAD_COUNT, trainable_module.SETUP_CALLS
    memos = data_cache.STATS["memo"]
    trainable = BIRTrainable(config=dict(BASE, repulsion=True, lamda_rep=1.0))
    trainable.train()
    assert trainable_module.SETUP_CALLS == setups + 1
    assert trainable.reset(dict(BASE, repulsion=True, lamda_rep=1e4))
    assert trainable.iteration == 0 and trainable.engines[0].task == 0
    assert trainable.engines[0].cfg.lamda_rep == 1e4
    first = trainable.train()
    assert first["training_iteration"] == 1 and first["task"] == 1
    assert trainable_module.SETUP_CALLS == setups + 1          # reset_config, not a second setup
    assert tune_bir.data.LOAD_COUNT <= loads + 1                # the protocol was read at most once
    assert data_cache.STATS["memo"] > memos                     # the second config took the memoised data
    assert first["worker/setups"] == trainable_module.SETUP_CALLS


def test_data_is_loaded_once_per_node_and_memory_mapped_by_other_processes(node_cache):
    cfg = BIRConfig.from_dict(dict(BASE, seed=11)).resolved()   # seed >= 10: a permuted class order
    built_before = data_cache.STATS["built"]
    data = data_cache.hidden_data(cfg, torch.device("cpu"))
    assert data_cache.STATS["built"] == built_before + 1
    checksum = float(sum(t.x.double().sum() + t.y.double().sum() for t in data.train + data.val + data.test))
    probe = (
        "import json, torch, tune_bir.data\n"
        "from trainables import data_cache\n"
        "from tune_bir.config import BIRConfig\n"
        f"cfg = BIRConfig.from_dict({dict(BASE, seed=11)!r}).resolved()\n"
        "d = data_cache.hidden_data(cfg, torch.device('cpu'))\n"
        "s = float(sum(t.x.double().sum() + t.y.double().sum() for t in d.train + d.val + d.test))\n"
        "print(json.dumps({'loads': tune_bir.data.LOAD_COUNT, 'stats': data_cache.STATS, 'sum': s}))\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300,
                         env={**os.environ, CACHE_DIR_ENV: str(node_cache)})
    assert out.returncode == 0, out.stderr
    other = json.loads(out.stdout.strip().splitlines()[-1])
    assert other["loads"] == 0                                  # no real load in the second process
    assert other["stats"] == {"built": 0, "mapped": 1, "memo": 0}
    assert other["sum"] == checksum
    assert len(list(node_cache.glob("*.pt"))) == 1


def test_a_different_seed_is_different_data():
    a = data_cache.data_key(BIRConfig.from_dict(dict(BASE, seed=0)).resolved())
    b = data_cache.data_key(BIRConfig.from_dict(dict(BASE, seed=12)).resolved())
    c = data_cache.data_key(BIRConfig.from_dict(dict(BASE, seed=0, lamda_rep=5.0)).resolved())
    assert a != b and a == c


def test_seeds_per_trial_trains_each_seed_and_reports_their_mean():
    trainable = BIRTrainable(config=dict(BASE, seed=3, seeds_per_trial=2))
    assert [e.cfg.seed for e in trainable.engines] == [3, 4]
    result = trainable.train()
    for key in ("acc_avg", "val_acc_avg", "loss/total"):
        assert result[key] == pytest.approx((result[f"seed3/{key}"] + result[f"seed4/{key}"]) / 2)
    assert result["seed3/loss/total"] != result["seed4/loss/total"]
    assert result["time_this_step_s"] == pytest.approx(result["seed3/time_this_step_s"]
                                                       + result["seed4/time_this_step_s"])


def test_each_seed_of_a_trial_is_what_train_gives_alone_with_that_seed_and_the_trials_threads(tmp_path):
    from tune_bir import train
    from tune_bir.record import result_fingerprint

    trainable = BIRTrainable(config=dict(BASE, seed=3, seeds_per_trial=2))
    while not (result := trainable.train()).get("done"):
        pass
    fingerprint = result_fingerprint(result)
    assert fingerprint["threads"] == torch.get_num_threads() and fingerprint["cpu_model"]
    (tmp_path / "config.json").write_text(json.dumps(BASE))
    for seed in (3, 4):
        argv = ["--config", str(tmp_path / "config.json"), "--seed", str(seed), "--threads",
                str(fingerprint["threads"]), "--results-dir", str(tmp_path), "--run-name", f"seed{seed}"]
        assert train.main(argv) == 0
        record = json.loads((tmp_path / f"seed{seed}.json").read_text())
        final = {k: v for k, v in record["final"].items() if k != "time_this_step_s"}
        assert final == {k: result[f"seed{seed}/{k}"] for k in final}   # bit for bit
        assert record["cpu_fingerprint"] == fingerprint


def test_a_diverging_config_ends_its_trial_as_diverged():
    trainable = BIRTrainable(config=dict(BASE, lr=1e30))   # the weights overflow within a few steps
    result = trainable.train()
    assert result["diverged"] is True and result["done"] is True
    # the scheduler's metric is there too: Ray's ASHA fails the whole sweep on a result without it
    assert math.isnan(result["val_acc_avg"]) and math.isnan(result[SCHEDULER_METRIC])
    # the segment that diverged was training time: the overhead benchmark must not count it as Ray's
    assert 0.0 < result["time_this_step_s"] <= result["time_this_iter_s"]


def test_an_exploding_inverse_term_ends_its_trial_as_diverged_and_a_sane_trial_beside_it_stays_finite():
    # repulsion acts from task 2 on: a weight past float32's range makes the weighted inverse term inf there,
    # the gradient non-finite and the weights NaN; 1e8 is the top of the searched range (Adam normalises
    # its size, and the divergences keep its gradient finite: difference "divergence-guards")
    exploding = BIRTrainable(config=dict(BASE, iters=4, repulsion=True, lamda_rep=1e39, kl_js="kl"))
    sane = BIRTrainable(config=dict(BASE, iters=4, repulsion=True, lamda_rep=1e8, kl_js="kl"))
    exploded = exploding.train()
    assert "diverged" not in exploded and exploded["task"] == 1            # task 1: no replay, nothing to repel
    exploded = exploding.train()
    assert exploded["diverged"] is True and exploded["done"] is True and exploded["task"] == 2
    assert not all(torch.isfinite(p).all() for p in exploding.engines[0].model.parameters())
    results = []
    while not results or not results[-1]["done"]:
        results.append(sane.train())
        assert all(torch.isfinite(p).all() for p in sane.engines[0].model.parameters()), results[-1]["task"]
    assert [r["task"] for r in results] == [1, 2, 3, 4, 5] and not any("diverged" in r for r in results)
    assert all(math.isfinite(r["acc_avg"]) and math.isfinite(r["loss/repulsion"]) for r in results[1:])


def test_the_scheduler_metric_is_val_acc_avg_with_ties_broken_by_the_true_class_probability():
    config = dict(BASE, iters=3)
    result = BIRTrainable(config=config).train()
    assert 0.0 < result["val_prob_avg"] < 1.0
    assert result[SCHEDULER_METRIC] == (result["val_acc_avg"] + TIE_BREAK_WEIGHT * result["val_prob_avg"]
                                        + EXACT_TIE_WEIGHT * tie_rank(config))


def test_an_inert_config_ties_exactly_with_the_baseline_and_the_baseline_wins_the_tie():
    baseline, inert = dict(BASE, iters=3, baseline=True), dict(BASE, iters=3, repulsion=True, lamda_rep=0.0)
    results = []
    for config in (baseline, inert):
        trainable = BIRTrainable(config=config)
        results.append([trainable.train() for _ in range(2)][-1])   # task 2: the term is switched on
    ours, theirs = results
    assert (ours["val_acc_avg"], ours["val_prob_avg"]) == (theirs["val_acc_avg"], theirs["val_prob_avg"])
    assert ours[SCHEDULER_METRIC] > theirs[SCHEDULER_METRIC]
    assert tie_rank(baseline) == 1.0 and 0.0 <= tie_rank(inert) < 1.0
    assert tie_rank(inert) == tie_rank(dict(inert)) != tie_rank(dict(inert, lamda_rep=1.0))


def test_exact_ties_at_a_rung_no_longer_all_pass_rays_asha():
    def stopped_at_rung(scores: list[float]) -> int:
        scheduler = ASHAScheduler(time_attr="training_iteration", metric=SCHEDULER_METRIC, mode="max", max_t=5,
                                  grace_period=2, reduction_factor=4)
        rung = scheduler._brackets[0]
        actions = [rung.on_result(SimpleNamespace(trial_id=str(i)), 2, score) for i, score in enumerate(scores)]
        return actions.count("STOP")

    configs = [dict(BASE, repulsion=True, use_rep_f=True, lamda_rep=10.0**k) for k in range(16)]
    tied = 0.9125 + TIE_BREAK_WEIGHT * 0.91   # what every one of them reports at the rung
    broken = [tied + EXACT_TIE_WEIGHT * tie_rank(config) for config in configs]
    assert len(set(broken)) == len(configs)    # float64 resolves the ranks
    assert stopped_at_rung([tied] * len(configs)) == 0
    # with the ties broken, ASHA decides exactly as for clearly different scores in the same order (which
    # trials the ranks favour depends on the config hash; that the decisions are real does not)
    ranks = [tie_rank(config) for config in configs]
    distinct = [0.5 + 0.4 * rank for rank in ranks]
    assert stopped_at_rung(broken) == stopped_at_rung(distinct) >= 4


def test_the_last_task_ends_the_trial_and_results_lead_with_the_selection_metric():
    trainable = BIRTrainable(config=dict(BASE, iters=2))
    results = [trainable.train() for _ in range(5)]
    assert [r["done"] for r in results] == [False] * 4 + [True]
    assert list(results[0])[:3] == ["task", "val_acc_avg", "acc_avg"]
    assert "diverged" not in results[-1]


@pytest.mark.parametrize("config, message", [
    (dict(BASE, lamda_repp=1.0), "unknown config field"),
    (dict(BASE, seeds_per_trial=0), "--seeds-per-trial must be an integer >= 1"),
])
def test_bad_trial_config_is_a_config_error(config, message):
    with pytest.raises(ConfigError, match=message):
        BIRTrainable(config=config)
