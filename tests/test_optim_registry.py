"""The optimizer and scheduler registries: every entry trains, round-trips its state, and is wired by flags."""

import copy
import math
import warnings

import pytest
import torch

from hf_optcore.config import ConfigError, HardwareConfig, TrainerConfig, TrainingConfig
from hf_optcore.optim import (
    CompositeOptimizer,
    Lion,
    OptimizerUnavailableError,
    UnknownNameError,
    create_scheduler,
    get_optimizer_info,
    get_scheduler_info,
    list_optimizers,
    list_schedulers,
    register_alias,
    register_optimizer,
    resolve_warmup_steps,
)
from hf_optcore.optim.hf_names import HF_OPTIMIZER_PACKAGES
from hf_optcore.optim.registry import _ALIASES, _OPTIMIZERS
from hf_optcore.optim.schedulers import HF_SCHEDULER_NAMES
from hf_optcore.optimizer_manager import OptimizerManager
from hf_optcore.tiny import build_tiny_model

# Learning rates at which each family moves a tiny model visibly in a few steps.
_LR = {"sgd": 0.5, "schedule_free_sgd": 0.5, "adagrad": 0.05, "lion": 3e-3, "rmsprop": 3e-3}
_NAMES = list_optimizers(include_aliases=False)


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 260, (4, 12), generator=g)
    return {"input_ids": ids, "labels": ids}


def _manager(name, model, **training):
    t = TrainingConfig(optimizer=name, learning_rate=_LR.get(name, 1e-2), weight_decay=0.01, scheduler="constant",
                       **training)
    return OptimizerManager(t, model)


@pytest.fixture
def scratch_registry():
    """Restore the registry after a test that registers names."""
    opts, aliases = dict(_OPTIMIZERS), dict(_ALIASES)
    yield
    _OPTIMIZERS.clear(), _OPTIMIZERS.update(opts)
    _ALIASES.clear(), _ALIASES.update(aliases)


# ---- names --------------------------------------------------------------------------------


def test_every_hf_optimizer_name_is_registered():
    from transformers.training_args import OptimizerNames

    hf = {o.value for o in OptimizerNames}
    assert set(HF_OPTIMIZER_PACKAGES) == hf, "hf_names.HF_OPTIMIZER_PACKAGES is out of date with transformers"
    assert hf <= set(list_optimizers())


def test_every_hf_scheduler_type_is_registered():
    from transformers.trainer_utils import SchedulerType

    hf = {s.value for s in SchedulerType}
    assert set(HF_SCHEDULER_NAMES) == hf
    assert hf | {"wsd", "cosine_min_lr"} == set(list_schedulers())


def test_unknown_name_lists_valid_names_and_closest_match():
    with pytest.raises(UnknownNameError, match=r"unknown optimizer 'adamww' \(did you mean 'adamw'\?\); registered: "):
        get_optimizer_info("adamww")
    with pytest.raises(UnknownNameError, match=r"did you mean 'cosine_min_lr'"):
        get_scheduler_info("cosine_min_lrr")
    with pytest.raises(ConfigError) as err:
        TrainerConfig.from_dict({"training": {"optimizer": "lionn", "scheduler": "wsdd"}})
    text = str(err.value)
    assert "training.optimizer: unknown optimizer 'lionn' (did you mean 'lion'?)" in text
    assert "training.scheduler: unknown scheduler 'wsdd' (did you mean 'wsd'?)" in text


def test_list_filter_glob_substring_and_aliases():
    assert list_optimizers("adamw_torch_*") == ["adamw_torch_4bit", "adamw_torch_8bit", "adamw_torch_fused",
                                                "adamw_torch_npu_fused", "adamw_torch_xla"]
    assert "muon" in list_optimizers("uon")
    assert "adamw_torch" in list_optimizers() and "adamw_torch" not in list_optimizers(include_aliases=False)
    assert get_optimizer_info("adamw_torch") is get_optimizer_info("adamw")
    available = set(list_optimizers(available_only=True))
    assert available >= {"adamw", "lion", "muon", "schedule_free_adamw"}
    # available_only keeps exactly the entries whose package imports; adamw_8bit needs bitsandbytes.
    assert available == {n for n in list_optimizers() if get_optimizer_info(n).is_available()}
    import importlib.util

    assert ("adamw_8bit" in available) == (importlib.util.find_spec("bitsandbytes") is not None)


