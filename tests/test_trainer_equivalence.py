"""`from hf_optcore import OptCoreTrainer` in place of `transformers.Trainer` changes nothing.

With plain TrainingArguments and no hf_optcore option, per-step losses and final weights must be
bit-identical to transformers.Trainer on CPU for the same seed.
"""

import torch
from transformers import DataCollatorForLanguageModeling, Trainer, TrainerCallback, TrainingArguments

from hf_optcore import GenericTrainer, OptCoreTrainer, TrainerConfig
from hf_optcore.tiny import build_tiny_model, build_tiny_tokenizer


class _LossRecorder(TrainerCallback):
    def __init__(self):
        self.losses = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(logs["loss"])


def _dataset(tokenizer, n=24):
    texts = [f"{'hack ' * (1 + i % 7)}is a {'quick ' * (i % 3)}job number {i}" for i in range(n)]
    return [{"input_ids": tokenizer(t)["input_ids"]} for t in texts]


def _run(trainer_cls, tmp_path, name):
    tok = build_tiny_tokenizer()
    model = build_tiny_model("llama", seed=0, attention_dropout=0.1)  # dropout: RNG use must match too
    args = TrainingArguments(
        output_dir=str(tmp_path / name),
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        max_steps=6,
        learning_rate=5e-3,
        warmup_steps=2,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=123,
        disable_tqdm=True,
    )
    rec = _LossRecorder()
    trainer = trainer_cls(
        model=model,
        args=args,
        train_dataset=_dataset(tok),
        data_collator=DataCollatorForLanguageModeling(tok, mlm=False),
        processing_class=tok,
        callbacks=[rec],
    )
    trainer.train()
    return rec.losses, {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_bit_identical_to_transformers_trainer(tmp_path):
    hf_losses, hf_weights = _run(Trainer, tmp_path, "hf")
    oc_losses, oc_weights = _run(OptCoreTrainer, tmp_path, "oc")
    assert len(hf_losses) == 6
    assert hf_losses == oc_losses  # exact float equality, step by step
    assert hf_weights.keys() == oc_weights.keys()
    for k in hf_weights:
        assert torch.equal(hf_weights[k], oc_weights[k]), k
    # Training actually moved the weights (so equality is not vacuous).
    fresh = build_tiny_model("llama", seed=0, attention_dropout=0.1).state_dict()
    assert any(not torch.equal(fresh[k], oc_weights[k]) for k in fresh)


def test_plain_arguments_leave_extensions_off(tmp_path):
    tok = build_tiny_tokenizer()
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    trainer = OptCoreTrainer(model=build_tiny_model(), args=args, processing_class=tok)
    assert not trainer.extensions_enabled
    assert trainer.optcore_state == {}
    assert GenericTrainer is OptCoreTrainer


def test_trainer_config_turns_extensions_on(tmp_path):
    cfg = TrainerConfig.from_dict(
        {"output_dir": str(tmp_path), "model": {"name_or_path": "tiny:llama"}, "hardware": {"use_cpu": True},
         "training": {"learning_rate": 1e-3, "per_device_train_batch_size": 2, "max_steps": 3}}
    )
    trainer = OptCoreTrainer(model=build_tiny_model(), args=cfg, processing_class=build_tiny_tokenizer())
    assert trainer.extensions_enabled
    # trainer.args holds every value; optcore_config is its nested view: what was passed, as it runs
    # (transformers turns pin_memory off with use_cpu).
    cfg.hardware.dataloader_pin_memory = False
    assert trainer.optcore_config == cfg
    assert type(trainer.args).__name__ == "OptCoreTrainingArguments"
    assert trainer.args.learning_rate == 1e-3
    assert trainer.args.per_device_train_batch_size == 2
    assert trainer.args.max_steps == 3
    assert trainer.args.output_dir == str(tmp_path)
