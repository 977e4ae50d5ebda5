"""Background work at the lowest CPU priority, so that serving always comes first.

On a core shared with the event loop, a reload at the same priority takes
whole time slices from it: measured on one core at 2,000 req/s, client p99
rose 2.4x while reloading. Linux keeps a nice value per thread, so a thread
can lower its own. Shadow copies run at nice 19 too (``server.core.rollout``).
"""

from __future__ import annotations

import contextlib
import os
import threading


def lowest_thread_priority() -> None:
    """Nice 19 for the calling thread (a ``ThreadPoolExecutor`` initializer).

    Not SCHED_IDLE: work queued on such a thread (a load) must still finish
    when the server saturates the core, only later.
    """
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)


def idle_process(pid: int) -> None:
    """Run ``pid`` (0: this process) only on CPU time nothing else wants: SCHED_IDLE.

    A SCHED_IDLE process is preempted as soon as a normal one wakes; nice 19
    alone still took whole slices. Where SCHED_IDLE is missing, nice 19.
    """
    try:
        os.sched_setscheduler(pid, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):  # not Linux, or the process is gone
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, pid, 19)
