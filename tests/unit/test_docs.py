"""The README's config reference is the code's: every key, its default and its help."""

from __future__ import annotations

from pathlib import Path

from ingestd.config import reference_rows

ROOT = Path(__file__).resolve().parents[2]


def test_readme_config_reference_lists_every_key_with_its_default_and_help():
    readme = (ROOT / "README.md").read_text()
    for key, default, help_text in reference_rows():
        row = f"| `{key}` | `{default}` | {help_text.replace('|', '&#124;')} |"
        assert row in readme, f"README config reference is missing or stale for {key}: {row}"


def test_readme_opens_with_the_two_fresh_machine_commands():
    lines = (ROOT / "README.md").read_text().splitlines()
    commands = [ln.strip() for ln in lines[:30] if ln.startswith("    ")]
    assert commands[0] == "python3 -m venv .venv && .venv/bin/pip install . && .venv/bin/ingestd --config config.toml"
    assert commands[1] == "scripts/test"
    assert "scripts/test" in (ROOT / ".ci" / "run").read_text()
