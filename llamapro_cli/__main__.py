"""`python -m llamapro_cli` runs the CLI."""

from llamapro_cli.cli import main

main()
