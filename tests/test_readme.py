"""The README a newcomer reads: short, every flag of --help in it, no path of anyone's machine."""
import os
import re

import pytest

from tools import command_line

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def text(name):
    with open(os.path.join(ROOT, name), encoding="utf-8") as f:
        return f.read()


def test_readme_is_at_most_330_lines():
    """300, and the Windows commands and "Your machine" since: longer text goes to docs/."""
    assert len(text("README.md").splitlines()) <= 330


def test_readme_starts_with_the_two_commands():
    lines = text("README.md").splitlines()
    commands = [line for line in lines[:12] if line.startswith("python3 -m venv .venv")]
    assert len(commands) == 2
    assert commands[0].endswith(".venv/bin/python mnist_net.py")
    assert commands[1].endswith(".venv/bin/python -m pytest -q tests")
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        assert commands[1] in f.read()            # CI runs exactly the README's test command


def test_every_flag_of_help_is_in_the_readme(capsys):
    with pytest.raises(SystemExit):
        command_line.parse_args(["--help"])
    flags = set(re.findall(r"(?<![\w-])(--[a-z][a-z-]*)", capsys.readouterr().out))
    assert len(flags) > 30                         # the help was read
    readme = text("README.md")
    missing = sorted(flag for flag in flags if not re.search(re.escape(flag) + r"(?![a-z-])", readme))
    assert not missing, f"flags of --help not in the README: {missing}"


@pytest.mark.parametrize("name", ["README.md"] + [os.path.join("docs", f) for f in
                                                  sorted(os.listdir(os.path.join(ROOT, "docs")))
                                                  if f.endswith(".md")])
def test_no_machine_paths(name):
    found = re.findall(r"(?:/work/|/tmp/|/root/|/home/|/opt/|/usr/local/)\S*", text(name))
    assert not found, f"{name} names paths of a machine: {found[:3]}"
