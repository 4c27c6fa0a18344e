"""The reference: `%mechnb help` and the README table come from one source and cover every magic."""

import re
from pathlib import Path

import pytest

from mechnb.notebook import reference
from mechnb.notebook.magics import MechnbMagics

README = Path(__file__).parent.parent / "README.md"


@pytest.fixture(scope="module", autouse=True)
def tiny_session_model(shell, tiny_factory):
    shell.user_ns["m"] = tiny_factory("llama")
    shell.run_cell("%mechnb use m", store_history=False)


def usages() -> dict[str, str]:
    """Magic name (`mechnb load`, `patch`, ...) -> its usage in the reference."""
    found = {}
    for entry in reference.ENTRIES:
        for usage in entry.magic.split(", "):
            if usage:
                words = usage.lstrip("%").split()
                name = " ".join(words[:2]) if words[0] == "mechnb" else words[0]
                found[name] = f"{found[name]}, {usage}" if name in found else usage
    return found


def test_the_readme_table_is_the_generated_one():
    text = README.read_text(encoding="utf-8")
    assert reference.readme_block() in text, "run `python -m mechnb.notebook.reference` to regenerate the README table"


def test_mechnb_help_prints_the_reference(shell, capsys):
    assert shell.run_cell("%mechnb help", store_history=False).success
    out = capsys.readouterr().out
    assert out == reference.help_text() + "\n"
    assert "%circuit" in out and "model.circuit(" in out


def test_every_magic_and_command_is_in_the_reference():
    names = set(usages())
    registered = {name for kind in MechnbMagics.magics.values() for name in kind} - {"mechnb"}
    commands = {f"mechnb {n[5:]}" for n in dir(MechnbMagics) if n.startswith("_cmd_")}
    assert registered | commands <= names, sorted((registered | commands) - names)
    assert names <= registered | commands, sorted(names - registered - commands)


def test_every_option_a_magic_accepts_is_in_its_usage(shell, capsys):
    """The parser lists the valid options when given an unknown one; each must be documented."""
    checked, missing = 0, []
    for name, usage in usages().items():
        if name in ("mechnb help", "mechnb use", "mechnb unload", "mechnb info"):
            continue
        source = '%%trace "x" --zzz\npass' if name == "trace" else f"%{name} --zzz"
        shell.run_cell(source, store_history=False)
        err = capsys.readouterr().err
        match = re.search(r"valid options are (.*)$", err.strip())
        assert match, (name, err)
        valid = [o for o in match.group(1).split(", ") if o != "none"]
        aliases = {"--k": "-k"}
        for option in valid:
            option = aliases.get(option, option)
            if not re.search(re.escape(option) + r"(?![\w-])", usage):
                missing.append(f"{option} of %{name}")
        checked += 1
    assert not missing, ", ".join(missing)
    assert checked == len(usages()) - 4


def test_help_lines_fit_and_never_break_inside_brackets():
    lines = reference.help_text().splitlines()
    assert all(len(line) <= 96 for line in lines)
    for line in lines:
        assert line.count("[") == line.count("]"), line
