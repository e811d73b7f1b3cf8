"""runtime.work_timer: a timed run reads its stage times from events without waiting for
the device inside the step loop. On the CPU the queued (CUDA) side runs on fake events and
streams over a simulated device clock; tests/gpu/test_timed_bench_gpu.py runs real ones."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import pytest
import torch

from llamadist.runtime.work_timer import WorkTimer

GPU = torch.device("cuda", 0)
GPU1 = torch.device("cuda", 1)
CPU = torch.device("cpu")


class FakeDevice:
    """A device whose clock the test sets: ``now`` is when work is enqueued, ``done``
    how far the device has got (an event is complete once done >= its time)."""

    def __init__(self):
        self.now, self.done, self.waits, self.created = 0.0, 0.0, 0, 0
        self.log: list[str] = []  # "record" / "wait" in the order they happened

    def event(self):
        self.created += 1
        return FakeEvent(self)

    def stream(self, device):
        return FakeStream(self, device)


@dataclass
class FakeStream:
    dev: FakeDevice
    device: torch.device

    def wait_stream(self, other: "FakeStream") -> None:
        self.dev.log.append(f"wait {self.device} on {other.device}")


class FakeEvent:
    def __init__(self, dev: FakeDevice):
        self.dev, self.t, self.device = dev, None, None

    def record(self, stream: FakeStream) -> None:
        if self.device is not None:
            assert self.device == stream.device, "an event is reused on its own device only"
        self.t, self.device = self.dev.now, stream.device
        self.dev.log.append("record")

    def query(self) -> bool:
        return self.dev.done >= self.t

    def synchronize(self) -> None:
        self.dev.waits += 1
        self.dev.log.append("wait")
        self.dev.done = max(self.dev.done, self.t)

    def elapsed_time(self, end: "FakeEvent") -> float:
        assert self.query() and end.query(), "elapsed_time of an event not completed"
        return (end.t - self.t) * 1e3  # ms


@dataclass
class Stats:
    compute_s: float = 0.0
    transfer_s: float = 0.0


def timer(dev: FakeDevice, max_pending: int = 64) -> WorkTimer:
    return WorkTimer(max_pending, event=dev.event, stream=dev.stream)


def bracket(t: WorkTimer, dev: FakeDevice, stats, begin: float, end: float,
            device: torch.device = GPU, field: str = "compute_s") -> None:
    dev.now = begin
    mark = t.start(device)
    dev.now = end
    t.stop(mark, device, stats, field)


def test_cpu_work_is_added_at_once_by_the_host_clock():
    dev, st = FakeDevice(), Stats()
    t = timer(dev)
    mark = t.start(CPU)
    time.sleep(0.01)
    t.stop(mark, CPU, st, "compute_s")
    assert st.compute_s >= 0.01 and dev.created == 0 and t.pending == 0


def test_cuda_work_is_added_once_the_device_passed_it_never_waiting():
    dev, st = FakeDevice(), Stats()
    t = timer(dev)
    bracket(t, dev, st, 1.0, 1.5)
    bracket(t, dev, st, 2.0, 2.25)
    assert st.compute_s == 0.0 and t.pending == 2  # the device is still at 0
    dev.done = 1.6  # the first bracket is done, the second not
    t.settle()
    assert st.compute_s == pytest.approx(0.5) and t.pending == 1
    dev.done = 3.0
    bracket(t, dev, st, 3.0, 3.125)  # a later stop reads what the device has finished
    assert st.compute_s == pytest.approx(0.75) and t.pending == 1
    assert dev.waits == 0


def test_settle_wait_reads_everything_at_the_end():
    dev, st = FakeDevice(), Stats()
    t = timer(dev)
    for i in range(5):
        bracket(t, dev, st, float(i), i + 0.5)
    assert dev.waits == 0 and st.compute_s == 0.0
    t.settle(wait=True)
    assert st.compute_s == pytest.approx(2.5) and t.pending == 0 and dev.waits == 5


def test_pending_windows_are_bounded_and_events_reused():
    dev, st = FakeDevice(), Stats()
    t = timer(dev, max_pending=4)
    for i in range(10):  # the device never catches up by itself
        bracket(t, dev, st, float(i), i + 0.25)
        assert t.pending <= 4
    assert dev.waits == 6  # only the brackets past the bound were waited for
    assert st.compute_s == pytest.approx(6 * 0.25)
    # read events go back to the pool: 10 brackets, at most 4 + 1 pending pairs made
    assert dev.created <= 2 * 5
    dev.done = 99.0  # the device caught up; from here it keeps up: each stop reads the
    for i in range(10):  # brackets before it
        bracket(t, dev, st, 100.0 + i, 100.5 + i)
        dev.done = 100.5 + i
        assert t.pending <= 4
    assert dev.created <= 2 * 5 and dev.waits == 6
    t.settle()
    assert t.pending == 0 and st.compute_s == pytest.approx(6 * 0.25 + 4 * 0.25 + 10 * 0.5)


def test_windows_add_to_the_counters_they_started_under():
    """A stats reset (a new counters object) while work is in flight: the old work goes to
    the old counters, the new run's counters start at zero."""
    dev, old, new = FakeDevice(), Stats(), Stats()
    t = timer(dev)
    bracket(t, dev, old, 0.0, 1.0)
    bracket(t, dev, new, 1.0, 1.5, field="transfer_s")
    t.settle(wait=True)
    assert (old.compute_s, new.compute_s, new.transfer_s) == (1.0, 0.0, 0.5)


