"""Regenerate the extension fields of OptCoreArguments (hf_optcore/config/training_args.py) from config/sections.py.

    python scripts/sync_training_args.py          # rewrite the generated block in place
    python scripts/sync_training_args.py --check  # exit 1 if it is stale (tests/test_training_args.py checks too)

Add or change a config field in hf_optcore/config/sections.py, then run this: the arguments class is a class
statement an IDE can read, and the two views cannot drift apart.
"""

import sys
from pathlib import Path

from hf_optcore.config.field_map import with_argument_fields

TARGET = Path(__file__).resolve().parents[1] / "hf_optcore" / "config" / "training_args.py"


def main() -> int:
    text = TARGET.read_text(encoding="utf-8")
    new = with_argument_fields(text)
    if "--check" in sys.argv:
        return 0 if new == text else 1
    TARGET.write_text(new, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
