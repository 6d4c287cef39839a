"""`python -m cnnkit` is the `cnnkit` command."""

from cnnkit.cli.main import main

if __name__ == "__main__":
    raise SystemExit(main())