def test_register_decorator_call_alias_and_overwrite_warning(scratch_registry):
    @register_optimizer("plain_sgd_test", description="test", has_momentum=True)
    class PlainSGD(torch.optim.SGD):
        pass

    info = get_optimizer_info("plain_sgd_test")
    assert info.factory is PlainSGD and info.has_momentum and not info.has_betas
    register_alias("psgd_test", "plain_sgd_test")
    assert get_optimizer_info("PSGD_TEST") is info
    with pytest.warns(UserWarning, match="already registered; replacing"):
        register_optimizer("plain_sgd_test", torch.optim.SGD)
    assert get_optimizer_info("plain_sgd_test").factory is torch.optim.SGD
    with pytest.raises(ValueError, match="already a registered optimizer"):
        register_alias("adamw", "sgd")


# ---- every registered optimizer -------------------------------------------------------------


@pytest.mark.parametrize("name", _NAMES)
def test_a_few_steps_lower_the_loss(name):
    info = get_optimizer_info(name)
    model = build_tiny_model("llama", seed=0)
    mgr = _manager(name, model)
    if not info.is_available():
        with pytest.raises(OptimizerUnavailableError, match=rf"'{name}' needs the package '{info.package}'"):
            mgr.create_optimizer()
        return
    mgr.create_optimizer()
    mgr.create_scheduler(20)
    batch = _batch()
    losses = []
    for _ in range(10):  # RAdam's first steps are a silent warmup
        loss = model(**batch).loss
        losses.append(loss.item())
        mgr.step(loss)
    with mgr.eval_mode():
        final = model(**batch).loss.item()
    assert final < losses[0] - 0.02, f"{name}: loss {losses[0]:.4f} -> {final:.4f}"


@pytest.mark.parametrize("name", [n for n in _NAMES if get_optimizer_info(n).is_available()])
def test_state_dict_round_trip_gives_an_identical_next_step(name):
    # With momentum, so that SGD and RMSprop have state to restore too.
    extra = {"optimizer_kwargs": {"momentum": 0.9}} if get_optimizer_info(name).has_momentum else {}
    model_a = build_tiny_model("llama", seed=0)
    mgr_a = _manager(name, model_a, **extra)
    opt_a = mgr_a.create_optimizer()
    for i in range(2):
        mgr_a.step(model_a(**_batch(i)).loss)
    model_b = copy.deepcopy(model_a)
    mgr_b = _manager(name, model_b, **extra)
    opt_b = mgr_b.create_optimizer()
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))
    for mgr, model in ((mgr_a, model_a), (mgr_b, model_b)):
        mgr.step(model(**_batch(7)).loss)
    for (n, pa), pb in zip(model_a.named_parameters(), model_b.parameters()):
        assert torch.equal(pa, pb), f"{name}: {n} differs after a restored step"
    assert len(opt_a.state_dict()["state"]) == len(opt_b.state_dict()["state"]) > 0


# ---- capability flags decide the kwargs ------------------------------------------------------


