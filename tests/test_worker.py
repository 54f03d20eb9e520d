"""Choosing and building the gunicorn worker."""

import logging

from counter import config
from counter.serving import lifecycle, meinheld_worker


def test_meinheld_is_chosen_when_it_imports():
    if meinheld_worker.MEINHELD_IMPORT_ERROR is None:
        assert lifecycle.worker_class(config.load({})) == "counter.serving.meinheld_worker.MeinheldWorker"


def test_without_meinheld_the_sync_worker_is_used_with_a_warning_that_says_why(monkeypatch, caplog):
    monkeypatch.setattr(meinheld_worker, "MEINHELD_IMPORT_ERROR",
                        ImportError("undefined symbol: Py_TRASHCAN_SAFE_BEGIN"))
    with caplog.at_level(logging.WARNING, logger="counter.service"):
        assert lifecycle.worker_class(config.load({})) == "sync"
    assert "meinheld cannot be imported" in caplog.text and "Py_TRASHCAN_SAFE_BEGIN" in caplog.text


def test_an_explicit_worker_class_is_kept():
    assert lifecycle.worker_class(config.load({"WORKER_CLASS": "sync"})) == "sync"


def test_the_meinheld_worker_leaves_gunicorns_logger_alone():
    """meinheld's own worker swaps Logger.error in the master; ours must not."""
    if meinheld_worker.MEINHELD_IMPORT_ERROR is not None:
        return
    from gunicorn.config import Config
    from gunicorn.glogging import Logger

    before = Logger.error
    cfg = Config()
    log = Logger(cfg)
    w = meinheld_worker.MeinheldWorker(0, 1, [], None, 30, cfg, log)
    assert Logger.error is before
    log.error("Worker (pid:%s) was sent SIGKILL!", 123)  # raised TypeError with meinheld's patch
    assert w is not None


def test_without_meinheld_granian_is_preferred_and_the_log_says_why(monkeypatch, caplog):
    monkeypatch.setattr(meinheld_worker, "MEINHELD_IMPORT_ERROR",
                        ImportError("undefined symbol: Py_TRASHCAN_SAFE_BEGIN"))
    with caplog.at_level(logging.WARNING, logger="counter.service"):
        assert lifecycle.choose_server(config.load({})) == "granian"
    assert "serving with granian instead" in caplog.text and "Py_TRASHCAN_SAFE_BEGIN" in caplog.text


def test_with_meinheld_gunicorn_is_the_default_and_an_explicit_choice_is_kept():
    if meinheld_worker.MEINHELD_IMPORT_ERROR is None:
        assert lifecycle.choose_server(config.load({})) == "gunicorn"
    assert lifecycle.choose_server(config.load({"SERVER": "granian"})) == "granian"
    assert lifecycle.choose_server(config.load({"SERVER": "gunicorn"})) == "gunicorn"
