from __future__ import annotations

import logging

import orjson

from ingestd.config import LogConfig
from ingestd.logs import setup_logging


def test_json_log_lines_carry_level_logger_process_and_message(capsys):
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        setup_logging(LogConfig(level="debug", format="json"), process="uploader-3")
        logging.getLogger("ingestd.uploader").info("uploader %d: wrote %s (%d payloads)", 3, "k/x.ndjson.gz", 12)
        try:
            raise ValueError("boom")
        except ValueError:
            logging.getLogger("ingestd.supervisor").exception("failed")
        lines = capsys.readouterr().err.strip().splitlines()
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    first, second = (orjson.loads(line) for line in lines)
    assert first["msg"] == "uploader 3: wrote k/x.ndjson.gz (12 payloads)"
    assert first["level"] == "info" and first["logger"] == "ingestd.uploader" and first["process"] == "uploader-3"
    assert first["ts"].endswith("Z") and isinstance(first["pid"], int)
    assert second["level"] == "error" and "ValueError: boom" in second["exc"]


def test_text_logs_name_the_process_role_and_respect_the_level(capsys):
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        setup_logging(LogConfig(level="warning", format="text"), process="supervisor")
        logging.getLogger("ingestd.x").info("hidden")
        logging.getLogger("ingestd.x").warning("shown %s", "here")
        err = capsys.readouterr().err
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    assert "hidden" not in err
    assert "WARNING [supervisor" in err and "ingestd.x: shown here" in err
