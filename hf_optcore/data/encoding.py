"""Rendering examples to token ids and labels: text, instruction and chat formats.

Chat data (and instruction data when the tokenizer has a chat template) is rendered with the
tokenizer's chat template; the label of every token outside an assistant turn is -100 when
``completion_only_loss`` is on. Tokens are attributed to turns by character offsets of the one
rendered string, so the ids are exactly what the template produces as a whole (tokenizing
turns separately can merge differently at the seams).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from torch.utils.data import Dataset
from tqdm.auto import tqdm

from hf_optcore.data.loading import record_problem
from hf_optcore.errors import DataError

logger = logging.getLogger(__name__)

__all__ = ["EncodingStats", "ExampleEncoder", "TokenizedDataset"]

PLAIN_PROMPT = "### Instruction:\n{instruction}\n\n{input_block}### Response:\n"


@dataclass
class EncodingStats:
    """What happened to the examples of one dataset (also logged once)."""

    examples_in: int = 0
    kept: int = 0
    truncated: int = 0
    dropped_too_long: int = 0
    dropped_no_target: int = 0
    tokens: int = 0
    target_tokens: int = 0
    format: str = ""
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "extra"} | self.extra


class TokenizedDataset(Dataset):
    """Tokenized examples: items are dicts with ``input_ids`` and ``labels``; ``lengths`` for samplers.

    Args:
        examples: dicts with ``input_ids`` and ``labels`` (lists of ints).
        stats: the :class:`EncodingStats` of their making (default None).
    """

    def __init__(self, examples: list[dict[str, list[int]]], stats: EncodingStats | None = None):
        self.examples = examples
        self.lengths = [len(e["input_ids"]) for e in examples]
        self.stats = stats

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return self.examples[i]


class ExampleEncoder:
    """Turn raw records of one format into ``{"input_ids", "labels"}``.

    Args:
        tokenizer: a transformers tokenizer (fast tokenizers use offsets; others tokenize by turn).
        max_seq_len: the longest example kept, in tokens.
        truncation: ``"truncate"`` (keep the first ``max_seq_len`` tokens) or ``"drop"``.
        completion_only_loss: label only completion (assistant) tokens (default True).
        fields: column names: ``text``, ``instruction``, ``input``, ``response``, ``messages``.
    """

    def __init__(self, tokenizer: Any, max_seq_len: int, truncation: str = "truncate",
                 completion_only_loss: bool = True, fields: dict[str, str] | None = None):
        self.tok = tokenizer
        self.max_seq_len = int(max_seq_len)
        self.truncation = truncation
        self.completion_only_loss = completion_only_loss
        self.fields = {"text": "text", "instruction": "instruction", "input": "input", "response": "response",
                       "messages": "messages", **(fields or {})}
        self.has_chat_template = bool(getattr(tokenizer, "chat_template", None))

    # ---- rendering: a string and the character spans that are completions -----------------

    def _apply_template(self, messages: list[dict], where: str, **kw: Any) -> str:
        import jinja2

        try:
            return self.tok.apply_chat_template(messages, tokenize=False, **kw)
        except jinja2.exceptions.SecurityError as exc:
            raise DataError(f"{where}: the chat template (model.chat_template or the tokenizer's) tried an operation "
                            f"jinja's sandbox forbids ({str(exc).rstrip('.')}); it was stopped, not run") from None
        except jinja2.exceptions.TemplateError as exc:
            raise DataError(f"{where}: the chat template (model.chat_template or the tokenizer's) cannot render this "
                            f"conversation: {exc}") from None

    def _render_chat(self, messages: list[dict], where: str) -> tuple[str, list[tuple[int, int]]]:
        if not self.has_chat_template:
            raise DataError(f"{where}: chat data needs a tokenizer with a chat template (model.chat_template)")
        full = self._apply_template(messages, where)
        spans = []
        for i, m in enumerate(messages):
            if m.get("role") != "assistant":
                continue
            before = self._apply_template(messages[:i], where, add_generation_prompt=True) if i else ""
            through = self._apply_template(messages[: i + 1], where)
            if not (full.startswith(through) and through.startswith(before)):
                raise DataError(
                    f"{where}: the chat template does not render conversations incrementally (a turn changes "
                    f"the text before it), so completion tokens cannot be located; set data.completion_only_loss=false"
                )
            spans.append((len(before), len(through)))
        return full, spans

    def _render(self, rec: dict, fmt: str, where: str) -> tuple[str, list[tuple[int, int]], bool]:
        """``(text, completion spans, add_special_tokens)``; values are checked, never stringified."""
        problem = record_problem(rec, fmt, self.fields)
        if problem:
            raise DataError(f"{where}: {problem} (format {fmt!r})")
        f = self.fields
        if fmt == "text":
            text = rec[f["text"]]
            eos = self.tok.eos_token or ""
            if eos and not text.endswith(eos):
                text += eos
            return text, [(0, len(text))], True
        if fmt == "chat":
            text, spans = self._render_chat(rec[f["messages"]], where)
            return text, spans, False
        instruction, response = rec[f["instruction"]], rec[f["response"]]
        extra = rec.get(f["input"]) or ""
        if self.has_chat_template:
            user = instruction + (f"\n\n{extra}" if extra else "")
            text, spans = self._render_chat(
                [{"role": "user", "content": user}, {"role": "assistant", "content": response}], where)
            return text, spans, False
        prompt = PLAIN_PROMPT.format(instruction=instruction, input_block=f"### Input:\n{extra}\n\n" if extra else "")
        text = prompt + response + (self.tok.eos_token or "")
        return text, [(len(prompt), len(text))], True

    # ---- tokenizing -----------------------------------------------------------------------

    def _tokenize(self, text: str, spans: list[tuple[int, int]], add_special: bool) -> tuple[list[int], list[bool]]:
        if getattr(self.tok, "is_fast", False):
            enc = self.tok(text, add_special_tokens=add_special, return_offsets_mapping=True)
            ids = list(enc["input_ids"])
            target = []
            for a, b in enc["offset_mapping"]:
                # Special tokens added by the tokenizer have (0, 0): they belong to the prompt.
                target.append(b > a and any(s <= a < e for s, e in spans))
            return ids, target
        # Slow tokenizers have no offsets: tokenize the pieces between span boundaries.
        cuts = sorted({0, len(text), *[x for s in spans for x in s]})
        ids, target = [], []
        for k, (a, b) in enumerate(zip(cuts, cuts[1:])):
            piece = self.tok(text[a:b], add_special_tokens=add_special and k == 0)["input_ids"]
            ids.extend(piece)
            target.extend([any(s <= a < e for s, e in spans)] * len(piece))
        return ids, target

    def encode(self, rec: dict, fmt: str, where: str, stats: EncodingStats) -> dict[str, list[int]] | None:
        """Encode one record; ``None`` (counted in ``stats``) when it is dropped."""
        stats.examples_in += 1
        text, spans, add_special = self._render(rec, fmt, where)
        ids, target = self._tokenize(text, spans, add_special)
        if fmt == "text" or not self.completion_only_loss:
            target = [True] * len(ids)
        if len(ids) > self.max_seq_len:
            if self.truncation == "drop":
                stats.dropped_too_long += 1
                return None
            ids, target = ids[: self.max_seq_len], target[: self.max_seq_len]
            stats.truncated += 1
        labels = [t if keep else -100 for t, keep in zip(ids, target)]
        # The first label is never predicted (labels shift by one), so it cannot carry the loss.
        if len(ids) < 2 or all(x == -100 for x in labels[1:]):
            stats.dropped_no_target += 1
            return None
        stats.kept += 1
        stats.tokens += len(ids)
        stats.target_tokens += sum(x != -100 for x in labels[1:])
        return {"input_ids": ids, "labels": labels}

    def encode_all(self, records: list[Any], fmt: str, source: str,
                   locations: list[str] | None = None) -> TokenizedDataset:
        """Encode ``records`` (dicts, or strings for text) into a :class:`TokenizedDataset`.

        ``locations[i]`` names record ``i`` in ``source`` in error messages (default ``example <i>``).
        """
        stats = EncodingStats(format=fmt)
        out = []
        # A bar only where someone watches (a terminal) and the wait is noticeable.
        bar = tqdm(records, desc=f"tokenizing {source}", unit="ex", leave=False,
                   disable=True if len(records) < 1000 else None)
        for i, rec in enumerate(bar):
            if isinstance(rec, str):
                rec = {self.fields["text"]: rec}
            where = f"{source}: {locations[i]}" if locations else f"{source}: example {i}"
            enc = self.encode(rec, fmt, where, stats)
            if enc is not None:
                out.append(enc)
        if not out:
            raise DataError(
                f"{source}: no example left after tokenization ({stats.examples_in} in, {stats.dropped_too_long} "
                f"longer than data.max_seq_len={self.max_seq_len} dropped, {stats.dropped_no_target} without "
                f"completion tokens)"
            )
        logger.info(
            "%s: %d examples (%s): kept %d, truncated %d, dropped %d too long (> %d tokens) and %d without target "
            "tokens; %d tokens", source, stats.examples_in, fmt, stats.kept, stats.truncated,
            stats.dropped_too_long, self.max_seq_len, stats.dropped_no_target, stats.tokens,
        )
        return TokenizedDataset(out, stats)
