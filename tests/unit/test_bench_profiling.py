"""The bench's CPU breakdown per payload from py-spy stacks (scripts/bench_support/profiling.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))

from bench_support import profiling as p

SUPERVISOR = 'process 100:"/venv/bin/python /venv/bin/ingestd --config cfg.toml"'
LISTENER = ('process 101:"/venv/bin/python -B -c from multiprocessing.spawn import spawn_main; '
            'spawn_main(tracker_fd=9, pipe_handle=21) --multiprocessing-fork"')
UPLOADER = 'process 102:"/venv/bin/python -B -c from multiprocessing.spawn import spawn_main; spawn_main(tracker_fd=9)"'
HANDLER = ("Thread._bootstrap (threading.py:1002);Thread.run (threading.py:982);"
           "ThreadedTaskDispatcher.handler_thread (waitress/task.py:83);WSGITask.execute (waitress/task.py:473);"
           "FastIngest.__call__ (ingestd/app.py:223);PayloadsResource.accept (ingestd/app.py:91)")
RAW = "\n".join([
    (f"{SUPERVISOR};{LISTENER};thread (201): waitress-0;{HANDLER};decode_collection (ingestd/validation.py:277);"
     "parse_json (ingestd/validation.py:205);_loads (ingestd/validation.py:193) 30"),
    (f"{SUPERVISOR};{LISTENER};thread (201): waitress-0;{HANDLER};decode_collection (ingestd/validation.py:273);"
     "needs_exact (ingestd/validation.py:153) 10"),
    (f"{SUPERVISOR};{LISTENER};thread (201): waitress-0;{HANDLER};Intake.submit (ingestd/intake.py:177);"
     "RequestLog.append (ingestd/requestlog.py:333) 20"),
    (f"{SUPERVISOR};{LISTENER};thread (201): waitress-0;Thread._bootstrap (threading.py:1002);"
     "ThreadedTaskDispatcher.handler_thread (waitress/task.py:71);Condition.wait (threading.py:327) 40"),
    (f"{SUPERVISOR};{LISTENER};thread (202): waitress;BaseWSGIServer.run (waitress/server.py:325);"
     "dispatcher.send (waitress/wasyncore.py:392);send (socket.py:10) 50"),
    (f"{SUPERVISOR};{LISTENER};thread (203): ref-writer;Thread._bootstrap (threading.py:1002);"
     "RefWriter.run (ingestd/intake.py:86) 300"),
    (f"{SUPERVISOR};{UPLOADER};thread (301): sender-0;Sender.run (ingestd/uploader.py:108);"
     "Delivery.deliver (ingestd/delivery.py:105);Delivery.encode (ingestd/delivery.py:82);compress (gzip.py:586) 25"),
    (f"{SUPERVISOR};{UPLOADER};thread (301): sender-0;Sender.run (ingestd/uploader.py:108);"
     "Delivery.put_object (ingestd/delivery.py:140);S3Sink.put (ingestd/s3sink.py:140);"
     "BaseClient._make_api_call (botocore/client.py:1044);uuid4 (uuid.py:723) 75"),
    f"{SUPERVISOR};thread (100): MainThread;Supervisor.run (ingestd/supervisor.py:386) 5",
    f"{SUPERVISOR};{LISTENER};thread (204): waitress-1 2",
    "garbage",
    "",
])


def test_raw_lines_are_split_into_process_thread_and_frames() -> None:
    samples = p.parse_raw(RAW)
    assert len(samples) == 10
    first = samples[0]
    assert (first.pid, first.tid, first.thread, first.n) == (101, 201, "waitress-0", 30)
    assert first.frames[0] == "Thread._bootstrap (threading.py:1002)"  # the cmdline's ";" did not split it
    assert first.frames[-1] == "_loads (ingestd/validation.py:193)"
    assert samples[-1].frames == () and samples[-1].tid == 204  # a thread with no Python frame


@pytest.mark.parametrize(("frames", "group"), [
    (["PayloadsResource.accept (ingestd/app.py:91)", "_loads (ingestd/validation.py:193)"], p.PARSE),
    (["PayloadsResource.accept (ingestd/app.py:91)", "parse_json (ingestd/validation.py:210)"], p.VALIDATE),
    (["encode_collection (ingestd/validation.py:310)", "rfc3339_ms (ingestd/records.py:33)"], p.ENCODE),
    (["Intake.submit (ingestd/intake.py:166)", "request_record (ingestd/records.py:97)"], p.LOG),
    (["Intake.submit (ingestd/intake.py:160)", "Intake.queue_full (ingestd/intake.py:150)"], p.QUEUE),
    (["Uploader.add (ingestd/uploader.py:190)", "read_record (ingestd/requestlog.py:105)"], p.BATCH),
    (["Delivery.encode (ingestd/delivery.py:82)", "compress (gzip.py:586)", "write (<frozen zlib>:1)"], p.COMPRESS),
    (["S3Sink.put (ingestd/s3sink.py:140)", "Queue.get (queue.py:182)"], p.PUT),  # generic frames go to the caller
    (["HTTPChannel.received (waitress/channel.py:211)", "IngestParser.received (ingestd/front.py:97)"], p.HTTP),
    (["Thread.run (threading.py:982)", "select (selectors.py:415)"], p.OTHER),  # nothing known on the stack
    (["Keeper.step (ingestd/listener.py:190)"], p.LOG),
    (["now_ms (ingestd/scoreboard.py:20)"], p.OTHER),
    (["f (/opt/venv/lib/python3.11/site-packages/waitress/task.py:1)"], p.HTTP),  # long paths are shortened
    (["f (/work/main/ingestd/refqueue.py:150)"], p.QUEUE),
    (["run (uvloop/__init__.py:82)", "IngestProtocol.data_received (ingestd/fastfront.py:300)"], p.HTTP),
    (["Delivery.encode (ingestd/delivery.py:96)", "encode (ingestd/formats.py:60)"], p.COMPRESS),
])
def test_a_stack_goes_to_the_group_of_its_innermost_known_frame(frames: list[str], group: str) -> None:
    assert p.classify(frames) == group


def test_each_threads_measured_cpu_is_split_by_its_own_samples() -> None:
    samples = p.parse_raw(RAW)
    cpu = {(101, 201): 0.6, (101, 202): 0.5, (101, 203): 0.01, (102, 301): 1.0, (100, 100): 0.1,
           (101, 204): 0.2, (101, 299): 0.3}  # 299: a thread py-spy never saw running
    roles = {100: "supervisor", 101: "listener", 102: "uploader"}
    out = p.attribute(samples, cpu, roles, {"listener": 1000, "supervisor": 1000, "uploader": 500})
    g = out["us_per_payload"]
    # waitress-0: 600 µs/payload over 60 samples that are not waits (the 40 waits are left out)
    assert g[p.PARSE] == pytest.approx(600 * 30 / 60)
    assert g[p.VALIDATE] == pytest.approx(600 * 10 / 60)
    assert g[p.QUEUE] == pytest.approx(10)  # the ref-writer's 300 samples weigh only its 0.01 s
    assert g[p.COMPRESS] == pytest.approx(2000 * 25 / 100)  # uploader CPU per *delivered* payload
    assert g[p.PUT] == pytest.approx(2000 * 75 / 100)
    assert g[p.HTTP] == pytest.approx(500)
    # no-frame and never-sampled threads, and the supervisor's loop, land in other
    assert g[p.OTHER] == pytest.approx(100 + 200 + 300)
    assert out["unsampled_us_per_payload"] == pytest.approx(300)
    assert out["by_role_us_per_payload"] == pytest.approx({"listener": 1610, "uploader": 2000, "supervisor": 100})
    assert out["total_us_per_payload"] == pytest.approx(3710)
    assert 0 < out["wait_sample_share"] < 1


def test_a_thread_seen_only_waiting_keeps_the_group_of_its_waits() -> None:
    raw = f"{SUPERVISOR};{UPLOADER};thread (7): MainThread;RefQueue.take (ingestd/refqueue.py:150);wait (selectors.py:415) 9"
    out = p.attribute(p.parse_raw(raw), {(102, 7): 0.002}, {102: "uploader"}, {"uploader": 100})
    assert out["us_per_payload"][p.QUEUE] == pytest.approx(20)


def test_top_frames_of_a_group() -> None:
    top = p.top_frames(p.parse_raw(RAW), p.PUT)
    assert top == [("uuid4 (uuid.py)", 75)]
