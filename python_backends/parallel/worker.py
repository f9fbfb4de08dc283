"""A parallel worker: ``python -m ditserve.parallel.worker``, started by ``WorkerGroup`` (group.py).

Reads a ``WorkerSpec`` from stdin, builds the same stage as rank 0 on its own device, joins the
process group, then runs every batch of requests that rank 0 sends on stdin until EOF. Any
exception ends the process with a traceback in the server log; rank 0 sees the exit, fails the
request in flight and restarts the group.
"""

from __future__ import annotations

import faulthandler
import importlib
import os
import pickle
import signal
import sys
import threading
import time


def _exit_with_parent(parent: int) -> None:
    """End this process once rank 0 is gone, also while the main thread waits inside a collective
    (collectives release the GIL). Polled in a thread rather than PR_SET_PDEATHSIG, which fires
    when the *thread* that started the worker exits, not its process."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


def main() -> None:
    # `kill -USR1 <worker pid>` writes every thread's stack to the server log: the way to see where
    # a rank waits when a group hangs inside a collective (no Python frame of its own shows that).
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    stdin = sys.stdin.buffer
    spec = pickle.load(stdin)  # imports torch, which does not initialise CUDA
    threading.Thread(target=_exit_with_parent, args=(spec.parent_pid,), daemon=True).start()

    import datetime

    import torch.distributed as dist

    from ditserve.parallel.group import connect, to_device

    module, name = spec.stage.split(":")
    stage = getattr(importlib.import_module(module), name)(spec.runtime, spec.options, rank=spec.rank)
    timeout = datetime.timedelta(seconds=spec.config.timeout_s)
    store = dist.TCPStore("127.0.0.1", spec.store_port, spec.config.world_size, is_master=False, timeout=timeout)
    store.set(f"up/{spec.rank}", "1")
    stage.attach(connect(spec.config, spec.rank, store))
    store.set(f"ready/{spec.rank}", "1")
    while True:
        try:
            requests = pickle.load(stdin)
        except EOFError:  # rank 0 stopped the group or is gone
            break
        stage.denoise(to_device(requests, stage.runtime.device))
    stage.attach(None)  # before the teardown, as WorkerGroup.stop does on rank 0 (CUDA graphs)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
