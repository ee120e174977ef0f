"""`python -m psal_cli` runs the `psal` command line."""

from psal_cli.cli import main

main()
