"""`python -m llamapro_cli` runs the CLI."""

from .cli import main

main()