def test_flags_decide_which_kwargs_apply():
    model = build_tiny_model("llama", seed=0)
    t = TrainingConfig(optimizer="adamw", adam_beta1=0.8, adam_beta2=0.95, adam_epsilon=1e-6, weight_decay=0.1)
    kw = OptimizerManager(t, model).optimizer_kwargs()
    assert kw["betas"] == (0.8, 0.95) and kw["eps"] == 1e-6 and kw["fused"] is True and "foreach" not in kw
    lion = OptimizerManager(TrainingConfig(optimizer="lion"), model).optimizer_kwargs()  # no fused kernel
    assert lion["foreach"] is True and "fused" not in lion
    sgd = OptimizerManager(TrainingConfig(optimizer="sgd", optimizer_kwargs={"momentum": 0.9, "nesterov": True}),
                           model)
    kw = sgd.optimizer_kwargs()
    assert "betas" not in kw and "eps" not in kw and kw["momentum"] == 0.9
    assert sgd.create_optimizer().param_groups[0]["nesterov"] is True
    foreach = OptimizerManager(t, model, hardware=HardwareConfig(fused_optimizer="foreach"))
    assert foreach.optimizer_kwargs()["foreach"] is True
    assert foreach.create_optimizer().param_groups[0]["foreach"] is True
    loop = OptimizerManager(t, model, hardware=HardwareConfig(fused_optimizer="for-loop")).optimizer_kwargs()
    assert loop["foreach"] is False and loop["fused"] is False
    with pytest.raises(ValueError, match="hardware.fused_optimizer: 'fused' is not supported by optimizer 'lion'"):
        OptimizerManager(TrainingConfig(optimizer="lion"), model,
                         hardware=HardwareConfig(fused_optimizer="fused")).optimizer_kwargs()
    with pytest.raises(ValueError, match="hardware.fused_optimizer: 'foreach' is not supported by optimizer 'adafactor'"):
        OptimizerManager(TrainingConfig(optimizer="adafactor"), model,
                         hardware=HardwareConfig(fused_optimizer="foreach")).optimizer_kwargs()
    with pytest.raises(ConfigError, match="hardware.fused_optimizer: 'fused' is not supported by optimizer 'lion'"):
        TrainerConfig.from_dict({"training": {"optimizer": "lion"}, "hardware": {"fused_optimizer": "fused"}})
    yaml_betas = OptimizerManager(TrainingConfig(optimizer="lion", optimizer_kwargs={"betas": [0.9, 0.99]}), model)
    assert yaml_betas.create_optimizer().param_groups[0]["betas"] == (0.9, 0.99)


# ---- Lion and Muon ---------------------------------------------------------------------------


def test_lion_foreach_and_loop_match_the_formula():
    torch.manual_seed(0)
    p0 = [torch.randn(5, 3), torch.randn(4)]
    grads = [[torch.randn_like(p) for p in p0] for _ in range(3)]
    results = []
    for foreach in (True, False):
        params = [torch.nn.Parameter(p.clone()) for p in p0]
        opt = Lion(params, lr=0.1, betas=(0.9, 0.99), weight_decay=0.1, foreach=foreach)
        for gs in grads:
            for p, g in zip(params, gs):
                p.grad = g.clone()
            opt.step()
        results.append([p.detach().clone() for p in params])
    ref = [p.clone() for p in p0]
    moms = [torch.zeros_like(p) for p in p0]
    for gs in grads:
        for i, g in enumerate(gs):
            update = torch.sign(0.9 * moms[i] + 0.1 * g)
            ref[i] = ref[i] * (1 - 0.1 * 0.1) - 0.1 * update
            moms[i] = 0.99 * moms[i] + 0.01 * g
    for a, b, r in zip(*results, ref):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, r)


