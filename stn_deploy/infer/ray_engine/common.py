"""What the Ray engine's modules share: its limits, its job-level error, how a URI is told apart."""

from __future__ import annotations

import re

from stn_deploy.errors import StnDeployError

# pyarrow and ray are imported inside functions: they are the optional [ray] extra, and nothing
# else in stn_deploy may need them (import stn_deploy.infer.ray_engine must work without them).

FAULT_ENV = "STN_RAY_FAULT"  # test hook, "N:MARKER": the actor on its Nth batch exits once (see InferenceActor)
HIDDEN = ("__node", "__provider")  # side-channel columns: where each row was inferred; never written
# An actor that dies is restarted and its batch retried, this many times; a batch that keeps killing
# its actor (a crashing provider) then fails the job instead of looping forever.
MAX_RESTARTS = 3
ACTOR_START_TIMEOUT_S = 600  # an autoscaling cluster may take minutes to add the nodes for the pool
ROWS_PER_PART = 50_000  # Parquet part size: rows gathered into one write task (and one file)
URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


class RayEngineError(StnDeployError):
    """The Ray job as a whole failed (cluster unreachable, actors cannot start, a stage crashed)."""


def is_uri(source: str) -> bool:
    return bool(URI.match(source))
