"""OptimizerManager: parameter groups, the standalone step, mixed precision, schedule-free modes, Trainer glue."""

import inspect
import textwrap

import pytest
import torch
from transformers import Trainer

from hf_optcore.config import ConfigError, HardwareConfig, TrainerConfig, TrainingConfig
from hf_optcore.optim import CompositeOptimizer, register_optimizer, unwrap_optimizer
from hf_optcore.optim.registry import _OPTIMIZERS
from hf_optcore.optimizer_manager import OptimizerManager
from hf_optcore.tiny import build_tiny_model


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 260, (4, 12), generator=g)
    return {"input_ids": ids, "labels": ids}


def _group_of(mgr):
    return {n: i for i, g in enumerate(mgr.describe_param_groups()) for n in g["names"]}


# ---- parameter groups --------------------------------------------------------------------------


def test_no_decay_on_biases_norms_embeddings_and_frozen_excluded():
    model = build_tiny_model("llama", seed=0)
    model.model.layers[0].mlp.down_proj.weight.requires_grad_(False)
    mgr = OptimizerManager(TrainingConfig(weight_decay=0.1), model)
    groups = mgr.describe_param_groups()
    assert [(g["weight_decay"], g["lr"]) for g in groups] == [(0.0, 2e-4), (0.1, 2e-4)]
    no_decay, decay = (set(g["names"]) for g in groups)
    assert no_decay == {"model.embed_tokens.weight", "model.norm.weight"} | {
        f"model.layers.{i}.{n}.weight" for i in (0, 1) for n in ("input_layernorm", "post_attention_layernorm")}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert decay == trainable - no_decay and "lm_head.weight" in decay
    assert "model.layers.0.mlp.down_proj.weight" not in decay | no_decay
    assert sum(g["num_params"] for g in groups) == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_gpt2_embeddings_and_layernorms_caught_by_module_class():
    model = build_tiny_model("gpt2", seed=0)
    groups = OptimizerManager(TrainingConfig(weight_decay=0.1), model).describe_param_groups()
    no_decay = set(groups[0]["names"])
    assert {"transformer.wte.weight", "transformer.wpe.weight", "transformer.h.0.ln_1.weight",
            "transformer.h.0.ln_1.bias", "transformer.h.0.attn.c_attn.bias"} <= no_decay
    assert "transformer.h.0.attn.c_attn.weight" in groups[1]["names"]
    # Patterns are configurable: [] decays everything, so one group remains.
    all_decay = OptimizerManager(TrainingConfig(weight_decay=0.1, no_decay_patterns=[]), model)
    assert [g["weight_decay"] for g in all_decay.describe_param_groups()] == [0.1]


def test_lr_multipliers_longest_pattern_wins_and_empty_groups_dropped():
    model = build_tiny_model("llama", seed=0)
    t = TrainingConfig(learning_rate=1e-3, lr_multipliers={"mlp": 0.5, "mlp.down_proj": 3.0, "nothing_matches": 9.0})
    mgr = OptimizerManager(t, model)
    where = _group_of(mgr)
    groups = mgr.describe_param_groups()
    lr = {n: groups[i]["lr"] for n, i in where.items()}
    assert lr["model.layers.1.mlp.up_proj.weight"] == pytest.approx(5e-4)
    assert lr["model.layers.1.mlp.down_proj.weight"] == pytest.approx(3e-3)
    assert lr["model.layers.1.self_attn.q_proj.weight"] == pytest.approx(1e-3)
    assert sorted(g["lr"] for g in groups) == pytest.approx([5e-4, 1e-3, 3e-3])  # no group for 9.0
    opt = mgr.create_optimizer()
    assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in groups]


