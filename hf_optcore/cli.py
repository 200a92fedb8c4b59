"""``hf-optcore``: the command line of hf_optcore.

    hf-optcore train [CONFIG] [section.key=value ...]     # run the SFT recipe (accelerate launch works too)
    hf-optcore validate [CONFIG] [overrides]              # every problem, exit status 2 if any
    hf-optcore show-config [CONFIG] [overrides]           # the resolved config, defaults included
    hf-optcore list-optimizers [--filter adam*]           # the optimizer (and scheduler) registries
    hf-optcore report RUN_DIR                             # report.png + report.md for a run directory

CONFIG is a YAML file merged over the recipe's embedded default, exactly as ``train`` does, so
``validate`` and ``show-config`` describe the run ``train`` would start. Exit status: 0 ok,
2 bad input (every problem printed on stderr, one per line).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

__all__ = ["main"]


def _split_config(ns: argparse.Namespace) -> None:
    # `hf-optcore validate training.max_steps=3` has no CONFIG: the first override landed there.
    if ns.config is not None and "=" in ns.config and not Path(ns.config).is_file():
        ns.overrides = [ns.config, *ns.overrides]
        ns.config = None


def _recipe_default() -> dict | None:
    try:
        from hf_optcore.recipes import sft
    except ImportError:
        return None
    return getattr(sft, "DEFAULT_CONFIG", None)


def _resolve(ns: argparse.Namespace, bare: bool = False):
    from hf_optcore.config import TrainerConfig

    base = None if bare else _recipe_default()
    return TrainerConfig.from_sources(ns.config, ns.overrides, base=base)


def _file_problems(config: Any) -> list[str]:
    """Data files named by the config that do not exist (the recipe would stop on them later)."""
    problems = []
    repo = Path(__file__).resolve().parents[1]
    for key in ("train_path", "eval_path"):
        value = getattr(config.data, key)
        if not value or value.startswith("hub:"):
            continue
        if not Path(value).exists() and not (repo / value).exists():
            problems.append(f"data.{key}: file {value!r} not found")
    return problems


def _print_problems(problems: list[str], where: str) -> None:
    n = len(problems)
    print(f"{where}: {n} problem{'s' if n != 1 else ''}", file=sys.stderr)
    for p in problems:
        print(f"  - {p}", file=sys.stderr)


def cmd_validate(ns: argparse.Namespace) -> int:
    from hf_optcore.config import ConfigError

    where = ns.config or "embedded default"
    try:
        config = _resolve(ns, ns.bare)
    except ConfigError as exc:
        _print_problems(exc.problems, where)
        return 2
    problems = _file_problems(config)
    if problems:
        _print_problems(problems, where)
        return 2
    print(f"{where}: valid")
    return 0


def cmd_show_config(ns: argparse.Namespace) -> int:
    from hf_optcore.config import ConfigError

    try:
        config = _resolve(ns, ns.bare)
    except ConfigError as exc:
        _print_problems(exc.problems, ns.config or "embedded default")
        return 2
    sys.stdout.write(config.to_yaml())
    return 0


def cmd_train(ns: argparse.Namespace) -> int:
    from hf_optcore.recipes import sft

    argv = ["--config", ns.config] if ns.config else []
    if ns.no_samples:
        argv.append("--no-samples")
    return int(sft.main([*argv, *ns.overrides]) or 0)


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
    except ReportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {png}\nwrote {md}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``hf-optcore`` argument parser (subcommands train, validate, show-config, list-optimizers, report)."""
    ap = argparse.ArgumentParser(prog="hf-optcore", description="Fine-tune causal LMs with hf_optcore.")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_config(p: argparse.ArgumentParser, bare_flag: bool = True) -> None:
        p.add_argument("config", nargs="?", help="YAML config (merged over the recipe's embedded default)")
        p.add_argument("overrides", nargs="*", help="dotted section.key=value overrides")
        if bare_flag:
            p.add_argument("--bare", action="store_true",
                           help="start from TrainerConfig's defaults instead of the recipe's embedded default")

    p = sub.add_parser("train", help="run the SFT recipe on a config")
    with_config(p, bare_flag=False)
    p.add_argument("--no-samples", action="store_true", help="skip the before/after sample generations")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("validate", help="list every problem of a config (exit status 2 if any)")
    with_config(p)
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("show-config", help="print the resolved config, defaults included, as YAML")
    with_config(p)
    p.set_defaults(func=cmd_show_config)

    p = sub.add_parser("list-optimizers", help="the registered optimizers and their capabilities")
    p.add_argument("--filter", default=None, help="glob (adam*) or substring")
    p.add_argument("--available", action="store_true", help="only optimizers whose package is installed")
    p.add_argument("--schedulers", action="store_true", help="also list the schedulers")
    p.set_defaults(func=cmd_list_optimizers)

    p = sub.add_parser("report", help="write report.png and report.md for a run directory")
    p.add_argument("run_dir", help="a run's output_dir (or one of its checkpoint folders)")
    p.set_defaults(func=cmd_report)
    return ap


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``hf-optcore`` console script; returns the exit status."""
    ns = build_parser().parse_args(argv)
    if hasattr(ns, "config"):
        _split_config(ns)
    return ns.func(ns)


if __name__ == "__main__":
    raise SystemExit(main())
