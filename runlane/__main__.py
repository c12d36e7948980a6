"""``python -m runlane``: the same as the ``runlane`` command."""

from runlane.cli.main import main

if __name__ == "__main__":
    main()
