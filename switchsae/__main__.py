"""``python -m switchsae`` (what ``torchrun -m switchsae train ...`` runs on each rank)."""
from switchsae.cli import main

main()
