"""Shared test fixtures: tiny models built from config, the byte-level tokenizer, the demo data.

Tests never download: HF_HUB_OFFLINE is forced, and models come from ``hf_optcore.tiny``.
"""

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# Two cores are shared by the suite and, in multi-process tests, by several workers.
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
JARGON_TRAIN = REPO / "data" / "jargon" / "train.jsonl"
JARGON_EVAL = REPO / "data" / "jargon" / "eval.jsonl"


@pytest.fixture
def tiny_tokenizer():
    from hf_optcore.tiny import build_tiny_tokenizer

    return build_tiny_tokenizer()


@pytest.fixture
def tiny_model():
    from hf_optcore.tiny import build_tiny_model

    return build_tiny_model("llama", seed=0)


@pytest.fixture
def jargon_paths():
    return JARGON_TRAIN, JARGON_EVAL


def record_training_batches(trainer) -> list:
    """Wrap ``trainer.training_step`` so every micro-batch's ``input_ids`` are appended to the returned list."""
    seen = []
    original = trainer.training_step

    def spy(model, inputs, num_items_in_batch=None):
        seen.append(inputs["input_ids"].clone())
        return original(model, inputs, num_items_in_batch)

    trainer.training_step = spy
    return seen
