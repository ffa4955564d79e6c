"""`python -m prune` (e.g. under `torchrun --nproc-per-node 2 -m prune ...`): the `prune` command."""

from prune.cli import main

main()
