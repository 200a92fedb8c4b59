"""Regenerate the config reference table in README.md from the config dataclasses' help texts.

    python scripts/sync_readme.py          # rewrite the block in place
    python scripts/sync_readme.py --check  # exit 1 if README.md is stale (tests/test_config.py checks too)
"""

import re
import sys
from pathlib import Path

from hf_optcore.config import render_reference

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"(<!-- config-reference:start -->\n)(.*?)(<!-- config-reference:end -->)", re.S)


def main() -> int:
    text = README.read_text(encoding="utf-8")
    if not BLOCK.search(text):
        print("README.md has no <!-- config-reference:start/end --> block", file=sys.stderr)
        return 1
    new = BLOCK.sub(lambda m: m.group(1) + render_reference() + "\n" + m.group(3), text)
    if "--check" in sys.argv:
        return 0 if new == text else 1
    README.write_text(new, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
