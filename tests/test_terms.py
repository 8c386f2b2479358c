"""The plugin registry: built-in declarations, lists derived from them, every built-in term in the learner."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import math
import re
import typing

import pytest
import torch

from search_spaces import EXAGGERATION_OFF
from tune_bir import terms
from tune_bir.cli import add_config_flags
from tune_bir.config import RUN_OUTPUT_FIELDS, BIRConfig
from tune_bir.engine import Engine
from tune_bir.errors import ConfigError
from tune_bir.fields import field_name, flag_name
from tune_bir.train import method_label

BIR = dict(experiment="splitMNIST5k", replay="generative", brain_inspired=True, si=True, c=0.1, device="cpu",
           batch=32, seed=0, iters=3, fc_units=100)


# -- the built-in terms ------------------------------------------------------------------------------
def test_every_declared_field_is_a_config_field_with_its_type_default_help_and_flag():
    # BIRConfig, its CLI flags and its type checks are derived from the declarations: each declared field of
    # each registered plugin (built in or not) appears once, as declared
    hints = typing.get_type_hints(BIRConfig)
    fields = {f.name: f for f in dataclasses.fields(BIRConfig)}
    parser = argparse.ArgumentParser()
    add_config_flags(parser)
    flags = {a.dest: a for a in parser._actions}
    for term in terms.registered():
        assert term.switch.kind is bool and getattr(BIRConfig(), term.switch.name) is False, term.name
        for declared in term.declared():
            f = fields[declared.name]
            assert hints[f.name] == declared.type and f.default == declared.default, f.name
            assert f.metadata["help"] == declared.help and f.metadata.get("choices") == declared.choices, f.name
            assert flag_name(f.name) in flags[f.name].option_strings, f.name
            assert declared.help in flags[f.name].help, f.name
    assert flag_name("ewc_lambda") == "--lambda" and field_name("--lambda") == "ewc_lambda"   # a declared flag
    assert list(fields)[-len(RUN_OUTPUT_FIELDS):] == list(RUN_OUTPUT_FIELDS)   # outputs last, after the plugins'
    assert len(terms.declared_fields()) == len({f.name for f in terms.declared_fields()})


def test_a_shared_field_is_one_declaration_in_one_place():
    plugins = {t.name: t for t in terms.registered()}
    gate = {f.name: f for f in plugins["repulsion"].declared()}
    assert all(gate[n] is f for f in plugins["recon_repulsion"].declared() for n in [f.name] if n in gate)
    aver = [f for t in ("recon_repulsion", "recon_attraction") for f in plugins[t].declared()
            if f.name == "recon_rep_aver"]
    assert len(aver) == 2 and aver[0] is aver[1]


RANGED = [f for f in terms.declared_fields() if f.minimum is not None or f.maximum is not None]


@pytest.mark.parametrize("declared", RANGED, ids=lambda f: f.name)
def test_every_declared_range_is_checked_in_one_line(declared):
    # just outside the range (or not a finite number): refused by the field's own rule, whoever declares it
    low, high = declared.minimum, declared.maximum
    outside = low - 1 if low is not None and declared.minimum_inclusive else low if low is not None else high + 1
    values = dict(BIR, **{declared.name: type(declared.default or declared.kind(0))(outside)})
    with pytest.raises(ConfigError, match=f"^{flag_name(declared.name)} must be {re.escape(declared.rule())}, got"):
        BIRConfig(**values).resolved()
    if declared.kind is float:
        with pytest.raises(ConfigError, match=f"^{flag_name(declared.name)} must be"):
            BIRConfig(**dict(BIR, **{declared.name: math.nan})).resolved()


def test_derived_lists_hold_the_ones_once_written_by_hand():
    # the lists that five places of the code kept by hand before the registry: the built-in plugins are among
    # them in this order (a plugin added later, built in or not, breaks nothing here)
    builtin = ("si", "repulsion", "recon_repulsion", "recon_attraction", "contrastive", "not_hidden")
    assert tuple(s for s in terms.switches() if s in builtin) == builtin
    assert set(terms.replay_only_fields()) >= {
        "repulsion", "lamda_rep", "kl_js", "use_rep_f", "rep_f", "n_rep", "rep_target", "d_min",
        "recon_repulsion", "lamda_recon_rep", "recon_attraction", "lamda_recon_atr", "recon_rep_aver",
        "contrastive", "c_temp", "c_lr", "c_drop", "c_scores", "c_hard", "not_hidden", "lamda_contr",
        "contr_grad_mode", "aux_decoder"}
    assert not {"si", "c", "epsilon"} & set(terms.replay_only_fields())   # SI acts in task 1 too
    assert dict(EXAGGERATION_OFF).items() >= {
        "repulsion": False, "recon_repulsion": False, "recon_attraction": False, "contrastive": False,
        "use_rep_f": False, "recon_rep_aver": False, "c_scores": False, "c_hard": False}.items()
    assert "si" not in EXAGGERATION_OFF and "not_hidden" not in EXAGGERATION_OFF   # a baseline keeps them
    label = method_label(BIRConfig(**BIR, repulsion=True, recon_attraction=True, not_hidden=True).resolved())
    assert label == "BI-R+SI+repulsion+recon_attraction+not_hidden"


def test_not_hidden_is_a_control_not_an_exaggeration():
    cfg = BIRConfig(**BIR, not_hidden=True).resolved()
    assert not cfg.uses_exaggeration
    assert [t.name for t in terms.enabled(cfg)] == ["si", "not_hidden"]


@pytest.mark.parametrize("flags, message", [
    (dict(use_rep_f=True), "--use-rep-f needs --repulsion or --recon-repulsion"),
    (dict(recon_rep_aver=True), "--recon-rep-aver needs --recon-repulsion or --recon-attraction"),
    (dict(c_hard=True), "--c-hard needs --contrastive"),
    (dict(contrastive=True, c_scores=True, c_hard=True), "alternatives"),
    (dict(repulsion=True, lamda_rep=-1.0), "--lamda-rep must be >= 0"),
    (dict(repulsion=True, use_rep_f=True, rep_f=1.0), "--rep-f must be > 1"),
])
def test_term_checks_refuse_with_one_line(flags, message):
    with pytest.raises(ConfigError, match=message) as info:
        BIRConfig(**BIR, **flags).resolved()
    assert "\n" not in str(info.value)


def test_a_resolved_config_resolves_to_itself_until_changed():
    cfg = BIRConfig(**BIR).resolved()
    assert cfg.is_resolved and cfg.resolved() is cfg
    assert not dataclasses.replace(cfg, seed=4).is_resolved
    cfg.iters = -1
    assert not cfg.is_resolved
    with pytest.raises(ConfigError, match="--iters must be > 0"):
        cfg.resolved()


# -- a plugin registered from outside: docs/extending.md's worked example, tests/test_extending.py -----


# -- every built-in term reaches the learner's gradient ------------------------------------------------
@functools.cache
def _task_one(iters: int) -> dict:
    """The state after task 1 of the BIR config below (every term config adopts it: terms act from task 2)."""
    engine = Engine(BIRConfig(**BIR | dict(iters=iters)))
    engine.train_task()
    return copy.deepcopy(engine.state_dict())


def _replay_step(cfg: BIRConfig) -> tuple[Engine, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Task 1 trained, then one replay step of task 2: the gradients of the learner's main objective and of a
    term's own objective (empty without one), by parameter name."""
    engine = Engine(cfg)
    engine.adopt_first_task(copy.deepcopy(_task_one(cfg.iters)))
    train = engine.data.train[1]
    objectives = engine.replay.objectives(train.x[:32], train.y[:32], 2)
    params = dict(engine.model.named_parameters())
    main = torch.autograd.grad(objectives.main, list(params.values()), allow_unused=True, retain_graph=True)
    own = {}
    if objectives.own is not None:
        term, value = objectives.own
        named = {**{f"fcE.{n}": p for n, p in engine.model.fcE.named_parameters()},
                 **{f"head.{n}": p for n, p in term.head.named_parameters()}}
        grads = torch.autograd.grad(term.weight * value, list(named.values()), allow_unused=True)
        own = {n: g for n, g in zip(named, grads, strict=True) if g is not None}
    return engine, {n: g for n, g in zip(params, main, strict=True) if g is not None}, own


