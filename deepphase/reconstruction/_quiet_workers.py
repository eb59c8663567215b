"""A dask worker plugin for the local workers of ``reconstruct --workers`` (its own module: it needs dask.distributed
at import, an extra)."""

import logging

from distributed import WorkerPlugin


class QuietCancellations(WorkerPlugin):
    """A Ctrl-C closes our local workers amid their tiles, and each logged a WARNING that its tile "ended with
    CancelledError" beside the command's one line (the failure audit, s36). Workers dask restarts get it too. (The
    tiles' errors reach the command as their exceptions, not through these logs.)"""

    def setup(self, worker):
        logging.getLogger("distributed.worker.state_machine").setLevel(logging.ERROR)
