"""Where Ray's output goes (data_sharding.ray_init): library loggers and worker lines to a log file,
only the job's own lines to the terminal.  No Ray is started."""
from __future__ import annotations

import logging
import warnings

from data_sharding import ray_init


def test_loggers_and_warnings_go_to_the_file_and_nest(tmp_path, capsys):
    outer, inner = tmp_path / "demo.log", tmp_path / "train.log"
    log = logging.getLogger("ray.some.module")
    with ray_init.loggers_to_file(outer, ("ray",)):
        log.warning("token auth notice")
        with ray_init.loggers_to_file(inner, ("ray",)):
            log.warning("started a local Ray")
            warnings.warn("accelerator chatter")
        warnings.warn("schema hint")
    assert "token auth notice" in outer.read_text() and "schema hint" in outer.read_text()
    assert "started a local Ray" not in outer.read_text()
    assert "started a local Ray" in inner.read_text() and "accelerator chatter" in inner.read_text()
    captured = capsys.readouterr()
    assert "token auth" not in captured.err + captured.out and "schema hint" not in captured.err + captured.out
    assert logging.getLogger("ray").handlers != [] or logging.getLogger("ray").propagate  # restored


def test_worker_lines_go_to_the_log_and_only_chosen_ones_to_the_terminal(capsys):
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    written: list[str] = []
    before = list(dispatcher.handlers)
    with ray_init.worker_lines_to(written.append, show=lambda line: line.startswith("[dipro train")):
        dispatcher.emit({"pid": 42, "actor_name": "RayTrainWorker", "is_err": False,
                         "lines": ["[dipro train rank 0] epoch 0 done", "Checkpoint successfully created"]})
        dispatcher.emit({"pid": 7, "actor_name": "PlacementGroupCleaner", "is_err": True,
                         "lines": ["Failed to query Ray Train Controller actor state."]})
    assert written == ["(RayTrainWorker pid=42) [dipro train rank 0] epoch 0 done",
                       "(RayTrainWorker pid=42) Checkpoint successfully created",
                       "(PlacementGroupCleaner pid=7, stderr) Failed to query Ray Train Controller actor state."]
    assert capsys.readouterr().out == "[dipro train rank 0] epoch 0 done\n"
    assert dispatcher.handlers == before  # nothing left behind (Ray is not running: no printer re-added)
