"""The usage example of shared/ARCHITECTURE.md runs as written: every manager standalone, in a user's own loop."""

import torch

from hf_optcore.checkpoint_manager import CheckpointManager
from hf_optcore.config import TrainerConfig
from hf_optcore.data_manager import DataManager
from hf_optcore.ema_manager import EMAManager
from hf_optcore.evaluator import Evaluator
from hf_optcore.model_manager import ModelManager
from hf_optcore.optimizer_manager import OptimizerManager


def _texts(path, n):
    import json

    return [json.loads(line)["response"][:200] for line, _ in zip(open(path, encoding="utf-8"), range(n))]


def test_architecture_usage_example_in_a_custom_loop(tmp_path, jargon_paths):
    yaml_config = {
        "output_dir": str(tmp_path / "run"),
        "model": {"name_or_path": "tiny:llama", "lora": {"enabled": False}},
        "training": {"learning_rate": 3e-3, "per_device_train_batch_size": 8, "per_device_eval_batch_size": 8,
                     "scheduler": "constant", "optimizer": "adamw"},
        "data": {"max_seq_len": 64},
        "ema": {"enabled": True, "decay": 0.9},
        "checkpoint": {"keep_last": 2},
    }
    train_texts, val_texts = _texts(jargon_paths[0], 64), _texts(jargon_paths[1], 16)
    device = torch.device("cpu")
    num_steps = 12

    # ---- as written in ARCHITECTURE.md ----
    config = TrainerConfig.from_dict(yaml_config)
    model_mgr = ModelManager(config.model, config.hardware, config.training, device)
    tokenizer = model_mgr.load_tokenizer(); model = model_mgr.load_model()  # noqa: E702
    optimizer_mgr = OptimizerManager(config.training, model, use_amp=True)
    optimizer = optimizer_mgr.create_optimizer()
    scheduler = optimizer_mgr.create_scheduler(num_steps)
    scaler = optimizer_mgr.create_scaler()
    data_mgr = DataManager(config.training, config.hardware, tokenizer, text_field_max_len=512)
    train_loader, val_loader = data_mgr.create_loaders(train_texts, val_texts)
    ema_mgr = EMAManager(config.ema, model)
    evaluator = Evaluator(config.training, model, val_loader, device, use_amp=True, ema_manager=ema_mgr)
    checkpoint_mgr = CheckpointManager(config.checkpoint, config.output_dir, model, optimizer,
                                       scheduler, scaler, tokenizer)
    # ---------------------------------------

    before = evaluator.evaluate()
    step = 0
    while step < num_steps:
        for batch in train_loader:
            loss = model(**batch).loss
            optimizer_mgr.step(loss)
            ema_mgr.update()
            step += 1
            if step == num_steps // 2:
                checkpoint_mgr.save(step, metrics={"eval_loss": evaluator.evaluate()["loss"]})
            if step == num_steps:
                break
    after = evaluator.evaluate()
    assert after["loss"] < before["loss"] - 0.3, (before, after)
    assert abs(after["perplexity"] - torch.tensor(after["loss"]).exp().item()) < 1e-3 * after["perplexity"]
    assert {"ema_loss", "ema_perplexity"} <= after.keys() and after["ema_loss"] != after["loss"]

    live = {k: v.clone() for k, v in model.state_dict().items()}
    with ema_mgr.applied():
        assert any(not torch.equal(live[k], v) for k, v in model.state_dict().items())
    assert all(torch.equal(live[k], v) for k, v in model.state_dict().items())  # restored bit-exactly

    path = checkpoint_mgr.save(num_steps, metrics={"eval_loss": after["loss"]})
    assert checkpoint_mgr.latest() == path
    assert checkpoint_mgr.best() == path  # the lower eval_loss of the two
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    assert checkpoint_mgr.load("latest") == num_steps
    assert all(torch.equal(live[k], v) for k, v in model.state_dict().items())