def test_lora_plus_ratio_scales_lora_b_only():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(build_tiny_model("llama", seed=0),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_alpha=8))
    mgr = OptimizerManager(TrainingConfig(learning_rate=1e-3, lora_plus_ratio=16.0), model)
    groups = mgr.describe_param_groups()
    by_lr = {round(g["lr"], 9): set(g["names"]) for g in groups}
    assert set(by_lr) == {1e-3, 1.6e-2}
    assert all("lora_B" in n for n in by_lr[1.6e-2]) and len(by_lr[1.6e-2]) == 4
    assert all("lora_A" in n for n in by_lr[1e-3]) and len(by_lr[1e-3]) == 4  # base weights are frozen


# ---- standalone loop ---------------------------------------------------------------------------


def test_standalone_api_steps_clips_schedules_and_zeroes():
    config = TrainerConfig.from_dict({"training": {"optimizer": "adamw", "learning_rate": 1e-2, "scheduler": "linear",
                                                   "warmup_steps": 2, "max_grad_norm": 0.5}})
    model = build_tiny_model("llama", seed=0)
    mgr = OptimizerManager(config.training, model, use_amp=True)
    optimizer = mgr.create_optimizer()
    scheduler = mgr.create_scheduler(10)
    scaler = mgr.create_scaler()
    assert isinstance(scaler, torch.amp.GradScaler) and not scaler.is_enabled()  # bf16 on CPU: no scaling
    assert mgr.amp_dtype == torch.bfloat16
    before = model.lm_head.weight.detach().clone()
    with mgr.autocast():
        loss = model(**_batch()).loss
    assert loss.dtype == torch.float32 and torch.is_autocast_cpu_enabled() is False
    out = mgr.step(loss)
    assert out["stepped"] and out["grad_norm"] > 0 and out["lr"] == pytest.approx(1e-2 * 1 / 2)
    assert scheduler.last_epoch == 1 and optimizer.param_groups[0]["lr"] == pytest.approx(5e-3)
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(before, model.lm_head.weight)  # warmup: the first step ran at lr 0
    with mgr.autocast():
        assert mgr.step(model(**_batch(1)).loss)["lr"] == pytest.approx(1e-2)
    assert not torch.equal(before, model.lm_head.weight)


def test_gradient_accumulation_steps_once_per_window():
    model = build_tiny_model("llama", seed=0)
    mgr = OptimizerManager(TrainingConfig(learning_rate=1e-2, gradient_accumulation_steps=2, max_grad_norm=0,
                                          scheduler="constant"), model)
    mgr.create_optimizer()
    w0 = model.lm_head.weight.detach().clone()
    first = mgr.step(model(**_batch(0)).loss)
    assert not first["stepped"] and torch.equal(w0, model.lm_head.weight)
    assert model.lm_head.weight.grad is not None
    assert mgr.step(model(**_batch(1)).loss)["stepped"] and not torch.equal(w0, model.lm_head.weight)
    # The same update as one step on the mean of both losses.
    ref = build_tiny_model("llama", seed=0)
    ref_mgr = OptimizerManager(TrainingConfig(learning_rate=1e-2, max_grad_norm=0, scheduler="constant"), ref)
    ref_mgr.create_optimizer()
    ref_mgr.step((ref(**_batch(0)).loss + ref(**_batch(1)).loss) / 2)
    torch.testing.assert_close(model.lm_head.weight, ref.lm_head.weight)


def test_non_finite_gradient_skips_the_step():
    model = build_tiny_model("llama", seed=0)
    mgr = OptimizerManager(TrainingConfig(learning_rate=1e-2, scheduler="linear"), model)
    mgr.create_optimizer()
    sched = mgr.create_scheduler(5)
    w0 = model.lm_head.weight.detach().clone()
    out = mgr.step(model(**_batch()).loss * float("nan"))
    assert out["skipped"] and not out["stepped"] and sched.last_epoch == 0
    assert torch.equal(w0, model.lm_head.weight)


