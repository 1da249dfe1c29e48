"""``sj-parallel --help``: every subcommand listed, every option explained, plain text."""
from __future__ import annotations

import argparse

from sj_parallel_conversion.tools import cli


def _subparsers(parser):
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert len(actions) == 1
    return actions[0].choices


def test_top_level_help_lists_every_subcommand_in_plain_text(capsys):
    parser = cli.build_parser()
    text = parser.format_help()
    subcommands = _subparsers(parser)
    assert set(subcommands) == set(cli.COMMANDS)  # every command the CLI dispatches has a parser
    for name in cli.COMMANDS:
        assert f"    {name} " in text, f"{name} is not described in --help"
    for name, sub in subcommands.items():
        assert "``" not in text + sub.format_help(), f"reST markup in the help of {name}"


def test_every_option_of_every_subcommand_has_help_text():
    parser = cli.build_parser()
    missing = []
    for name, sub in [("sj-parallel", parser), *_subparsers(parser).items()]:
        for action in sub._actions:
            if isinstance(action, argparse._SubParsersAction) or not action.option_strings:
                continue
            if not (action.help or "").strip() or action.help == argparse.SUPPRESS:
                missing.append(f"{name} {'/'.join(action.option_strings)}")
    assert not missing, f"options without help: {missing}"
