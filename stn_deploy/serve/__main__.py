"""``python -m stn_deploy.serve`` runs stn-serve."""

from .cli import main

main()
