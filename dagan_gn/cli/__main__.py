"""``python -m dagan_gn.cli ...`` (used by ``torchrun --nproc_per_node K -m dagan_gn.cli train ...``)."""

from dagan_gn.cli import main

main()