def test_fp16_needs_cuda():
    model = build_tiny_model("llama", seed=0)
    with pytest.raises(ValueError, match="hardware.fp16: float16 mixed precision needs a CUDA GPU, but the model is on cpu"):
        OptimizerManager(TrainingConfig(), model, hardware=HardwareConfig(fp16=True))
    with pytest.raises(ConfigError, match="hardware.fp16: float16 mixed precision needs a CUDA GPU"):
        TrainerConfig.from_dict({"hardware": {"fp16": True}}).validate(cuda_available=False)


def test_schedule_free_eval_mode_round_trip_and_own_warmup():
    model = build_tiny_model("llama", seed=0)
    t = TrainingConfig(optimizer="schedule_free_adamw", learning_rate=1e-2, warmup_steps=0.25, scheduler="cosine")
    mgr = OptimizerManager(t, model)
    opt = mgr.create_optimizer()
    assert opt.param_groups[0]["train_mode"] is True
    sched = mgr.create_scheduler(8)
    assert opt.param_groups[0]["warmup_steps"] == 2  # ratio 0.25 of 8 steps, run by the optimizer itself
    for i in range(3):
        mgr.step(model(**_batch(i)).loss)
        assert sched.get_last_lr()[0] == pytest.approx(1e-2)  # constant schedule
    train_point = model.lm_head.weight.detach().clone()
    with mgr.eval_mode():
        assert opt.param_groups[0]["train_mode"] is False
        assert not torch.equal(train_point, model.lm_head.weight)
    assert opt.param_groups[0]["train_mode"] is True
    torch.testing.assert_close(train_point, model.lm_head.weight)


# ---- Trainer integration -----------------------------------------------------------------------


def _dataset(n=16):
    g = torch.Generator().manual_seed(1)
    return [{"input_ids": (ids := torch.randint(0, 256, (12,), generator=g).tolist()), "labels": ids,
             "attention_mask": [1] * 12} for _ in range(n)]


def _trainer(tmp_path, training, checkpoint=None, **kw):
    from hf_optcore import OptCoreTrainer

    cfg = TrainerConfig.from_dict({
        "output_dir": str(tmp_path / "out"),
        "training": {"max_steps": 4, "per_device_train_batch_size": 4, "logging_steps": 1, "learning_rate": 1e-2,
                     "report_to": "none", **training},
        "hardware": {"use_cpu": True},
        "checkpoint": checkpoint or {},
    })
    return OptCoreTrainer(model=build_tiny_model("llama", seed=0), args=cfg, train_dataset=_dataset(), **kw)


def test_trainer_overrides_keep_transformers_signatures():
    from hf_optcore import OptCoreTrainer

    for name in ("create_optimizer", "create_scheduler"):
        ours = list(inspect.signature(getattr(OptCoreTrainer, name)).parameters)
        theirs = list(inspect.signature(getattr(Trainer, name)).parameters)
        assert ours == theirs, f"{name}: {ours} != transformers' {theirs}"


def test_trainer_builds_registry_optimizer_and_scheduler(tmp_path):
    trainer = _trainer(tmp_path, {"optimizer": "muon", "scheduler": "cosine_min_lr",
                                  "scheduler_kwargs": {"min_lr_ratio": 0.5}, "warmup_steps": 1})
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    assert isinstance(unwrap_optimizer(trainer.optimizer), CompositeOptimizer)
    # After 4 of 4 steps with 1 warmup step: cosine has reached its floor, 0.5 x peak.
    assert trainer.lr_scheduler.get_last_lr()[0] == pytest.approx(0.5e-2)
    changed = [n for n, p in trainer.model.named_parameters() if not torch.equal(before[n], p)]
    assert "model.layers.0.self_attn.q_proj.weight" in changed and "model.embed_tokens.weight" in changed


def test_trainer_evaluates_schedule_free_at_its_average_and_resumes_training_mode(tmp_path):
    trainer = _trainer(tmp_path, {"optimizer": "schedule_free_adamw", "scheduler": "constant"},
                       eval_dataset=_dataset(4))
    trainer.train()
    inner = unwrap_optimizer(trainer.optimizer)
    inner.train()
    seen = []
    original = trainer.evaluation_loop
    trainer.evaluation_loop = lambda *a, **k: (seen.append(inner.param_groups[0]["train_mode"]), original(*a, **k))[1]
    metrics = trainer.evaluate()
    assert seen == [False] and inner.param_groups[0]["train_mode"] is True
    assert metrics["eval_loss"] > 0


