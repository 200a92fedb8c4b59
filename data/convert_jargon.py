"""Convert the Jargon File 4.4.7 glossary into instruction/response JSONL.

Run (needs Debian's ``jargon-text`` package, ``apt-get install jargon-text``)::

    python data/convert_jargon.py                     # writes data/jargon/{train,eval}.jsonl

The Jargon File is in the public domain (see ``data/jargon/ATTRIBUTION.md``). Each glossary
entry (``:term: pronunciation, part of speech`` followed by its senses) becomes one example::

    {"term": "hack", "instruction": "What does the hacker jargon term \"hack\" mean?",
     "response": "hack (n.): 1. n. Originally, a quick job ..."}

Cross-reference braces (``{nethack}``) are dropped and wrapped lines are re-joined into
paragraphs. Every 20th entry (in file order) goes to the held-out eval split, so the split is
stable across re-runs and spread over the alphabet.
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
from pathlib import Path

DEFAULT_SOURCE = Path("/usr/share/doc/jargon-text/jargon.txt.gz")
OUT_DIR = Path(__file__).resolve().parent / "jargon"
_ENTRY = re.compile(r"^   :(?P<term>[^:]+(?::[^:\s][^:]*)*):\s?(?P<head>.*)$")
EVAL_EVERY = 20


def _read(source: Path) -> list[str]:
    opener = gzip.open if source.suffix == ".gz" else open
    with opener(source, "rt", encoding="utf-8") as fh:
        return fh.read().splitlines()


def _glossary_lines(lines: list[str]) -> list[str]:
    # The lexicon sits between the second "Glossary" heading and "Part III. Appendices".
    starts = [i for i, line in enumerate(lines) if line.strip() == "Glossary"]  # TOC, then the lexicon
    end = next(i for i, line in enumerate(lines) if re.match(r"^\s*Part\s+III\.\s+Appendices", line))
    return lines[starts[-1] + 1 : end]


def _paragraphs(body: list[str]) -> list[str]:
    paras, cur = [], []
    for line in body:
        if line.strip():
            cur.append(line.strip())
        elif cur:
            paras.append(" ".join(cur))
            cur = []
    if cur:
        paras.append(" ".join(cur))
    return [re.sub(r"\{([^{}]*)\}", r"\1", p) for p in paras]


def parse_entries(lines: list[str]) -> list[dict]:
    """Return ``[{"term", "head", "senses"}]`` for every glossary entry, in file order."""
    entries: list[dict] = []
    for line in _glossary_lines(lines):
        m = _ENTRY.match(line)
        if m:
            entries.append({"term": m.group("term").strip(), "head": m.group("head").strip(), "body": []})
        elif entries:
            entries[-1]["body"].append(line)
    for e in entries:
        e["senses"] = _paragraphs(e.pop("body"))
    return [e for e in entries if e["senses"]]


def to_example(entry: dict) -> dict:
    term, head = entry["term"], entry["head"].rstrip(",. ")
    intro = f"{term} ({head})" if head and head != "//" else term
    return {
        "term": term,
        "instruction": f'What does the hacker jargon term "{term}" mean?',
        "response": intro + ": " + "\n\n".join(entry["senses"]),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", type=Path, default=DEFAULT_SOURCE)
    ap.add_argument("--out-dir", type=Path, default=OUT_DIR)
    args = ap.parse_args(argv)
    if not args.source.exists():
        raise SystemExit(f"error: {args.source} not found; install Debian's jargon-text package")
    examples = [to_example(e) for e in parse_entries(_read(args.source))]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    splits = {"train": [], "eval": []}
    for i, ex in enumerate(examples):
        splits["eval" if i % EVAL_EVERY == EVAL_EVERY - 1 else "train"].append(ex)
    for name, rows in splits.items():
        with open(args.out_dir / f"{name}.jsonl", "w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"{len(examples)} entries -> train {len(splits['train'])}, eval {len(splits['eval'])} in {args.out_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
