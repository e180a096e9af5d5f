"""Every private internal croco relies on (croco.internals.PLACES) is applied against the
installed libraries here: if a release moved one, this fails, naming it, rather than the
patch quietly doing nothing."""

from __future__ import annotations

import pytest

from croco.internals import PLACES, InternalChanged, has_parameters, require


def test_a_moved_internal_stops_naming_the_library_its_version_and_the_internal():
    import prefect

    with pytest.raises(InternalChanged, match=rf"prefect {prefect.__version__} no longer has "
                                              r"Flow\.x\(y\), which croco relies on"):
        require(False, "prefect", "Flow.x(y)")
    require(True, "prefect", "Flow.x(y)")


def test_parameters_are_checked_by_name():
    def f(engine, join_on_exit=True):
        pass

    assert has_parameters(f, "engine", "join_on_exit")
    assert not has_parameters(f, "engine", "timeout")
    assert not has_parameters(None, "engine")


def test_every_place_is_listed_in_the_module_docs():
    import croco.internals

    for lib, what, _ in PLACES:
        assert f"- {lib}: `{what}`" in croco.internals.__doc__


def test_prefects_heartbeat_adjustment_applies():
    from prefect import flow_engine

    from croco.flows.engine import adjust_prefect

    adjust_prefect()
    adjust_prefect()  # once
    assert flow_engine._send_heartbeats.croco_original is not None
    assert not hasattr(flow_engine._send_heartbeats.croco_original, "croco_original")


def test_the_temporary_apis_server_adjustments_apply():
    from prefect.server.database import configurations

    from croco.flows.apiserver import check_ephemeral_server, immediate_sqlite_transactions

    check_ephemeral_server()
    original = configurations.AioSqliteConfiguration.begin_transaction
    try:
        immediate_sqlite_transactions()
        assert configurations.AioSqliteConfiguration.begin_transaction.croco_original \
            is original
    finally:
        configurations.AioSqliteConfiguration.begin_transaction = original


def test_trls_reference_pass_override_applies():
    from trl import DPOTrainer

    from croco.training.dpo import _trainer_class

    trainer = _trainer_class()
    assert issubclass(trainer, DPOTrainer)
    assert trainer._precompute_ref_logps is not DPOTrainer._precompute_ref_logps


def test_the_gguf_parse_once_shortcut_applies():
    import gguf

    from croco.models import _gguf_parsed_once

    reader = gguf.GGUFReader
    with _gguf_parsed_once() as readers:
        assert gguf.GGUFReader is not reader and readers == {}
    assert gguf.GGUFReader is reader


def test_malloc_arenas_are_capped_unless_the_environment_says_otherwise(monkeypatch):
    """`croco.stage.limit_malloc_arenas`: glibc's `mallopt(M_ARENA_MAX, 2)`, skipped when
    `MALLOC_ARENA_MAX` is set (glibc reads that itself); importing the flows applies it."""
    import importlib

    from croco import stage

    calls = []

    class FakeLibc:
        def malloc_trim(self, pad):
            return 1

        def mallopt(self, param, value):
            calls.append((param, value))
            return 1

    monkeypatch.setattr(stage, "_libc", lambda: FakeLibc())
    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    stage.limit_malloc_arenas()
    assert calls == [(-8, 2)]
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    stage.limit_malloc_arenas()
    assert calls == [(-8, 2)]
    monkeypatch.delenv("MALLOC_ARENA_MAX")
    import flows

    calls.clear()
    importlib.reload(flows)
    assert calls == [(-8, 2)]