def test_muon_takes_hidden_matrices_and_adamw_the_rest_in_one_optimizer():
    model = build_tiny_model("llama", seed=0)
    opt = _manager("muon", model, optimizer_kwargs={}).create_optimizer()
    assert isinstance(opt, CompositeOptimizer)
    muon, adamw = opt.optimizers
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    names = {id(p): n for n, p in model.named_parameters()}
    muon_names = {names[id(p)] for g in muon.param_groups for p in g["params"]}
    adam_names = {names[id(p)] for g in adamw.param_groups for p in g["params"]}
    hidden = {n for n, p in model.named_parameters() if p.ndim == 2 and "embed" not in n and "lm_head" not in n}
    assert muon_names == hidden and len(hidden) == 14  # 2 layers x (q, k, v, o, gate, up, down)
    assert adam_names == set(names.values()) - hidden
    assert {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"} <= adam_names
    # One object: a scheduler drives both parts, state_dict covers every parameter, load re-links the parts.
    sched = create_scheduler("linear", opt, num_training_steps=4)
    model(**_batch()).loss.backward()
    opt.step()
    sched.step()
    assert muon.param_groups[0]["lr"] == adamw.param_groups[0]["lr"] == pytest.approx(1e-2 * 3 / 4)
    sd = opt.state_dict()
    assert len(sd["state"]) == len(names)
    opt.load_state_dict(copy.deepcopy(sd))
    assert muon.param_groups[0] is opt.param_groups[0] and muon.state is opt.state is adamw.state
    opt.step()
    sched.step()
    assert adamw.param_groups[-1]["lr"] == pytest.approx(1e-2 * 2 / 4)


# ---- schedulers ------------------------------------------------------------------------------


def _lrs(name, steps, warmup=0.0, **kw):
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=2.0)
    sched = create_scheduler(name, opt, steps, warmup=warmup, **kw)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"] / 2.0)
        opt.step()
        sched.step()
    return out


def _cos(x):
    return 0.5 * (1 + math.cos(math.pi * x))


@pytest.mark.parametrize(
    "name, kw, closed_form",
    [
        ("linear", {}, lambda s: s / 4 if s < 4 else (20 - s) / 16),
        ("cosine", {}, lambda s: s / 4 if s < 4 else _cos((s - 4) / 16)),
        ("constant_with_warmup", {}, lambda s: min(1.0, s / 4)),
        ("polynomial", {"power": 2.0, "lr_end": 0.0}, lambda s: s / 4 if s < 4 else ((20 - s) / 16) ** 2),
        ("inverse_sqrt", {}, lambda s: s / 4 if s < 4 else 1 / math.sqrt(s / 4)),
        ("cosine_min_lr", {"min_lr_ratio": 0.2}, lambda s: s / 4 if s < 4 else 0.2 + 0.8 * _cos((s - 4) / 16)),
        ("wsd", {"decay_ratio": 0.25, "min_lr_ratio": 0.1},
         lambda s: s / 4 if s < 4 else 1.0 if s < 15 else 0.1 + 0.9 * (1 - (s - 15) / 5)),
        ("wsd", {"num_decay_steps": 5, "decay_type": "cosine"}, lambda s: s / 4 if s < 4 else 1.0 if s < 15 else _cos((s - 15) / 5)),
        ("wsd", {"num_decay_steps": 5, "decay_type": "1-sqrt"},
         lambda s: s / 4 if s < 4 else 1.0 if s < 15 else 1 - math.sqrt((s - 15) / 5)),
    ],
)
def test_scheduler_lr_equals_its_closed_form(name, kw, closed_form):
    got = _lrs(name, 20, warmup=4, **kw)
    for step in (0, 1, 3, 4, 7, 12, 15, 16, 18, 19):
        assert got[step] == pytest.approx(closed_form(step), abs=1e-9), f"{name} at step {step}"


def test_warmup_as_steps_or_ratio():
    assert resolve_warmup_steps(5, 100) == 5
    assert resolve_warmup_steps(0.1, 95) == 10  # rounded up
    assert resolve_warmup_steps(0.0, 95) == 0
    assert _lrs("linear", 20, warmup=0.2) == _lrs("linear", 20, warmup=4)


def test_user_scheduler_registration(scratch_registry):
    from hf_optcore.optim import register_scheduler

    with warnings.catch_warnings():
        warnings.simplefilter("error")

        @register_scheduler("halving_test", description="halve every step")
        def halving(optimizer, *, num_warmup_steps, num_training_steps, factor=0.5):
            return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: factor ** s)

    try:
        assert _lrs("halving_test", 4) == [1.0, 0.5, 0.25, 0.125]
    finally:
        from hf_optcore.optim.schedulers import _SCHEDULERS

        _SCHEDULERS.pop("halving_test")
