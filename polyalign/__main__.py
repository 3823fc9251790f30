"""`python -m polyalign`: the command line (see `polyalign.cli`)."""

from polyalign.cli import main

main()
