"""``hf-optcore``: the command line of hf_optcore.

    hf-optcore train [CONFIG] [section.key=value ...]     # run the SFT recipe (accelerate launch works too)
    hf-optcore validate [CONFIG] [overrides]              # every problem, exit status 2 if any
    hf-optcore show-config [CONFIG] [overrides]           # the resolved config, defaults included
    hf-optcore list-optimizers [--filter adam*]           # the optimizer (and scheduler) registries
    hf-optcore report RUN_DIR                             # report.png + report.md for a run directory

CONFIG is a YAML file merged over the recipe's embedded default, exactly as ``train`` does (the recipe's
own :func:`~hf_optcore.recipes.sft.build_config`), so ``validate`` and ``show-config`` describe the run
``train`` would start; ``validate`` also runs the recipe's own checks before loading
(:func:`~hf_optcore.recipes.sft.check_before_loading`: output dir, data files and rows, eval set, metric,
packages, the model's own code, sequence length, resume), writing nothing. Overrides may come before or
after flags; an override is ``section.key=value``, ``output_dir=value`` or ``section={...}``, any other argument is
CONFIG.

Exit status: 0 ok, 2 bad input: every problem printed on stderr as one ``error: ...`` line, no
traceback (``--debug`` raises instead, to show one). Only bugs print tracebacks.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

__all__ = ["main"]


# A dotted config key: ``section.key`` or deeper (``model.lora.r``).
_DOTTED_KEY = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)+$")


def _is_override(token: str) -> bool:
    """An override is ``section.key=value``, ``output_dir=value`` or ``section={...}``; any other token is CONFIG,
    even with an ``=`` in it, so that a missing ``x=y.yaml`` is "config file not found", never an override."""
    from hf_optcore.config.sections import SECTIONS

    key = token.split("=", 1)[0].strip()
    is_key = key == "output_dir" or key in SECTIONS or bool(_DOTTED_KEY.match(key))
    return "=" in token and is_key and not Path(token).is_file()


def _split_config(ns: argparse.Namespace, extra: list[str]) -> None:
    """CONFIG and overrides from every positional token, wherever the flags were.

    argparse fills CONFIG and the overrides only from the positionals before the first flag and
    leaves later ones in ``extra``; ``hf-optcore validate training.max_steps=3`` has no CONFIG, so
    the first override lands in it.
    """
    tokens = ([ns.config] if ns.config is not None else []) + list(ns.overrides) + extra
    ns.config = tokens.pop(0) if tokens and not _is_override(tokens[0]) else None
    ns.overrides = tokens


def _check_config_argument(ns: argparse.Namespace) -> None:
    from hf_optcore.config import ConfigError

    if ns.config and "=" in ns.config and not Path(ns.config).exists():
        raise ConfigError([f"config file {ns.config!r} not found (an argument with '=' is an override only when "
                           f"written section.key=value or output_dir=value)"])


def _resolve(ns: argparse.Namespace, bare: bool = False):
    from hf_optcore.recipes import sft

    _check_config_argument(ns)
    # The recipe's own function: the config train would run (the demo's when there is no CONFIG).
    return sft.build_config(ns.config, ns.overrides, bare=bare)


def print_errors(exc: BaseException) -> None:
    """One ``error: ...`` line on stderr per problem of ``exc`` (a ConfigError lists several)."""
    for problem in getattr(exc, "problems", None) or [str(exc)]:
        print(f"error: {problem}", file=sys.stderr)


def cmd_validate(ns: argparse.Namespace) -> int:
    from hf_optcore.recipes import sft

    config = _resolve(ns, ns.bare)
    sft.check_before_loading(config)  # exactly what train checks before the model loads
    print(f"{ns.config or 'embedded default'}: valid")
    return 0


def cmd_show_config(ns: argparse.Namespace) -> int:
    sys.stdout.write(_resolve(ns, ns.bare).to_yaml())
    return 0


def cmd_train(ns: argparse.Namespace) -> int:
    from hf_optcore.recipes import sft

    _check_config_argument(ns)
    argv = ["--config", ns.config] if ns.config else []
    if ns.no_samples:
        argv.append("--no-samples")
    if ns.debug:
        argv.append("--debug")
    return int(sft.main([*argv, *ns.overrides], allow_reexec=True) or 0)


def _optimizer_rows(pattern: str | None, available_only: bool) -> list[tuple[str, str, str]]:
    from hf_optcore import optim

    rows = []
    names = optim.list_optimizers(pattern, include_aliases=False, available_only=available_only)
    for name in names:
        info = optim.get_optimizer_info(name)
        flags = [f for f in ("has_betas", "has_momentum", "supports_fused", "supports_foreach", "schedule_free")
                 if getattr(info, f, False)]
        note = "" if info.is_available() else f" [needs `pip install {info.pip_name or info.package}`]"
        aliases = getattr(optim.registry, "aliases_of", lambda _n: [])(name)
        alias_text = f" (aliases: {', '.join(aliases)})" if aliases else ""
        rows.append((name, ",".join(f.replace("has_", "").replace("supports_", "") for f in flags),
                     f"{info.description}{alias_text}{note}"))
    return rows


def cmd_list_optimizers(ns: argparse.Namespace) -> int:
    from hf_optcore import optim

    rows = _optimizer_rows(ns.filter, ns.available)
    if not rows:
        print(f"no optimizer matches {ns.filter!r}; registered: {', '.join(optim.list_optimizers())}",
              file=sys.stderr)
        return 2
    width = max(len(r[0]) for r in rows)
    fwidth = max(len(r[1]) for r in rows)
    print(f"{'optimizer':{width}}  {'capabilities':{fwidth}}  description")
    for name, flags, desc in rows:
        print(f"{name:{width}}  {flags:{fwidth}}  {desc}")
    if ns.schedulers:
        print()
        names = optim.list_schedulers()
        swidth = max(len(n) for n in names)
        print(f"{'scheduler':{swidth}}  description")
        for name in names:
            info = optim.get_scheduler_info(name)
            print(f"{name:{swidth}}  {info.description}")
    return 0


def cmd_report(ns: argparse.Namespace) -> int:
    from hf_optcore.report import ReportError, write_report

    try:
        png, md = write_report(ns.run_dir)
    except ReportError:
        raise
    except OSError as exc:  # e.g. a run directory that cannot be written into
        raise ReportError(f"cannot write the report into {ns.run_dir!r}: {exc.strerror or exc}") from exc
    print(f"wrote {png}\nwrote {md}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``hf-optcore`` argument parser (subcommands train, validate, show-config, list-optimizers, report)."""
    ap = argparse.ArgumentParser(prog="hf-optcore", description="Fine-tune causal LMs with hf_optcore.")
    ap.add_argument("--debug", action="store_true", help="show the traceback of a user error instead of one line")
    # The flag also after the command; SUPPRESS keeps a subcommand from resetting the top-level value.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_config(p: argparse.ArgumentParser, bare_flag: bool = True) -> None:
        p.add_argument("config", nargs="?", help="YAML config (merged over the recipe's embedded default)")
        p.add_argument("overrides", nargs="*", help="dotted section.key=value overrides")
        if bare_flag:
            p.add_argument("--bare", action="store_true",
                           help="start from TrainerConfig's defaults instead of the recipe's embedded default")

    p = sub.add_parser("train", help="run the SFT recipe on a config", parents=[common])
    with_config(p, bare_flag=False)
    p.add_argument("--no-samples", action="store_true", help="skip the before/after sample generations")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("validate", help="list every problem of a config (exit status 2 if any)", parents=[common])
    with_config(p)
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("show-config", help="print the resolved config, defaults included, as YAML", parents=[common])
    with_config(p)
    p.set_defaults(func=cmd_show_config)

    p = sub.add_parser("list-optimizers", help="the registered optimizers and their capabilities", parents=[common])
    p.add_argument("--filter", default=None, help="glob (adam*) or substring")
    p.add_argument("--available", action="store_true", help="only optimizers whose package is installed")
    p.add_argument("--schedulers", action="store_true", help="also list the schedulers")
    p.set_defaults(func=cmd_list_optimizers)

    p = sub.add_parser("report", help="write report.png and report.md for a run directory", parents=[common])
    p.add_argument("run_dir", help="a run's output_dir (or one of its checkpoint folders)")
    p.set_defaults(func=cmd_report)
    return ap


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``hf-optcore`` console script; returns the exit status.

    A user error (bad config, missing file, failed preflight, bad data, unreadable run directory)
    prints one ``error: ...`` line per problem and returns 2; with ``--debug`` it is raised instead.
    """
    parser = build_parser()
    ns, extra = parser.parse_known_args(argv)
    flags = [a for a in extra if a.startswith("-")]
    if flags or (extra and not hasattr(ns, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(flags or extra)}")
    if hasattr(ns, "overrides"):
        _split_config(ns, extra)
    from hf_optcore.config import ConfigError
    from hf_optcore.errors import OptCoreError
    from hf_optcore.report import ReportError

    try:
        status = ns.func(ns)
        sys.stdout.flush()  # inside the try: a closed pipe fails here at the latest, not at interpreter exit
        return status
    except (ConfigError, OptCoreError, ReportError) as exc:
        if ns.debug:
            raise
        print_errors(exc)
        return 2
    except BrokenPipeError:
        # The reader went away (`hf-optcore list-optimizers | head -1`): what it read is all it wanted. Point
        # stdout at /dev/null so that the interpreter's last flush does not fail again on the closed pipe.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
