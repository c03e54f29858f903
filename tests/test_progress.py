"""Progress reports of the long commands (extract, features, linear/fine-tune epochs) outside a terminal."""
from __future__ import annotations

import logging

from swav.metrics import format_duration, progress_bar


def test_without_a_terminal_progress_is_log_lines_with_rate_and_time_left(caplog):
    # pytest captures stderr, so it is not a terminal here: log lines, no tqdm redraws
    with caplog.at_level(logging.INFO, logger="swav.metrics"):
        with progress_bar(total=100, initial=20, unit="img", desc="extract", interval_s=0.0) as bar:
            bar.update(30)
            bar.set_postfix(loss="0.123")
            bar.update(50)
    lines = [r.getMessage() for r in caplog.records if r.name == "swav.metrics"]
    assert len(lines) == 3  # two updates (interval 0) and the closing line
    assert lines[0].startswith("extract: 50/100 img (50%), ") and "img/s" in lines[0] and "left" in lines[0]
    assert lines[1].startswith("extract: 100/100 img (100%), ") and lines[1].endswith("0s left; loss 0.123")
    assert "\r" not in "".join(lines)


def test_log_progress_is_quiet_between_intervals_and_when_disabled(caplog):
    with caplog.at_level(logging.INFO, logger="swav.metrics"):
        with progress_bar(total=10, unit="img", desc="features", interval_s=3600) as bar:
            for _ in range(10):
                bar.update(1)
        with progress_bar(total=10, unit="img", desc="off", enabled=False) as bar:
            bar.update(10)
        with progress_bar(total=None, unit="img", desc="unknown", interval_s=3600) as bar:
            bar.update(7)
    lines = [r.getMessage() for r in caplog.records if r.name == "swav.metrics"]
    assert len(lines) == 2 and lines[0].startswith("features: 10/10 img (100%)")  # only the closing line
    assert lines[1].startswith("unknown: 7 img, ") and lines[1].endswith("? left")  # no total: no time left
    assert format_duration(float("nan")) == "?"


def test_without_logging_set_up_progress_lines_go_to_stderr(capsys, monkeypatch):
    # a script calling swav with progress=True and its output in a file: nothing handles the logger, so the
    # lines are printed rather than lost
    import swav.metrics as metrics

    class NoHandlers(logging.Logger):
        def hasHandlers(self):  # noqa: N802 - the logging API's name
            return False

    monkeypatch.setattr(metrics, "logger", NoHandlers("swav.metrics.test"))
    with progress_bar(total=4, unit="img", desc="features", interval_s=0.0) as bar:
        bar.update(4)
    err = capsys.readouterr().err
    assert "features: 4/4 img (100%)" in err and err.count("\n") == 2
