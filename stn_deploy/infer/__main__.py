"""``python -m stn_deploy.infer``: the same command as the console script."""

from .cli import main

main()
