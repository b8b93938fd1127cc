"""`python -m fashionfuse ...` (what `torchrun -m fashionfuse` runs)."""

from .cli import main

main()
