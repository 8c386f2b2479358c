"""Shared command-line plumbing: flags generated from BIRConfig, one-line errors with exit code 2."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from collections.abc import Callable
from typing import Any, NoReturn

from tune_bir import terms
from tune_bir.config import BIRConfig
from tune_bir.errors import TuneBirError
from tune_bir.fields import flag_name, value_type


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line on stderr and exit code 2 (no usage dump, no traceback)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def add_config_flags(parser: argparse.ArgumentParser, exclude: tuple[str, ...] = (),
                     config: type | None = None) -> None:
    """One flag per field of `config` (default BIRConfig; `--lamda-rep` for `lamda_rep`, a plugin's declared
    `flag` where it has one); absent flags stay absent."""
    config = BIRConfig if config is None else config
    hints = typing.get_type_hints(config)
    group = parser.add_argument_group("run options (BIRConfig fields)")
    for f in dataclasses.fields(config):
        if f.name in exclude:
            continue
        flag = flag_name(f.name)
        kind, _ = value_type(hints[f.name])
        help_text = f"{f.metadata.get('help', '')} (default: {f.default})"
        if kind is bool:
            group.add_argument(flag, dest=f.name, action="store_true", default=argparse.SUPPRESS, help=help_text)
        else:
            group.add_argument(flag, dest=f.name, type=kind, choices=f.metadata.get("choices"),
                               default=argparse.SUPPRESS, help=help_text, metavar=f.name.upper())


def config_overrides(namespace: argparse.Namespace) -> dict[str, Any]:
    """The BIRConfig fields the user set on the command line."""
    names = set(BIRConfig.field_names())
    return {k: v for k, v in vars(namespace).items() if k in names}


def run_main(prog: str, main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """Run a CLI main; user errors become one line on stderr and exit code 2, and so does a plugin of another
    package that cannot be loaded (`tune_bir.terms.registered`), before anything else."""
    try:
        terms.registered()
        return main(argv)
    except TuneBirError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
