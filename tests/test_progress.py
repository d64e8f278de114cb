"""Progress lines: counts, rate, ETA and the throttle, on a fake clock."""
import io

from pipeline.progress import ProgressLine, fmt_seconds


def test_progress_lines_rate_eta_and_throttle():
    now = [0.0]
    out = io.StringIO()
    bar = ProgressLine("train arm", 10, "steps", every_s=5.0, stream=out, clock=lambda: now[0])
    now[0] = 2.0
    bar.update(1, loss=0.5)            # 2 s since the start: under the 5 s throttle, silent
    now[0] = 8.0
    bar.update(3, loss=0.25)           # 4 steps in 8 s = 0.5/s; 6 left = 12 s
    now[0] = 9.0
    bar.update(1)                      # throttled
    now[0] = 20.0
    bar.update(5)                      # the last step always prints
    assert out.getvalue().splitlines() == [
        "train arm: 4/10 steps (40 %), 0.50 steps/s, ETA 12s, loss 0.25",
        "train arm: 10/10 steps (100 %), done in 20s",
    ]


def test_skipped_work_counts_but_not_in_the_rate():
    now = [0.0]
    out = io.StringIO()
    bar = ProgressLine("stage s", 100, "rows", every_s=0.0, stream=out, clock=lambda: now[0])
    bar.skip(60)                       # a resumed stage's finished shards
    now[0] = 10.0
    bar.update(10)                     # 1 row/s of new work; 30 left
    assert out.getvalue() == "stage s: 70/100 rows (70 %), 1.00 rows/s, ETA 30s\n"


def test_fmt_seconds():
    assert [fmt_seconds(s) for s in (0, 59.6, 61, 3599, 3600 + 125)] == ["0s", "1m00s", "1m01s", "59m59s", "1h02m"]
