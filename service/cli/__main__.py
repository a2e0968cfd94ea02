"""``python -m service.cli``: the ``sluice`` command."""

from service.cli.main import main

main()
