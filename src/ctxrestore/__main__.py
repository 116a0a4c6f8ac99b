"""`python -m ctxrestore`, which is also what `torchrun -m ctxrestore ...` runs."""

from ctxrestore.cli import main

main()