def test_plain_training_arguments_keep_transformers_optimizer(tmp_path):
    from transformers import TrainingArguments

    from hf_optcore import OptCoreTrainer

    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", weight_decay=0.1,
                             lr_scheduler_type="linear", warmup_steps=2)
    model = build_tiny_model("llama", seed=0)
    ours = OptCoreTrainer(model=model, args=args)
    theirs = Trainer(model=model, args=args)
    a, b = ours.create_optimizer(), theirs.create_optimizer()
    assert type(a) is type(b) is torch.optim.AdamW
    assert [len(g["params"]) for g in a.param_groups] == [len(g["params"]) for g in b.param_groups]
    assert type(ours.create_scheduler(10)) is type(theirs.create_scheduler(10))
    assert not hasattr(ours, "optimizer_manager")


def test_user_registered_optimizer_from_yaml_end_to_end(tmp_path):
    calls = []

    @register_optimizer("counting_sgd_test", description="SGD that counts its steps", has_momentum=True)
    class CountingSGD(torch.optim.SGD):
        def step(self, closure=None):
            calls.append(self.param_groups[0]["lr"])
            return super().step(closure)

    try:
        path = tmp_path / "run.yaml"
        path.write_text(textwrap.dedent(f"""
            output_dir: {tmp_path / 'out'}
            training:
              optimizer: counting_sgd_test
              optimizer_kwargs: {{momentum: 0.9}}
              scheduler: wsd
              scheduler_kwargs: {{decay_ratio: 0.5}}
              learning_rate: 0.1
              max_steps: 4
              per_device_train_batch_size: 4
              report_to: none
            hardware: {{use_cpu: true}}
        """))
        from hf_optcore import OptCoreTrainer

        cfg = TrainerConfig.from_yaml(path)
        model = build_tiny_model("llama", seed=0)
        trainer = OptCoreTrainer(model=model, args=cfg, train_dataset=_dataset())
        first = trainer.model.lm_head.weight.detach().clone()
        result = trainer.train()
        assert isinstance(unwrap_optimizer(trainer.optimizer), CountingSGD)
        assert unwrap_optimizer(trainer.optimizer).param_groups[0]["momentum"] == 0.9
        # wsd over 4 steps, last 2 decaying linearly to 0: 0.1, 0.1, 0.1 x (1 - 0/2), 0.1 x (1 - 1/2).
        assert calls == pytest.approx([0.1, 0.1, 0.1, 0.05])
        assert result.global_step == 4 and not torch.equal(first, trainer.model.lm_head.weight)
    finally:
        _OPTIMIZERS.pop("counting_sgd_test", None)


def test_schedule_free_resume_is_exact(tmp_path):
    # Saved at the evaluation point (eval mode), restored into train mode by the next training step.
    from transformers import TrainerCallback

    class StepCounter(TrainerCallback):
        steps = 0

        def on_step_end(self, args, state, control, **kwargs):
            self.steps += 1

    def run(name, resume=None):
        counter = StepCounter()
        trainer = _trainer(tmp_path / name, {"optimizer": "schedule_free_adamw", "scheduler": "constant"},
                           checkpoint={"every_n_steps": 2, "keep_last": 3, "resume_from": resume},
                           callbacks=[counter])
        trainer.train()
        return trainer, counter.steps

    full, _ = run("full")
    resumed, steps_run = run("resumed", resume=str(tmp_path / "full" / "out" / "checkpoint-2"))
    assert resumed.state.global_step == 4 and steps_run == 2  # it did resume, not restart
    for (n, a), b in zip(full.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(a, b), n
