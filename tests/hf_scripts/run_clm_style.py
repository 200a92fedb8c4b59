"""A causal-LM fine-tuning script shaped like transformers' examples/pytorch/language-modeling/run_clm.py, with
``Trainer`` swapped for ``OptCoreTrainer`` and ``TrainingArguments`` for ``OptCoreTrainingArguments``:

    python tests/hf_scripts/run_clm_style.py --model_type llama --tokenizer_name tiny --train_file t.txt \
        --validation_file v.txt --block_size 32 --output_dir out --do_train --do_eval --max_steps 4 \
        --optim lion --lr_scheduler_type wsd --ema_enabled true --data_batching bucket

Its ModelArguments / DataTrainingArguments carry run_clm's field names (model_name_or_path, model_revision,
cache_dir, train_file, block_size, ...), so the parser proves hf_optcore's flags do not clash with them. Written
for the tests; offline: ``--model_type`` builds a tiny model from config, ``--tokenizer_name tiny`` the byte-level
tokenizer of ``hf_optcore.tiny``. Ends with ``trainer.create_model_card()``, as run_clm does.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from itertools import chain
from typing import Optional

from transformers import AutoConfig, AutoModelForCausalLM, HfArgumentParser, default_data_collator, set_seed

from hf_optcore import OptCoreTrainer
from hf_optcore.config import OptCoreTrainingArguments
from hf_optcore.tiny import build_tiny_tokenizer


@dataclass
class ModelArguments:
    model_name_or_path: Optional[str] = field(default=None, metadata={"help": "Checkpoint to start from."})
    model_type: Optional[str] = field(default=None, metadata={"help": "Architecture when training from scratch."})
    config_overrides: Optional[str] = field(default=None, metadata={"help": "key=value,... for a new config."})
    config_name: Optional[str] = field(default=None, metadata={"help": "Config name or path."})
    tokenizer_name: Optional[str] = field(default=None, metadata={"help": "Tokenizer name or path."})
    cache_dir: Optional[str] = field(default=None, metadata={"help": "Where downloads are stored."})
    use_fast_tokenizer: bool = field(default=True, metadata={"help": "Use a fast tokenizer."})
    model_revision: str = field(default="main", metadata={"help": "Model revision."})
    token: Optional[str] = field(default=None, metadata={"help": "Hub token."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow remote code."})
    dtype: Optional[str] = field(default=None, metadata={"help": "Weight dtype."})


@dataclass
class DataTrainingArguments:
    dataset_name: Optional[str] = field(default=None, metadata={"help": "Hub dataset."})
    dataset_config_name: Optional[str] = field(default=None, metadata={"help": "Hub dataset config."})
    train_file: Optional[str] = field(default=None, metadata={"help": "Training text file."})
    validation_file: Optional[str] = field(default=None, metadata={"help": "Validation text file."})
    max_train_samples: Optional[int] = field(default=None, metadata={"help": "Truncate training examples."})
    max_eval_samples: Optional[int] = field(default=None, metadata={"help": "Truncate eval examples."})
    streaming: bool = field(default=False, metadata={"help": "Stream the dataset."})
    block_size: Optional[int] = field(default=None, metadata={"help": "Tokens per training block."})
    overwrite_cache: bool = field(default=False, metadata={"help": "Overwrite the datasets cache."})
    validation_split_percentage: Optional[int] = field(default=5, metadata={"help": "Held-out percentage."})
    preprocessing_num_workers: Optional[int] = field(default=None, metadata={"help": "Tokenizer processes."})
    keep_linebreaks: bool = field(default=True, metadata={"help": "Keep line breaks in text files."})


def main(argv: list[str] | None = None) -> int:
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, OptCoreTrainingArguments))
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(argv)
    set_seed(training_args.seed)

    from datasets import load_dataset

    files = {"train": data_args.train_file, "validation": data_args.validation_file}
    raw = load_dataset("text", data_files={k: v for k, v in files.items() if v},
                       keep_linebreaks=data_args.keep_linebreaks)
    tokenizer = build_tiny_tokenizer() if model_args.tokenizer_name == "tiny" else None
    if model_args.model_name_or_path:
        model = AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path, revision=model_args.model_revision)
    else:
        config = AutoConfig.for_model(model_args.model_type, vocab_size=len(tokenizer), hidden_size=16,
                                      intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                                      num_key_value_heads=1, max_position_embeddings=256)
        if model_args.config_overrides:
            config.update_from_string(model_args.config_overrides)
        model = AutoModelForCausalLM.from_config(config)

    tokenized = raw.map(lambda b: tokenizer(b["text"]), batched=True, remove_columns=["text"])
    block_size = data_args.block_size or 64

    def group_texts(examples):
        joined = {k: list(chain(*examples[k])) for k in examples}
        total = (len(joined["input_ids"]) // block_size) * block_size
        out = {k: [t[i:i + block_size] for i in range(0, total, block_size)] for k, t in joined.items()}
        out["labels"] = [list(x) for x in out["input_ids"]]
        return out

    lm = tokenized.map(group_texts, batched=True)
    trainer = OptCoreTrainer(model=model, args=training_args, train_dataset=lm["train"] if training_args.do_train else None,
                             eval_dataset=lm["validation"] if training_args.do_eval else None,
                             processing_class=tokenizer, data_collator=default_data_collator)
    if training_args.do_train:
        result = trainer.train()
        trainer.save_model()
        trainer.log_metrics("train", result.metrics)
        trainer.save_metrics("train", result.metrics)
        trainer.save_state()
    if training_args.do_eval:
        metrics = trainer.evaluate()
        metrics["perplexity"] = math.exp(metrics["eval_loss"]) if metrics["eval_loss"] < 700 else float("inf")
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
    trainer.create_model_card(model_name="run-clm-style", tasks="text-generation")
    print(json.dumps({"args": training_args.to_sanitized_dict()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
