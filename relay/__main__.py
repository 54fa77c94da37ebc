"""``python -m relay`` runs the command line."""

from relay.commands.cli import main

raise SystemExit(main())
