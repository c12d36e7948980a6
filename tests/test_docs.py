"""Docs are checked by tests: every setting and CLI command must be documented in the README."""

from pathlib import Path

from runlane.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_every_setting_is_documented() -> None:
    for name in Settings.names():
        assert f"`{name}`" in README, f"setting {name} is missing from the README's settings table"


def test_every_cli_command_is_documented() -> None:
    from runlane.cli.main import cli

    for name in cli.commands:
        assert f"runlane {name}" in README or f"`{name} ID`" in README, (
            f"CLI command {name} is not in the README"
        )


def test_readme_links_resolve() -> None:
    for target in ("docs/guide.md", "CHANGELOG.md"):
        assert f"]({target})" in README
        assert (ROOT / target).exists(), target
