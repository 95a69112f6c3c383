"""``python -m stn_deploy.bench``: the same command as the console script."""

from .cli import main

main()
