"""Export: adapter and merged variants equal the trained model, EMA folders, model card, Hub push."""

import logging
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi
from peft import PeftModel
from transformers import AutoModelForCausalLM

from hf_optcore import __version__
from hf_optcore.config import LoRAConfig, ModelConfig, TrainerConfig
from hf_optcore.model_manager import ModelManager
from hf_optcore.tiny import build_tiny_model

TOKEN = "hf_SECRETtoken1234567890abcdef"


def _trained(arch="llama", **lora):
    mm = ModelManager(ModelConfig(name_or_path=f"tiny:{arch}", lora=LoRAConfig(r=4, **lora)))
    tok = mm.load_tokenizer()
    model = mm.load_model()
    torch.manual_seed(1)
    with torch.no_grad():  # stand-in for training: LoRA B starts at zero, which would make merging trivial
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_magnitude" in name:
                p.add_(torch.randn_like(p) * 0.5)
    return mm, tok, model.eval()


def _logits(model, x):
    with torch.no_grad():
        return model(input_ids=x).logits


X = torch.tensor([[5, 17, 42, 99, 3, 250, 8]])


@pytest.mark.parametrize("arch, lora", [("llama", {}), ("gpt2", {}), ("llama", {"use_dora": True}), ("mixtral", {})])
def test_merged_model_equals_adapter_model(tmp_path, arch, lora):
    mm, tok, model = _trained(arch, **lora)
    expected = _logits(model, X)
    with model.disable_adapter():  # the adapters matter, so equality below is not trivial
        assert not torch.allclose(_logits(model, X), expected, atol=1e-3)
    out = mm.save_final(model, tok, tmp_path / "merged", variant="merged")
    assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(_logits(merged, X), expected, atol=1e-5, rtol=1e-5)
    # The live model keeps its adapters (the merge happened on a copy).
    assert isinstance(model, PeftModel) and torch.equal(_logits(model, X), expected)


def test_adapter_round_trip_onto_a_fresh_base(tmp_path):
    mm, tok, model = _trained("qwen2")
    out = mm.save_final(model, tok, tmp_path / "adapter", variant="adapter")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in out.iterdir()}
    torch.manual_seed(mm.training.seed)
    base = build_tiny_model("qwen2", seed=mm.training.seed)
    reloaded = PeftModel.from_pretrained(base, out).eval()
    torch.testing.assert_close(_logits(reloaded, X), _logits(model, X))


def test_ema_variant_from_model_and_from_folder(tmp_path):
    mm, tok, model = _trained()
    ema_dir = tmp_path / "run" / "ema"
    model.save_pretrained(ema_dir)  # what the EMA helper writes inside `with ema.applied():`
    copied = mm.save_final(str(ema_dir), tok, tmp_path / "export_ema", variant="ema")
    assert (copied / "adapter_model.safetensors").read_bytes() == (ema_dir / "adapter_model.safetensors").read_bytes()
    assert (copied / "tokenizer.json").is_file()
    with pytest.raises(ValueError, match=r"variant must be one of adapter, merged, ema, got 'best'"):
        mm.save_final(model, tok, tmp_path / "x", variant="best")
    with pytest.raises(FileNotFoundError, match=r"holds no saved model"):
        mm.save_final(str(tmp_path), tok, tmp_path / "y", variant="ema")


def test_model_card_states_base_data_config_metrics_version(tmp_path):
    mm, tok, model = _trained()
    out = mm.save_final(model, tok, tmp_path / "a")
    cfg = TrainerConfig.from_dict({"model": {"name_or_path": "tiny:llama"}, "training": {"learning_rate": 3e-4}})
    card = mm.write_model_card(out, metrics={"eval_loss": 1.2345678, "train_steps": 20}, config=cfg,
                               data_description="The Jargon File, 120 entries.").read_text()
    assert card.startswith("---\nlibrary_name: peft\n")
    assert "# adapter export of `tiny:llama`" in card
    assert f"| hf_optcore version | {__version__} |" in card
    assert "The Jargon File, 120 entries." in card
    assert "| eval_loss | 1.23457 |" in card and "| train_steps | 20 |" in card
    assert "learning_rate: 0.0003" in card
    assert "model.layers.*.self_attn.q_proj" in card  # the LoRA targeting table
    bundled = ModelManager(ModelConfig(name_or_path="bundled:smollm2-135m-instruct"))
    assert bundled.base_model_hub_id == "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.fixture
def hub_calls(monkeypatch):
    """Replace only the network at the HfApi boundary; record what would be uploaded."""
    calls = {"create": [], "upload": []}

    def create_repo(self, repo_id, **kw):
        calls["create"].append((repo_id, kw, self.token))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, *, repo_id, folder_path, **kw):
        root = Path(folder_path)
        files = {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}
        calls["upload"].append({"repo_id": repo_id, "files": files, "kw": kw, "token": self.token})
        return "commit-info"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    return calls


TOKENIZER_FILES = {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"}


def test_push_adapter_uploads_exact_files_and_never_leaks_the_token(tmp_path, hub_calls, caplog, capsys):
    mm, tok, model = _trained()
    with caplog.at_level(logging.DEBUG):
        assert mm.push_to_hub(model, "me/tiny-lora", variant="adapter", token=TOKEN,
                              metrics={"eval_loss": 2.0}, data_description="demo") == "commit-info"
    (up,) = hub_calls["upload"]
    assert set(up["files"]) == {"adapter_config.json", "adapter_model.safetensors", "README.md"} | TOKENIZER_FILES
    assert up["repo_id"] == "me/tiny-lora" and up["token"] == TOKEN
    assert hub_calls["create"][0][:2] == ("me/tiny-lora", {"private": None, "exist_ok": True, "repo_type": "model"})
    assert all(TOKEN.encode() not in data for data in up["files"].values())
    out = capsys.readouterr()
    assert TOKEN not in caplog.text and TOKEN not in out.out + out.err
    assert "Pushing 6 files" in caplog.text


def test_push_merged_and_ema_folders(tmp_path, hub_calls):
    mm, tok, model = _trained()
    mm.push_to_hub(model, "me/tiny-merged", variant="merged")
    assert set(hub_calls["upload"][0]["files"]) == {"config.json", "generation_config.json", "model.safetensors",
                                                      "README.md"} | TOKENIZER_FILES
    assert "library_name: transformers" in hub_calls["upload"][0]["files"]["README.md"].decode()
    run = tmp_path / "run"
    model.save_pretrained(run / "ema")
    mm.push_to_hub(run, "me/tiny-ema", variant="ema")
    assert set(hub_calls["upload"][1]["files"]) == {"adapter_config.json", "adapter_model.safetensors", "README.md"}
    assert "# ema export of `tiny:llama`" in hub_calls["upload"][1]["files"]["README.md"].decode()


def test_push_refuses_a_folder_that_contains_the_token(tmp_path, hub_calls):
    mm, tok, model = _trained()
    out = mm.save_final(model, tok, tmp_path / "a")
    (out / "notes.txt").write_text(f"token={TOKEN}")
    with pytest.raises(ValueError, match=r"refusing to upload 'notes.txt': it contains the Hub token"):
        mm.push_to_hub(out, "me/x", token=TOKEN)
    assert hub_calls["upload"] == []
