"""Where each TrainerConfig field lives among the Trainer's arguments: the one map between the two views.

Derived from the section dataclasses (``sections.py``), never written by hand. Every field is one of:

- **hf**: a ``transformers.TrainingArguments`` field, by the same name (``training.learning_rate`` is
  ``learning_rate``) or by the name in its ``metadata["hf"]`` (``training.optimizer`` is ``optim``);
- **extension**: an hf_optcore field of the arguments class, named by its section's prefix
  (``ema.decay`` is ``ema_decay``, ``data.batching`` is ``data_batching``, ``checkpoint.keep_best`` is
  ``checkpoint_keep_best``; ``training`` and ``hardware`` fields need none: ``chunked_loss``);
- **recipe**: a field only the recipe acts on (``model.*``, ``data.train_path``, ...): not a Trainer argument.

:func:`render_argument_fields` writes the extension fields as source code (each line names its config key in a
comment: ``HfArgumentParser`` passes every metadata entry to argparse, so ``metadata`` holds only ``help``): the class statement of
:class:`~hf_optcore.config.training_args.OptCoreArguments` holds that text (``scripts/sync_training_args.py``
rewrites it; ``tests/test_training_args.py`` fails when it drifts).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import typing
from dataclasses import dataclass
from typing import Any, Literal

from hf_optcore.config.sections import NESTED, RECIPE_SECTIONS, SECTIONS

__all__ = ["FieldLink", "SPECIAL", "extension_links", "field_links", "hf_fields", "render_argument_fields"]

PREFIX = {"training": "", "hardware": "", "data": "data_", "checkpoint": "checkpoint_", "ema": "ema_"}
"""Extension argument name = prefix + field name, per section."""

SPECIAL = frozenset({"checkpoint.every_n_steps", "model.gradient_checkpointing", "training.extra_args"})
"""Fields linked by a conversion of their own (their value changes shape on the way), not one to one:
``checkpoint.every_n_steps`` is ``save_strategy``/``save_steps``, ``model.gradient_checkpointing`` is
``activation_checkpointing`` (+ non-reentrant kwargs), ``training.extra_args`` is any other field by its name."""


@dataclass(frozen=True)
class FieldLink:
    """One TrainerConfig field and the argument that holds it.

    Attributes:
        path: dotted TrainerConfig path (``"training.optimizer"``).
        arg: its name among the Trainer's arguments (``"optim"``); None for a recipe field.
        kind: ``"hf"`` (a TrainingArguments field), ``"extension"`` (an hf_optcore argument) or ``"recipe"``.
        default: the TrainerConfig default.
        type: the resolved field type.
        help: the help text.
    """

    path: str
    arg: str | None
    kind: Literal["hf", "extension", "recipe"]
    default: Any
    type: Any
    help: str

    @property
    def hf(self) -> bool:
        """True for a ``transformers.TrainingArguments`` field."""
        return self.kind == "hf"


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory()  # type: ignore[misc]


@functools.lru_cache(maxsize=8)
def hf_fields(cls: type | None = None) -> dict[str, dataclasses.Field]:
    """The init fields of ``cls`` (default ``transformers.TrainingArguments``; TRL's configs add theirs)."""
    if cls is None:
        from transformers import TrainingArguments

        cls = TrainingArguments
    return {f.name: f for f in dataclasses.fields(cls) if f.init}


@functools.lru_cache(maxsize=1)
def field_links() -> tuple[FieldLink, ...]:
    """Every TrainerConfig field with the argument that holds it, in section order."""
    hf = hf_fields()
    links: list[FieldLink] = []

    def walk(cls: type, path: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            dotted = f"{path}.{f.name}"
            nested = NESTED.get((cls, f.name))
            if nested is not None:
                walk(nested, dotted)
                continue
            target = f.metadata.get("hf") or (f.name if f.name in hf and path in ("training", "hardware") else None)
            if target is not None:
                kind, arg = "hf", target
            elif path in RECIPE_SECTIONS or f.metadata.get("recipe"):
                kind, arg = "recipe", None
            else:
                kind, arg = "extension", f"{PREFIX[path]}{f.name}"
            links.append(FieldLink(dotted, arg, kind, _default_of(f), hints[f.name], f.metadata.get("help", "")))

    for name, cls in SECTIONS.items():
        walk(cls, name)
    return tuple(links)


def extension_links() -> tuple[FieldLink, ...]:
    """The links of the hf_optcore fields of the arguments class."""
    return tuple(link for link in field_links() if link.kind == "extension" and link.path not in SPECIAL)


# --------------------------------------------------------------------------------------------
# The extension fields as source code
# --------------------------------------------------------------------------------------------


def annotation(tp: Any) -> str:
    """Source text of the argument type of a config field type (a dict also takes a JSON string)."""
    origin = typing.get_origin(tp)
    if tp is dict or origin is dict:
        return "Union[dict, str, None]"  # HfArgumentParser gives a string (JSON), as for lr_scheduler_kwargs
    if origin is Literal:
        return "Literal[" + ", ".join(json.dumps(a) for a in typing.get_args(tp)) + "]"
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return f"Optional[{annotation(args[0])}]"
        return "Union[" + ", ".join("None" if a is type(None) else annotation(a) for a in typing.get_args(tp)) + "]"
    if origin is list:
        (item,) = typing.get_args(tp) or (Any,)
        return f"list[{annotation(item)}]"
    return getattr(tp, "__name__", repr(tp))


def _default_source(value: Any) -> str:
    if isinstance(value, dict):
        return "default_factory=dict" if not value else f"default_factory=lambda: {value!r}"
    if isinstance(value, list):
        return "default_factory=list" if not value else f"default_factory=lambda: {value!r}"
    return f"default={value!r}"


def render_argument_fields(indent: str = "    ", width: int = 116) -> str:
    """The extension fields of the arguments class as dataclass field source, in section order."""
    import textwrap

    lines = []
    section = None
    for link in extension_links():
        top = link.path.split(".")[0]
        if top != section:
            section = top
            lines.append(f"{indent}# ---- {section} ({PREFIX[top] or 'no prefix'}) ----")
        pad, hang = indent * 2, indent * 2 + " " * len('"help": ')
        lines.append(f"{indent}{link.arg}: {annotation(link.type)} = field({_default_source(link.default)}, metadata={{"
                     f"  # {link.path}")
        chunks = textwrap.wrap(link.help, width - len(hang) - 2, drop_whitespace=False) or [""]
        for i, chunk in enumerate(chunks):
            lead = f'{pad}"help": ' if i == 0 else hang
            lines.append(f"{lead}{json.dumps(chunk, ensure_ascii=False)}{',' if i == len(chunks) - 1 else ''}")
        lines.append(f"{indent}}})")
    return "\n".join(lines) + "\n"


GENERATED_BEGIN = "    # BEGIN GENERATED FIELDS (scripts/sync_training_args.py)\n"
GENERATED_END = "    # END GENERATED FIELDS\n"


def with_argument_fields(source: str) -> str:
    """``source`` (the text of ``training_args.py``) with its generated field block rendered anew."""
    start = source.index(GENERATED_BEGIN) + len(GENERATED_BEGIN)
    end = source.index(GENERATED_END, start)
    return source[:start] + render_argument_fields() + source[end:]
