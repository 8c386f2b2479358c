"""docs/extending.md's worked example runs: its fields, its class and its search space, taken from the page itself,
registered, present in every derived list, and used in a 2-task run (a zero weight changes nothing)."""

from __future__ import annotations

import copy
import dataclasses
import re
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

import tune_bir.config
from search_spaces import EXAGGERATION_OFF
from tune_bir import terms
from tune_bir.config import BIRConfig
from tune_bir.engine import Engine
from tune_bir.errors import ConfigError
from tune_bir.train import format_losses, method_label

PAGE = Path(__file__).resolve().parents[1] / "docs" / "extending.md"
BIR = dict(experiment="splitMNIST5k", replay="generative", brain_inspired=True, si=True, c=0.1, device="cpu",
           batch=32, seed=0, iters=3, fc_units=100)


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", PAGE.read_text(), flags=re.S)


@pytest.fixture(scope="module")
def example():
    """The page's config fields (in a BIRConfig subclass: a real plugin adds them to BIRConfig) and its class,
    executed as the page gives them, and the class registered."""
    fields, plugin = blocks("python")[:2]
    namespace = vars(tune_bir.config) | {"dataclass": dataclasses.dataclass}
    exec(f"@dataclass\nclass ExampleConfig(BIRConfig):\n{textwrap.indent(textwrap.dedent(fields), '    ')}",
         namespace)
    exec("import torch\nfrom tune_bir.exaggeration import _AdditiveTerm, masked_mean\n"
         "from tune_bir.plugin import PluginContext, register\nfrom tune_bir.replay_batch import ReplayBatch\n"
         "from tune_bir.errors import ConfigError\n" + plugin, namespace)
    yield namespace["ExampleConfig"], namespace["LatentPull"]
    terms.unregister(namespace["LatentPull"].name)


def test_the_example_appears_in_every_derived_list(example):
    config, cls = example
    assert terms.registered()[-1] is cls   # after the built-in plugins
    assert set(cls.fields()) <= set(terms.replay_only_fields())
    assert not set(cls.fields()) & set(config(**BIR).first_task_fields())
    assert EXAGGERATION_OFF[cls.switch] is False and all(EXAGGERATION_OFF[s] is False for s in cls.sub_switches)
    assert method_label(config(**BIR, latent_pull=True).resolved()) == "BI-R+SI+latent_pull"
    assert config(**BIR, latent_pull=True).resolved().uses_exaggeration
    with pytest.raises(ConfigError, match="--latent-pull acts on replayed memories"):
        config(experiment="splitMNIST5k", latent_pull=True).resolved()
    with pytest.raises(ConfigError, match="--lamda-pull must be >= 0"):
        config(**BIR, latent_pull=True, lamda_pull=-1.0).resolved()
    with pytest.raises(ConfigError, match=f"{cls.sub_switches[0].replace('_', '-')} needs --latent-pull"):
        config(**BIR, **{cls.sub_switches[0]: True}).resolved()
    with pytest.raises(ConfigError, match="--latent-pull needs the per-class GMM prior"):
        config(**(BIR | dict(brain_inspired=False, feedback=True)), latent_pull=True).resolved()


def test_the_example_space_searches_the_example_only(example):
    # (the sweep checks a space's names against BIRConfig, which this test's fields are not part of)
    _, cls = example
    space = yaml.safe_load(blocks("yaml")[0])
    assert space["fixed"] == {cls.switch: True} and set(space["params"]) <= set(cls.fields())


def _trained(cfg: BIRConfig) -> tuple[Engine, dict]:
    engine = Engine(cfg)
    engine.train_task()
    return engine, engine.train_task()


def test_the_example_trains_and_a_zero_weight_changes_nothing(example):
    config, cls = example
    baseline, _ = _trained(config(**BIR))
    zero, zero_metrics = _trained(config(**BIR, latent_pull=True, lamda_pull=0.0))
    pulled, pulled_metrics = _trained(config(**BIR, latent_pull=True, lamda_pull=100.0,
                                             **{cls.sub_switches[0]: True}))
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
