"""EMA and token-exact evaluation inside OptCoreTrainer: one update per optimizer step, live and EMA
metrics side by side, best-model tracking on an EMA metric, export to output_dir/ema, exact resume."""

import inspect
import math

import pytest
import torch

from hf_optcore.config import TrainerConfig
from hf_optcore.evaluator import Evaluator
from hf_optcore.tiny import build_tiny_model

PAD = 259


def _dataset(n, seed):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        length = 6 + (i * 7) % 19  # unequal lengths
        ids = torch.randint(0, 256, (length,), generator=g)
        labels = ids.clone()
        labels[: length // 3] = -100
        rows.append({"input_ids": ids.tolist(), "labels": labels.tolist()})
    return rows


def collate(rows):
    t = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), t), PAD)
    labels = torch.full((len(rows), t), -100)
    mask = torch.zeros((len(rows), t), dtype=torch.long)
    for j, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[j, :n], labels[j, :n], mask[j, :n] = torch.tensor(r["input_ids"]), torch.tensor(r["labels"]), 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _config(tmp_path, **sections):
    raw = {
        "output_dir": str(tmp_path / "run"),
        "model": {"name_or_path": "tiny:llama", "lora": {"enabled": False}},
        "training": {"learning_rate": 5e-3, "per_device_train_batch_size": 2, "per_device_eval_batch_size": 3,
                     "max_steps": 6, "logging_steps": 1, "scheduler": "constant", "optimizer": "adamw",
                     "seed": 0},
        "hardware": {"use_cpu": True, "dataloader_pin_memory": False},
        "ema": {"enabled": True, "decay": 0.7},
    }
    for key, value in sections.items():
        raw.setdefault(key, {}).update(value) if isinstance(value, dict) else raw.__setitem__(key, value)
    return TrainerConfig.from_dict(raw)


def _trainer(cfg, model=None, train_n=24, eval_n=7, **kw):
    from hf_optcore import OptCoreTrainer

    return OptCoreTrainer(model if model is not None else build_tiny_model("llama", seed=0), args=cfg,
                          train_dataset=_dataset(train_n, 1), eval_dataset=_dataset(eval_n, 2),
                          data_collator=collate, **kw)


