"""The command line: every command explains itself (argparse formats each flag's help)."""

from __future__ import annotations

import pytest

from fastgen_compile.cli import main

COMMANDS = ["generate", "demo", "chat", "bench", "serve", "warmup"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_prints_its_help(command, capsys):
    with pytest.raises(SystemExit) as exited:
        main([command, "--help"])
    assert exited.value.code == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"usage: fastgen-compile {command}")
    assert "--itl-target-ms" in printed  # every command that builds an engine has its flags
