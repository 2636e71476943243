"""`python -m edm2.cli ...` (as torchrun runs it)."""

from edm2.cli import main

main()
