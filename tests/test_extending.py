"""docs/extending.md's worked example runs: its class (which declares its fields) and its search space, taken from
the page itself, registered, its fields in BIRConfig, its flags and its checks, present in every derived list,
and used in a 2-task run (a zero weight changes nothing)."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import re
import typing
from pathlib import Path

import pytest
import torch
import yaml

from search_spaces import EXAGGERATION_OFF
from tune_bir import terms
from tune_bir.cli import add_config_flags
from tune_bir.config import BIRConfig, make_config_class
from tune_bir.engine import Engine
from tune_bir.errors import ConfigError
from tune_bir.fields import flag_name
from tune_bir.train import format_losses, method_label

PAGE = Path(__file__).resolve().parents[1] / "docs" / "extending.md"
BIR = dict(experiment="splitMNIST5k", replay="generative", brain_inspired=True, si=True, c=0.1, device="cpu",
           batch=32, seed=0, iters=3, fc_units=100)


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", PAGE.read_text(), flags=re.S)


@pytest.fixture(scope="module")
def example():
    """The page's class, executed as the page gives it and registered, and the config class made with it (as
    `BIRConfig` is made when the class is registered before `tune_bir.config` is imported: a built-in module or
    an entry point)."""
    plugin = blocks("python")[0]
    namespace = {"__name__": "latent_pull_example"}
    exec("import torch\nfrom tune_bir.config import BIRConfig\nfrom tune_bir.exaggeration import _AdditiveTerm\n"
         "from tune_bir.fields import Field\nfrom tune_bir.plugin import PluginContext, register\n"
         "from tune_bir.replay_batch import ReplayBatch\nfrom tune_bir.errors import ConfigError\n" + plugin, namespace)
    try:
        yield make_config_class(), namespace["LatentPull"]
    finally:
        terms.unregister(namespace["LatentPull"].name)


def test_the_examples_fields_are_config_fields_flags_and_checks(example):
    config, cls = example
    assert cls.fields() == ("latent_pull", "lamda_pull", "pull_l1") and cls.sub_switches() == ("pull_l1",)
    fields = {f.name: f for f in dataclasses.fields(config)}
    hints = typing.get_type_hints(config)
    # after the built-in plugins' fields, before the output fields (the last five); the others as they were
    before = BIRConfig.field_names()
    assert list(fields) == [*before[:-5], *cls.fields(), *before[-5:]]
    for declared in cls.declared():
        assert (hints[declared.name], fields[declared.name].default) == (declared.type, declared.default)
        assert fields[declared.name].metadata["help"] == declared.help
    parser = argparse.ArgumentParser()
    add_config_flags(parser, config=config)
    args = parser.parse_args(["--latent-pull", "--lamda-pull", "3", "--pull-l1"])
    assert (args.latent_pull, args.lamda_pull, args.pull_l1) == (True, 3.0, True)
    assert flag_name("lamda_pull") == "--lamda-pull"
    with pytest.raises(ConfigError, match="--lamda-pull must be a number, got 'x'"):
        config(**BIR, latent_pull=True, lamda_pull="x").resolved()


def test_the_example_appears_in_every_derived_list(example):
    config, cls = example
    assert terms.registered()[-1] is cls   # after the built-in plugins
    assert set(cls.fields()) <= set(terms.replay_only_fields())
    assert not set(cls.fields()) & set(config(**BIR).first_task_fields())
    assert EXAGGERATION_OFF[cls.switch.name] is False and all(EXAGGERATION_OFF[s] is False for s in cls.sub_switches())
    assert method_label(config(**BIR, latent_pull=True).resolved()) == "BI-R+SI+latent_pull"
    assert config(**BIR, latent_pull=True).resolved().uses_exaggeration
    with pytest.raises(ConfigError, match="--latent-pull acts on replayed memories"):
        config(experiment="splitMNIST5k", latent_pull=True).resolved()
    with pytest.raises(ConfigError, match="--lamda-pull must be >= 0"):
        config(**BIR, latent_pull=True, lamda_pull=-1.0).resolved()
    with pytest.raises(ConfigError, match="--pull-l1 needs --latent-pull"):
        config(**BIR, pull_l1=True).resolved()
    with pytest.raises(ConfigError, match="--latent-pull needs the per-class GMM prior"):
        config(**(BIR | dict(brain_inspired=False, feedback=True)), latent_pull=True).resolved()


def test_the_example_space_searches_the_example_only(example):
    # (the sweep checks a space's names against BIRConfig, which this test's fields are not part of)
    _, cls = example
    space = yaml.safe_load(blocks("yaml")[0])
    assert space["fixed"] == {cls.switch.name: True} and set(space["params"]) <= set(cls.fields())


def _trained(cfg: BIRConfig) -> tuple[Engine, dict]:
    engine = Engine(cfg)
    engine.train_task()
    return engine, engine.train_task()


def test_the_example_trains_and_a_zero_weight_changes_nothing(example):
    config, cls = example
    baseline, _ = _trained(config(**BIR))
    zero, zero_metrics = _trained(config(**BIR, latent_pull=True, lamda_pull=0.0))
    pulled, pulled_metrics = _trained(config(**BIR, latent_pull=True, lamda_pull=100.0,
                                             pull_l1=True))
    assert zero_metrics["loss/latent_pull"] > 0 and pulled_metrics["loss/latent_pull"] > 0
    assert "plugins: si " in format_losses(pulled_metrics, ("si", "latent_pull"))
    assert "latent_pull" in format_losses(pulled_metrics, ("si", "latent_pull")).partition(" | ")[2]
    base, zeroed, moved = (e.model.state_dict() for e in (baseline, zero, pulled))
    assert all(torch.equal(base[k], zeroed[k]) for k in base)
    assert not torch.equal(base["toZ_mean.weight"], moved["toZ_mean.weight"])   # the pull acts on mu


def test_the_example_keeps_task_one_shareable(example):
    config, _ = example
    flags = dict(BIR, val_fraction=0.1)
    _, expected = _trained(config(**flags, latent_pull=True, lamda_pull=10.0))
    baseline = Engine(config(**flags))
    baseline.train_task()
    adopter = Engine(config(**flags, latent_pull=True, lamda_pull=10.0))
    adopter.adopt_first_task(copy.deepcopy(baseline.state_dict()))
    got = adopter.train_task()
    strip = lambda m: {k: v for k, v in m.items() if k != "time_this_step_s"}  # noqa: E731
    assert strip(got) == strip(expected)
