"""The README documents what the code has: every setting, and the two commands it starts with."""

from __future__ import annotations

from pathlib import Path

from app.config import Settings

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_every_setting_is_documented() -> None:
    for name in Settings.model_fields:
        assert f"`MODELPRESS_{name.upper()}`" in README, name


def test_the_two_commands_come_first_and_exist() -> None:
    head = README[: README.index("## What runs where")]
    assert "bash scripts/quickstart.sh" in head and "bash scripts/test.sh" in head
    assert (ROOT / "scripts" / "quickstart.sh").exists()
    assert "scripts/test.sh" in (ROOT / ".ci" / "run").read_text()
