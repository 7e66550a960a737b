"""``python -m kcons.cli ...``: the ``kcons`` command without the console script."""

from kcons.cli import main

if __name__ == "__main__":
    main()
