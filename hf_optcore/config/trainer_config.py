"""``TrainerConfig``: the nested, validated view of a run's configuration (YAML, dict, dotted overrides)."""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from hf_optcore._validation import collect_problems
from hf_optcore.config import conversion
from hf_optcore.config.field_map import field_links
from hf_optcore.config.parsing import as_dict, build_section, deep_merge, load_yaml, parse_overrides
from hf_optcore.config.sections import (
    NESTED,
    SECTIONS,
    CheckpointConfig,
    ConfigError,
    DataConfig,
    EMAConfig,
    HardwareConfig,
    ModelConfig,
    TrainingConfig,
    _f,
    _Tracked,
    tracked,
)
from hf_optcore.errors import did_you_mean

__all__ = ["TrainerConfig", "render_reference"]


@tracked
@dataclass
class TrainerConfig(_Tracked):
    """The whole configuration: six sections plus ``output_dir``.

    Build it with :meth:`from_dict`, :meth:`from_yaml` or :meth:`from_sources` (YAML + dotted
    overrides); each validates and raises one :class:`ConfigError` listing every problem. It remembers which
    keys were set explicitly (:meth:`explicit_keys`), whatever their value.
    """

    output_dir: str = _f("outputs/sft", "Where checkpoints, the final model, metrics and reports go.")
    model: ModelConfig = _f(None, "Model section.")
    training: TrainingConfig = _f(None, "Training section.")
    hardware: HardwareConfig = _f(None, "Hardware section.")
    data: DataConfig = _f(None, "Data section.")
    checkpoint: CheckpointConfig = _f(None, "Checkpoint section.")
    ema: EMAConfig = _f(None, "EMA section.")

    def __post_init__(self):
        for name, cls in SECTIONS.items():
            if getattr(self, name) is None:
                setattr(self, name, cls())

    # ---- construction -------------------------------------------------------------------

    @classmethod
    def from_dict(cls, raw: dict | None, validate: bool = True) -> TrainerConfig:
        """Build from a nested dict (as loaded from YAML); unknown keys and bad values are errors."""
        problems: list[str] = []
        if raw is not None and not isinstance(raw, dict):
            raise ConfigError([f"config: expected a mapping of sections, got {type(raw).__name__}"])
        raw = dict(raw or {})
        top = ["output_dir", *SECTIONS]
        kwargs: dict[str, Any] = {}
        for key, value in raw.items():
            if key == "output_dir":
                if not isinstance(value, str) or not value:
                    problems.append(f"output_dir: expected a non-empty string, got {value!r}")
                else:
                    kwargs["output_dir"] = value
            elif key in SECTIONS:
                kwargs[key] = build_section(SECTIONS[key], value, key, problems)
            else:
                problems.append(f"{key}: unknown section{did_you_mean(key, top)}; valid: {', '.join(top)}")
        config = cls(**kwargs)
        if validate:
            # Range checks run on the fields that parsed, so one error lists every problem.
            problems += collect_problems(config) + _shadowing_extra_args(config)
        if problems:
            raise ConfigError(problems)
        return config

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: list[str] | None = None) -> TrainerConfig:
        """Load a YAML file, apply dotted overrides, validate. Errors name the file."""
        return cls.from_sources(path, overrides or [])

    @classmethod
    def from_sources(
        cls, path: str | Path | None = None, overrides: list[str] | None = None, base: dict | None = None
    ) -> TrainerConfig:
        """``base`` dict, then the YAML file at ``path``, then ``overrides``; validated once."""
        raw = dict(base or {})
        if path is not None:
            raw = deep_merge(raw, load_yaml(path))
        if overrides:
            raw = deep_merge(raw, parse_overrides(overrides))
        return cls.from_dict(raw)

    def to_dict(self) -> dict:
        """A plain nested dict; ``from_dict(to_dict())`` gives an equal config."""
        return as_dict(self)

    def to_yaml(self, path: str | Path | None = None) -> str:
        """YAML text of :meth:`to_dict`; written to ``path`` when given."""
        text = yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(text, encoding="utf-8")
        return text

    def fingerprint(self) -> str:
        """sha256 of the resolved config (recorded in checkpoint manifests)."""
        # The round trip coerces values to their declared types (10 -> 10.0 for a float field).
        canonical = TrainerConfig.from_dict(self.to_dict(), validate=False).to_dict()
        return hashlib.sha256(json.dumps(canonical, sort_keys=True).encode()).hexdigest()

    # ---- validation ---------------------------------------------------------------------

    def explicit_keys(self) -> frozenset[str]:
        """Dotted keys set explicitly: in the YAML, dict or overrides it was built from, or assigned in code
        (``cfg.training.learning_rate = 2e-4`` counts, even when 2e-4 is the default)."""
        keys = {name for name in self.explicit_fields() if name not in SECTIONS}

        def walk(obj: Any, path: str) -> None:
            for name in obj.explicit_fields():
                if (type(obj), name) in NESTED:
                    walk(getattr(obj, name), f"{path}.{name}")
                else:
                    keys.add(f"{path}.{name}")

        for name in SECTIONS:
            walk(getattr(self, name), name)
        return frozenset(keys)

    @property
    def arguments_base(self) -> type | None:
        """The ``TrainingArguments`` class this config was read from (TRL's ``SFTConfig``, ...), if any:
        :meth:`to_training_arguments` extends the same class."""
        return self.__dict__.get("_arguments_base")

    def validate(self, cuda_available: bool | None = None) -> TrainerConfig:
        """Check ranges and combinations; raise one :class:`ConfigError` with every problem."""
        problems = collect_problems(self, cuda_available=cuda_available) + _shadowing_extra_args(self)
        if problems:
            raise ConfigError(problems)
        return self

    # ---- TrainingArguments ----------------------------------------------------------------

    def to_training_arguments(self, args_class: type | None = None, **extra: Any):
        """The :class:`~hf_optcore.config.OptCoreTrainingArguments` holding every value of this config that is a
        Trainer argument (all but the recipe's ``model.*`` and data-file keys).

        Lossless for those: ``TrainerConfig.from_training_arguments(config.to_training_arguments())`` equals
        ``config`` except the recipe keys, which keep their defaults.

        Args:
            args_class: a ``TrainingArguments`` subclass to extend instead (TRL's ``SFTConfig`` gives
                ``OptCoreSFTConfig``); default: the class this config was read from, else ``TrainingArguments``.
            **extra: TrainingArguments fields set on top (``disable_tqdm=True``, ``hub_token=...``).
        """
        return conversion.config_to_args(self, args_class, **extra)

    @classmethod
    def from_training_arguments(cls, args: Any, overrides: list[str] | None = None) -> TrainerConfig:
        """The nested view of TrainingArguments, with dotted ``key=value`` overrides applied and validated.

        From plain ``TrainingArguments`` the extensions start in the state under which the Trainer
        behaves as ``transformers.Trainer`` (``data.batching='hf'``, retention from
        ``save_total_limit``); the overrides switch on what you want
        (``["ema.enabled=true", "data.batching=bucket"]``). Fields of a subclass (TRL's ``max_length``,
        ``packing``, ...) are kept in ``training.extra_args``. ``hub_token`` is never copied.
        """
        return conversion.args_to_config(args, cls, overrides)

    def with_recipe_keys_of(self, other: TrainerConfig) -> TrainerConfig:
        """A copy of this config whose recipe keys (``model.*``, ``data.train_path``, ...) are ``other``'s: they are
        not Trainer arguments, so a view read back from the arguments takes them from the config the run began with."""
        out = copy.deepcopy(self)
        for link in field_links():
            if link.kind == "recipe":
                conversion._set_attr(out, link.path, copy.deepcopy(conversion._get(other, link.path)))
        return out


