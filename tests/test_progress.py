"""Progress on stderr: heartbeat lines when stderr is not a terminal."""

import re

from engramlab.progress import progress_bar, progress_line


def test_heartbeat_lines_in_logs(monkeypatch, capsys):
    monkeypatch.setenv("ENGRAM_PROGRESS_SECONDS", "0")  # a line after every item
    losses = iter([3.0, 2.0, 1.0, 0.5])
    current = {"loss": None}

    def status():
        return f"loss {current['loss']}" if current["loss"] is not None else ""

    seen = []
    for item in progress_bar(range(4), "train", status=status):
        seen.append(item)
        current["loss"] = next(losses)
    assert seen == [0, 1, 2, 3]
    lines = capsys.readouterr().err.splitlines()
    # start, after items 1..3 (the last one is reported once, by the closing line), and the end
    assert [re.match(r"train: (\d)/4", line).group(1) for line in lines] == ["0", "1", "2", "3", "4"]
    assert lines[0] == "train: 0/4 (0%), 0:00:00 elapsed"
    assert lines[-1].startswith("train: 4/4 (100%), 0:00:00 elapsed, ETA 0:00:00") and lines[-1].endswith("loss 0.5")
    assert "loss 3.0" in lines[1]


def test_heartbeats_are_periodic_not_per_item(monkeypatch, capsys):
    monkeypatch.setenv("ENGRAM_PROGRESS_SECONDS", "3600")
    assert list(progress_bar(range(1000), "recall")) == list(range(1000))
    assert len(capsys.readouterr().err.splitlines()) == 2  # start and end only
    assert list(progress_bar(range(5), "recall", enabled=False)) == list(range(5))
    assert capsys.readouterr().err == ""


def test_eta_and_unknown_totals():
    assert progress_line("dkn", 30, 120, 60.0) == "dkn: 30/120 (25%), 0:01:00 elapsed, ETA 0:03:00"
    assert progress_line("sweep", 7, None, 3725.0, "run 7") == "sweep: 7, 1:02:05 elapsed, run 7"
