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


def test_metrics_log_writes_tensorboard_scalars_without_tensorflow(tmp_path):
    import subprocess
    import sys

    code = ("import sys; from consistency_jax import train; log = train.MetricsLog(sys.argv[1]); "
            "log.write(3, {'loss': 1.5}); log.flush(); print('tensorflow' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stdout  # training process imports no TensorFlow
    import struct

    from tensorboard.compat.proto import event_pb2

    (path,) = tmp_path.glob("events.out.tfevents.*")
    data, events = path.read_bytes(), []
    while data:  # TFRecord framing: length, its crc, the record, its crc
        (n,) = struct.unpack("<Q", data[:8])
        events.append(event_pb2.Event.FromString(data[12:12 + n]))
        data = data[16 + n:]
    assert events[0].file_version == "brain.Event:2"
    scalars = [(e.step, v.tag, v.simple_value) for e in events for v in e.summary.value]
    assert scalars == [(3, "loss", 1.5)]
    assert '"loss": 1.5' in (tmp_path / "metrics.jsonl").read_text()
