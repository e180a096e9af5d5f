"""Adjustments to Prefect's flow engine, applied when croco's flows are imported.

- **A flow run ends without waiting for its heartbeat thread.** Prefect 3 sends a flow
  run's heartbeats from a daemon thread that sleeps in one-second steps, and a
  synchronous flow run joins that thread when it ends, so every flow run (the pipeline
  and each of its subflows) spends up to a second waiting for the thread's current
  sleep to finish: about a second per flow on a cached rerun, which otherwise takes a
  few seconds. The thread is told to stop in either case and stops by itself at its
  next step without sending another heartbeat; the asynchronous engine already leaves
  it so (`join_on_exit=False`). The heartbeats sent while the run lives are unchanged.

Each adjustment checks that Prefect still has the function and argument it adjusts, and
leaves Prefect as it is otherwise.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager


def _unjoined_heartbeats(original):
    @contextmanager
    def send_heartbeats(engine, join_on_exit: bool = True):
        with original(engine, join_on_exit=False):
            yield

    send_heartbeats.croco_original = original
    send_heartbeats.__doc__ = original.__doc__
    return send_heartbeats


def adjust_prefect() -> bool:
    """Apply the adjustments above (once); True if the heartbeat one is in place."""
    from prefect import flow_engine

    current = getattr(flow_engine, "_send_heartbeats", None)
    if current is None:
        return False
    if hasattr(current, "croco_original"):
        return True
    if "join_on_exit" not in inspect.signature(current).parameters:
        return False
    flow_engine._send_heartbeats = _unjoined_heartbeats(current)
    return True
