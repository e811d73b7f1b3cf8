"""`--on-failure replan`: the layout planned again without the lost stage's device, with
the run's own planner and checks: one stage fewer over every layer, or a refusal that says
the model no longer fits."""

import pytest

from llamadist.cli.jobs import generate_job
from llamadist.cli.main import build_parser
from llamadist.cli.replan import replan
from llamadist.planning.units import PlanningError
from llamadist.weights.checkpoint import open_checkpoint


def job_of(model, *flags):
    args = build_parser().parse_args(["generate", str(model), "--prompt", "hi", "--nproc", "3",
                                      "--pp", "3", "--devices", "cpu", "--max-seq-len", "64",
                                      "--dtype", "float32", "--on-failure", "replan", "--max-new-tokens",
                                      "8", *flags])
    ckpt = open_checkpoint(args.model)
    return args, ckpt.config, generate_job(args, ckpt, ckpt.tokenizer())


def test_replan_drops_one_stage_and_keeps_every_layer(tiny_model):
    args, config, job = job_of(tiny_model)
    new = replan(job, args, config, 1).layout
    assert (new.pp, new.processes, new.devices) == (2, 2, ("cpu", "cpu"))
    assert [i for r in new.layer_ranges for i in r] == list(range(config.num_layers))
    assert new.to_json() != job.layout.to_json() and job.layout.pp == 3
    with pytest.raises(PlanningError, match="no device is left"):
        one = replan(replan(job, args, config, 0), args, config, 0)
        replan(one, args, config, 0)


def test_replan_refuses_when_the_model_no_longer_fits(tiny_model):
    args, config, job = job_of(tiny_model)
    need = max(s.memory_bytes for s in job.layout.plan.stages)
    budget = int(need * 1.2)  # three stages fit; two hold half the layers each: not
    args, config, job = job_of(tiny_model, "--max-memory", ",".join([str(budget)] * 3))
    with pytest.raises(PlanningError, match="no longer fits the 2 device"):
        replan(job, args, config, 2)