ACTIVE = {   # each built-in additive term with a weight that acts, and the parameters its gradient must reach
    "repulsion": (dict(repulsion=True, lamda_rep=1e3), "toZ_mean.weight"),
    "repulsion_sample_kl": (dict(repulsion=True, lamda_rep=1e3, rep_target="sample", kl_js="kl"), "toZ_mean.weight"),
    "recon_repulsion": (dict(recon_repulsion=True, lamda_recon_rep=10.0), "fcD_out.weight"),
    "recon_attraction": (dict(recon_attraction=True, lamda_recon_atr=10.0), "fcD_out.weight"),
}


@pytest.mark.parametrize("term", ACTIVE)
def test_a_weighted_builtin_term_changes_the_learners_gradient_and_a_zero_weight_does_not(term):
    # the engine adds weight * value of every additive term to the replay loss; without that line (or with
    # the term left out of the objective) the gradients below equal the baseline's
    flags, reached = ACTIVE[term]
    weight_field = next(k for k in flags if k.startswith("lamda"))
    # a task 1 long enough that the previous model tells its two classes apart: replayed memories of both
    # classes, so the terms that need a member of the competing class have valid anchors
    trained = dict(BIR, iters=40)
    _, base, _ = _replay_step(BIRConfig(**trained))
    _, zero, _ = _replay_step(BIRConfig(**trained, **(flags | {weight_field: 0.0})))
    engine, active, _ = _replay_step(BIRConfig(**trained, **flags))
    assert [t.name for t in engine.terms] == [next(k for k, v in flags.items() if v is True)]
    assert base.keys() == zero.keys() == active.keys()
    assert all(torch.equal(base[k], zero[k]) for k in base)
    assert not torch.equal(base[reached], active[reached]), reached
    # and only the term's share differs: the encoder's classifier head gets no replay-term gradient
    assert torch.equal(base["classifier.weight"], active["classifier.weight"])


