"""``python -m boundguard``: the same as the ``boundguard`` command."""
from boundguard.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