def _shadowing_extra_args(config: TrainerConfig) -> list[str]:
    """``training.extra_args`` keys that are the argument of a config key: set there, not twice (extra_args would
    silently win)."""
    by_arg = {link.arg: link.path for link in field_links() if link.kind != "recipe" and link.arg
              and link.path != "training.extra_args"}
    by_arg.update({"save_strategy": "checkpoint.every_n_steps", "save_steps": "checkpoint.every_n_steps",
                   "activation_checkpointing": "model.gradient_checkpointing"})
    return [f"training.extra_args.{key}: is {by_arg[key]}; set it there, not in extra_args"
            for key in config.training.extra_args if key in by_arg
            and not (key == "save_strategy" and config.training.extra_args[key] in ("epoch", "best"))]


def render_reference() -> str:
    """Markdown table of every config key, its TrainingArguments field, default and help (kept in the README by a test)."""
    rows = ["| key | TrainingArguments field | default | meaning |", "|---|---|---|---|"]
    out_help = TrainerConfig.__dataclass_fields__["output_dir"].metadata["help"]
    rows.append(f"| `output_dir` | `output_dir` | `{json.dumps(TrainerConfig.output_dir)}` | {out_help} |")
    for link in field_links():
        if link.kind == "recipe":
            arg = "(recipe only)"
        else:
            arg = link.arg if link.path != "training.extra_args" else "(each key is one)"
            if link.path == "checkpoint.every_n_steps":
                arg = "save_strategy / save_steps"
            arg = f"`{arg}`" + ("" if link.hf else " (hf_optcore)")
        rows.append(f"| `{link.path}` | {arg} | `{json.dumps(link.default)}` | {link.help} |")
    return "\n".join(rows)