def test_contrastive_replay_steps_the_encoder_with_its_weighted_objective():
    # separate mode: the main objective's gradient is BI-R's; lamda_contr * L_con is the encoder optimiser's
    _, base, _ = _replay_step(BIRConfig(**BIR))
    _, main, own = _replay_step(BIRConfig(**BIR, contrastive=True, c_lr=1e-3, c_scores=True))
    _, _, zero = _replay_step(BIRConfig(**BIR, contrastive=True, c_lr=1e-3, c_scores=True, lamda_contr=0.0))
    assert all(torch.equal(base[k], main[k]) for k in base)
    assert own and all(g.abs().sum() > 0 for g in own.values())
    assert all(torch.count_nonzero(g) == 0 for g in zero.values())
    # end to end: one task of contrastive replay moves the encoder away from BI-R's, a zero weight does not
    def encoder(**flags):
        engine = Engine(BIRConfig(**BIR, **flags))
        engine.train_task()
        engine.train_task()
        return engine.model.fcE[0].weight.detach()

    plain = encoder()
    assert (encoder(contrastive=True, c_lr=1e-3, c_drop=0.0, lamda_contr=0.0) - plain).abs().max() < 1e-6
    assert (encoder(contrastive=True, c_lr=1e-3, c_drop=0.0) - plain).abs().max() > 1e-4
