"""Every command has help text with an example, and a README entry."""

from pathlib import Path

import typer.main

from cli import app

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def commands(group=None, prefix=()):
    group = group or typer.main.get_group(app)
    for name, cmd in group.commands.items():
        path = (*prefix, name)
        if hasattr(cmd, "commands"):
            yield from commands(cmd, path)
        else:
            yield " ".join(path), cmd


def test_every_command_has_help_with_an_example_and_a_readme_entry():
    found = dict(commands())
    assert {"extract", "sql"} <= set(found)
    for name, cmd in found.items():
        assert cmd.help and "Example: python cli.py" in cmd.help, name
        assert f"python cli.py {name}" in README, f"README has no entry for `python cli.py {name}`"


def test_readme_stage_table_is_the_profiles():
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "scripts" / "stage_table.py"
    spec = importlib.util.spec_from_file_location("stage_table", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.render() in README, "README's stage table is stale: run python scripts/stage_table.py"
