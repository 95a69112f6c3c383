"""``stn-infer --engine ray``: the same rows as ``stn-infer``, computed on a Ray cluster with Ray Data.

The pipeline is one streamed Ray Data dataset::

    listing (driver: a local directory, or s3:// gs:// file:// ... through pyarrow/fsspec)
      -> blocks of paths
      -> decode tasks      map_batches(function): the single-process decoder and its guards
      -> inference actors  map_batches(callable class holding a Session), an ActorPoolStrategy
      -> rows              a Parquet directory written by write tasks (a Datasink), or one
                           CSV / JSON Lines / Parquet file written by the driver in path order

The rows are :func:`stn_deploy.infer.predictions_for`'s, so they have the single-process
command's columns and values; Parquet keeps the CSV's column names. Bad files stay rows, as in the
single-process command: a local file is decoded by :func:`stn_deploy.images.decode` itself (the
same stat, open and decode checks, so a dangling link or a named pipe is an error row, not a
failed or hung read task), and a file in an object store is read as bytes by a pyarrow
filesystem in the decode task and decoded by :func:`stn_deploy.decoders.decode_data` (the same
checks and texts). Ray Data's own ``read_binary_files`` is not used for that reason: one file it
cannot open fails its whole read task, and with it the job.

Faults: inference actors are restarted by Ray (``max_restarts``) and the task they were running
is retried on the new actor (``max_task_retries``); a task's output counts only once it has
finished, and the Parquet parts are named by task index, so a retried task replaces its part.
The rows come out once each (tests/test_infer_ray.py kills an actor mid-run to show it).

Modules: ``sources`` (listing SOURCE), ``tasks`` (decode tasks and inference actors), ``output``
(the ordered file or the Parquet parts), ``job`` (the Ray job), ``command`` (the CLI's side);
``common`` holds what they share. Nothing here is imported unless ``--engine ray`` is chosen
(``pip install stn-deploy[ray]``), and like the rest of the runtime it imports no torch.
"""

from .command import main_ray, run_command
from .common import FAULT_ENV, RayEngineError
from .job import RayOptions, RaySummary, infer_on_ray
from .sources import SourceListing, list_source

__all__ = [
    "FAULT_ENV",
    "RayEngineError",
    "RayOptions",
    "RaySummary",
    "SourceListing",
    "infer_on_ray",
    "list_source",
    "main_ray",
    "run_command",
]
