"""Every subcommand answers ``--help``."""

from __future__ import annotations

import pytest

from tripwire.cli import _COMMAND_MODULES, main


@pytest.mark.parametrize("command", _COMMAND_MODULES)
def test_help_exits_zero_and_shows_usage(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])

    assert exit_info.value.code == 0
    assert f"usage: tripwire {command}" in capsys.readouterr().out


def test_top_level_help_lists_replay_and_demo(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])

    out = capsys.readouterr().out
    assert "replay" in out
    assert "demo" in out
