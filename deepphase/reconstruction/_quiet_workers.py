"""A dask worker plugin for the local workers of ``reconstruct --workers`` (its own module: it needs dask.distributed
at import, an extra)."""

import logging
import signal
import threading

from distributed import WorkerPlugin


class QuietCancellations(WorkerPlugin):
    """A Ctrl-C closes our local workers amid their tiles, and each logged a WARNING that its tile "ended with
    CancelledError" beside the command's one line (the failure audit, s36). Workers dask restarts get it too. (The
    tiles' errors reach the command as their exceptions, not through these logs.)

    It also makes a worker ignore Ctrl-C, as the first ones do from their start (``_deaf_to_ctrl_c``): a worker
    dask restarts (after a crash, ``client.restart()``) is started by a process that takes Ctrl-C again, and would
    print its own KeyboardInterrupt traceback beside the command's one line."""

    def setup(self, worker):
        logging.getLogger("distributed.worker.state_machine").setLevel(logging.ERROR)
        if threading.current_thread() is threading.main_thread():  # (a worker's event loop runs there)
            signal.signal(signal.SIGINT, signal.SIG_IGN)