def test_a_window_starts_after_its_input_from_another_device():
    dev, st = FakeDevice(), Stats()
    t = timer(dev)
    t.stop(t.start(GPU1, after=GPU), GPU1, st, "transfer_s")
    t.stop(t.start(GPU1, after=CPU), GPU1, st, "transfer_s")
    t.stop(t.start(GPU1, after=GPU1), GPU1, st, "compute_s")
    assert [e for e in dev.log if e.startswith("wait")] == ["wait cuda:1 on cuda:0"]


# ---- through the engine: a timed bench on CPU stages, timed as if they were queued -------
class QueuedTimer(WorkTimer):
    """Every device timed with (fake) events whose times are the host clock: the CPU
    work is done when it returns, so the windows are real; the device never reports them
    done by itself (query False), so any read before the end would have to wait."""

    dev = FakeDevice()

    def __init__(self):
        super().__init__(max_pending=100_000, event=self._event_now, stream=self.dev.stream,
                         queued=lambda device: True)

    def _event_now(self):
        ev = self.dev.event()
        record = ev.record

        def record_now(stream):
            self.dev.now = time.perf_counter()
            record(stream)
        ev.record = record_now
        return ev


def test_timed_bench_waits_for_the_stage_times_only_after_its_last_step(tiny_model, capsys,
                                                                       monkeypatch):
    from llamadist.cli import main
    QueuedTimer.dev = dev = FakeDevice()
    dev.done = float("-inf")
    monkeypatch.setattr("llamadist.runtime.stage.WorkTimer", QueuedTimer)
    assert main(["bench", str(tiny_model), "--batch", "2", "--prompt-len", "16", "--gen-len",
                 "6", "--devices", "cpu,cpu", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    records = [i for i, e in enumerate(dev.log) if e == "record"]
    waits = [i for i, e in enumerate(dev.log) if e == "wait"]
    # every stage's prefill and decode steps were bracketed (2 stages, 6 tokens each)...
    assert len(records) >= 2 * 2 * 6
    # ...and nothing was waited for until the last step had been recorded
    assert waits and min(waits) > max(records)
    assert [s["calls"] for s in rep["stages"]] == [6, 6]
    for s in rep["stages"]:
        assert 0 < s["compute_s"] <= rep["wall_s"] and 0 < s["busy"] <= 1
