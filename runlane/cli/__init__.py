"""The ``runlane`` command line; ``main`` is the console-script entry point."""

from runlane.cli.main import cli, main

__all__ = ["cli", "main"]
