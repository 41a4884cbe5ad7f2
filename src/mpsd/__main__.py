"""``python -m mpsd``: the same as the ``mpsd`` command."""

from mpsd.cli import main

if __name__ == "__main__":
    main()
