"""stn-infer's exit statuses and its usage error, shared by the local and the Ray engine."""

from __future__ import annotations

from stn_deploy.errors import StnDeployError

EXIT_OK = 0
EXIT_USAGE = 2  # bad arguments, missing or empty input directory
EXIT_SOME_FAILED = 3  # the run finished but at least one file could not be classified


class InferUsageError(StnDeployError):
    """Bad stn-infer arguments (exit 2)."""

    exit_code = EXIT_USAGE
