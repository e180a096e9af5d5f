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
stops with `croco.internals.InternalChanged` (naming Prefect's version) if not.
"""

from __future__ import annotations

from contextlib import contextmanager

from croco.internals import has_parameters, require


def _unjoined_heartbeats(original):
    @contextmanager
    def send_heartbeats(engine, join_on_exit: bool = True):
        with original(engine, join_on_exit=False):
            yield

    send_heartbeats.croco_original = original
    send_heartbeats.__doc__ = original.__doc__
    return send_heartbeats


def adjust_prefect() -> None:
    """Apply the adjustments above (once)."""
    from prefect import flow_engine

    current = getattr(flow_engine, "_send_heartbeats", None)
    if hasattr(current, "croco_original"):
        return
    require(has_parameters(current, "engine", "join_on_exit"), "prefect",
            "prefect.flow_engine._send_heartbeats(engine, join_on_exit)")
    flow_engine._send_heartbeats = _unjoined_heartbeats(current)
