"""/metrics' per-stage families from the statistics a stage reports: in one process a
stage counts its forward "calls" (one per engine step), a worker "steps"; both become
llamadist_stage_steps_total, as the README says (in one process it was missing)."""

from llamadist.serve.metrics import stage_metrics

ONE_PROCESS = {"stage": 0, "layers": [0, 5], "device": "cpu", "compute_s": 0.5, "calls": 3}
WORKER = {"stage": 1, "layers": [5, 9], "device": "cpu", "compute_s": 0.25, "steps": 7,
          "rank": 1, "dp": 0, "busy": 0.5}


def samples(stages):
    return {(f.name, s.labels["stage"]): s.value
            for f in stage_metrics(stages) for s in f.samples}


def test_steps_come_from_calls_in_one_process_and_steps_on_a_worker():
    got = samples([ONE_PROCESS])
    assert got[("llamadist_stage_steps", "0")] == 3
    assert got[("llamadist_stage_busy_seconds", "0")] == 0.5
    got = samples([ONE_PROCESS, WORKER])
    assert got[("llamadist_stage_steps", "1")] == 7
    assert got[("llamadist_stage_busy_fraction", "1")] == 0.5
    assert ("llamadist_stage_busy_fraction", "0") not in got   # only where reported


def test_a_worker_reporting_both_counts_its_steps():
    assert samples([dict(WORKER, calls=99)])[("llamadist_stage_steps", "1")] == 7
