"""``python -m ckms.cli``: the same as the ``ckms`` command."""

from ckms.cli._app import main

main()
