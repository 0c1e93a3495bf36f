"""The progress line's rate and ETA leave out the window's first step (the compile)."""

import time

from consistency_jax import train


class _Log:
    def __init__(self):
        self.lines = []

    def write(self, step, values):
        self.lines.append((step, values))


def test_rate_leaves_out_untimed_steps():
    log = _Log()
    window = [{"loss": 1.0}] * 5
    start = time.time() - 2.0  # 4 timed steps in ~2 s after the compile step
    train._log_window(log, 5, 100, window, start, untimed=1)
    rate = log.lines[0][1]["steps_per_sec"]
    assert 1.5 < rate < 2.05, rate
    train._log_window(log, 1, 100, [{"loss": 1.0}], time.time(), untimed=1)  # nothing timed yet: no rate
    assert log.lines[1][1]["steps_per_sec"] == 0.0