def test_one_update_per_optimizer_step_under_accumulation(tmp_path):
    cfg = _config(tmp_path, training={"gradient_accumulation_steps": 3, "max_steps": 4})
    trainer = _trainer(cfg)
    ema = trainer.optcore_state["ema"].manager
    calls = []
    original = ema.update
    ema.update = lambda step=None: calls.append(step) or original(step)
    weights = []
    from transformers import TrainerCallback

    class Record(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            weights.append({n: p.detach().double().clone() for n, p in trainer.model.named_parameters()})

    trainer.add_callback(Record())
    trainer.train()
    assert calls == [1, 2, 3, 4]  # 12 micro-batches, 4 optimizer steps
    assert ema.num_updates == 4 and ema.step == 4
    # And the shadows are the EMA of the weights after each optimizer step.
    init = {n: p.detach().double().clone() for n, p in build_tiny_model("llama", seed=0).named_parameters()}
    for name, w0 in init.items():
        ref = w0
        for w in weights:
            ref = 0.7 * ref + 0.3 * w[name]
        torch.testing.assert_close(ema.shadow[name].double(), ref, rtol=0, atol=1e-6)


def test_eval_reports_token_weighted_live_and_ema_metrics(tmp_path):
    cfg = _config(tmp_path, training={"max_steps": 2})
    trainer = _trainer(cfg)
    trainer.train()
    metrics = trainer.evaluate()
    for key in ("eval_loss", "eval_perplexity", "eval_token_accuracy", "eval_ema_loss", "eval_ema_perplexity",
                "eval_ema_token_accuracy", "eval_runtime"):
        assert key in metrics and math.isfinite(metrics[key]), key
    assert metrics["eval_perplexity"] == pytest.approx(math.exp(metrics["eval_loss"]))
    # The same numbers as the standalone Evaluator on the same batches (the trainer's model, live weights).
    batches = [collate(_dataset(7, 2)[i:i + 3]) for i in range(0, 7, 3)]
    alone = Evaluator(cfg.training, trainer.model, batches, "cpu",
                      ema_manager=trainer.optcore_state["ema"].manager).evaluate()
    assert metrics["eval_loss"] == pytest.approx(alone["loss"], abs=1e-6)
    assert metrics["eval_ema_loss"] == pytest.approx(alone["ema_loss"], abs=1e-6)
    assert metrics["eval_label_tokens"] == alone["label_tokens"]
    assert trainer.state.log_history[-1]["eval_ema_loss"] == metrics["eval_ema_loss"]  # logged like HF
    named = trainer.evaluate(eval_dataset={"a": _dataset(7, 2), "b": _dataset(4, 3)})
    assert named["eval_a_loss"] == pytest.approx(metrics["eval_loss"], abs=1e-6)
    assert {"eval_b_loss", "eval_b_ema_loss", "eval_a_ema_perplexity"} <= set(named)


def test_ema_saved_as_loadable_model_and_used_as_final(tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = _config(tmp_path, training={"max_steps": 3}, ema={"use_for_final_model": True})
    trainer = _trainer(cfg)
    trainer.train()
    ema = trainer.optcore_state["ema"].manager
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "ema")
    for name, p in loaded.named_parameters():
        assert torch.equal(p, ema.shadow[name]), name
    for name, p in trainer.model.named_parameters():  # the final model is the EMA one
        assert torch.equal(p, ema.shadow[name]), name


def test_lora_run_saves_ema_adapter_only(tmp_path):
    peft = pytest.importorskip("peft")
    from safetensors.torch import load_file

    model = peft.get_peft_model(build_tiny_model("llama", seed=0),
                                peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    cfg = _config(tmp_path, training={"max_steps": 2})
    trainer = _trainer(cfg, model=model)
    trainer.train()
    ema = trainer.optcore_state["ema"].manager
    assert ema.tracked_names() and all("lora_" in n for n in ema.tracked_names())
    saved = load_file(tmp_path / "run" / "ema" / "adapter_model.safetensors")
    assert saved and all("lora_" in k for k in saved)
    by_suffix = {n.replace(".default", ""): s for n, s in ema.shadow.items()}
    for key, value in saved.items():
        assert torch.equal(value, by_suffix[key]), key


def test_metric_for_best_model_may_name_an_ema_metric(tmp_path):
    cfg = _config(tmp_path, training={"max_steps": 4, "eval_strategy": "steps", "eval_steps": 2,
                                      "metric_for_best_model": "eval_ema_loss", "load_best_model_at_end": True,
                                      # Perverse on purpose: training lowers the loss, so the best step is
                                      # not the last one and the export must reach back for its EMA.
                                      "greater_is_better": True},
                  checkpoint={"every_n_steps": 2})
    trainer = _trainer(cfg)
    snapshots = {}
    from transformers import TrainerCallback

    class Snapshot(TrainerCallback):
        def on_evaluate(self, args, state, control, **kwargs):
            shadow = trainer.optcore_state["ema"].manager.shadow
            snapshots[state.global_step] = {n: t.clone() for n, t in shadow.items()}

    trainer.add_callback(Snapshot())
    trainer.train()
    logged = [e["eval_ema_loss"] for e in trainer.state.log_history if "eval_ema_loss" in e]
    assert len(logged) == 2
    assert trainer.state.best_metric == max(logged)
    best_step = 2 * (1 + logged.index(max(logged)))
    assert trainer.state.best_global_step == best_step == 2
    # The exported EMA model is the EMA of the best step, not of the last one.
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "ema")
    assert any(not torch.equal(snapshots[2][n], snapshots[4][n]) for n in snapshots[2])
    for name, p in exported.named_parameters():
        assert torch.equal(p, snapshots[best_step][name]), name


def test_nan_metric_never_becomes_best(tmp_path):
    from transformers import Trainer

    # hf_optcore relies on HF's comparison (NaN compares False), so pin the method it runs.
    assert list(inspect.signature(Trainer._determine_best_metric).parameters) == ["self", "metrics", "trial"]
    cfg = _config(tmp_path, training={"eval_strategy": "steps", "eval_steps": 2,
                                      "metric_for_best_model": "eval_ema_loss"})
    trainer = _trainer(cfg)
    assert trainer._determine_best_metric({"eval_ema_loss": float("nan")}, None) is False
    assert not math.isnan(trainer.state.best_metric)
    assert trainer._determine_best_metric({"eval_ema_loss": 3.0}, None) is True
    assert trainer._determine_best_metric({"eval_ema_loss": float("nan")}, None) is False
    assert trainer.state.best_metric == 3.0


def test_ema_resumes_exactly(tmp_path):
    cfg = _config(tmp_path, training={"max_steps": 6}, checkpoint={"every_n_steps": 3, "keep_last": 3})
    full = _trainer(cfg)
    full.train()
    reference = {n: t.clone() for n, t in full.optcore_state["ema"].manager.shadow.items()}

    cfg2 = _config(tmp_path, output_dir=str(tmp_path / "resumed"), training={"max_steps": 3},
                   checkpoint={"every_n_steps": 3})
    first = _trainer(cfg2)
    first.train()
    cfg3 = _config(tmp_path, output_dir=str(tmp_path / "resumed"), training={"max_steps": 6},
                   checkpoint={"every_n_steps": 3, "resume_from": "auto", "allow_changes": ["training.max_steps"]})
    resumed = _trainer(cfg3, model=build_tiny_model("llama", seed=5))  # different init: all comes from the checkpoint
    resumed.train()
    ema = resumed.optcore_state["ema"].manager
    assert ema.step == 6 and ema.num_updates == 6
    for name, value in reference.items():
        assert torch.equal(ema.shadow[name], value), name


def test_plain_training_arguments_add_no_ema(tmp_path):
    from transformers import TrainingArguments

    from hf_optcore.callbacks import EMACallback

    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    trainer = _trainer(args)
    assert "ema" not in trainer.optcore_state
    assert not any(isinstance(cb, EMACallback) for cb in trainer.callback_handler.callbacks)


def test_nothing_trainable_evaluates_but_fails_at_train_start(tmp_path):
    model = build_tiny_model("llama", seed=0).requires_grad_(False)
    trainer = _trainer(_config(tmp_path), model=model)  # evaluation-only use of a frozen model is fine
    assert "eval_ema_loss" not in trainer.evaluate()  # no EMA of nothing
    with pytest.raises(ValueError, match="no trainable parameter"):
        trainer.train()
    assert trainer.state.global_step == 0


def test_user_compute_metrics_still_runs_beside_token_exact_loss(tmp_path):
    """One pass per set of weights: the user's metrics and the token-weighted loss come from the same pass,
    once with the live weights and once with the EMA weights swapped in."""
    seen = []

    def compute_metrics(eval_pred):
        seen.append(eval_pred.predictions.shape[0])
        return {"custom": 1.5}

    cfg = _config(tmp_path, training={"max_steps": 1})
    trainer = _trainer(cfg, compute_metrics=compute_metrics)
    metrics = trainer.evaluate()
    assert metrics["eval_custom"] == 1.5 and metrics["eval_ema_custom"] == 1.5 and seen == [7, 7]
    batches = [collate(_dataset(7, 2)[i:i + 3]) for i in range(0, 7, 3)]
    alone = Evaluator(cfg.training, trainer.model, batches, "cpu").evaluate()
    assert metrics["eval_loss"] == pytest.approx(alone["loss"], abs=1e-6)  # ours, not HF's mean of batch means
