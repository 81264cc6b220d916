"""The README documents what the code has: every setting, and the two commands it starts with."""

from __future__ import annotations

from pathlib import Path

from app.config import Settings

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _row(name: str) -> str:
    """A setting's row in the README's table, as the class defines it."""
    field = Settings.model_fields[name]
    default = field.default
    if default is None:
        shown = "unset"
    elif isinstance(default, bool):
        shown = f"`{str(default).lower()}`"
    elif default == "":
        shown = "empty"
    else:
        shown = f"`{default}`"
    var = f"`MODELPRESS_{name.upper()}`"
    aliases = getattr(field.validation_alias, "choices", [])[1:]
    var += "".join(f" (or `{a}`)" for a in aliases)
    return f"| {var} | {shown} | {field.description} |"


def test_every_setting_is_documented_as_the_class_says() -> None:
    for name in Settings.model_fields:
        assert _row(name) in README, f"README's row should read:\n{_row(name)}"


def test_the_two_commands_come_first_and_exist() -> None:
    head = README[: README.index("## What runs where")]
    assert "bash scripts/quickstart.sh" in head and "bash scripts/test.sh" in head
    assert (ROOT / "scripts" / "quickstart.sh").exists()
    assert "scripts/test.sh" in (ROOT / ".ci" / "run").read_text()
