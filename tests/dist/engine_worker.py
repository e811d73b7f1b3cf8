"""A test rank for the multi-process engine: started by the llamadist launcher (so it also
exercises the launcher), it loads one layout and runs several jobs through rank 0's
engine; rank 0 saves each job's tokens and the sampled rows' fp32 logits (recorded on
the ranks that sample) for the test to compare with one process.

    python tests/dist/engine_worker.py CONFIG.json      (as each of N ranks)

CONFIG: model, out, pp, tp, dp, cp, ep (optional: experts over ep ranks per stage; ep > tp
steps the replicas in lockstep), ep_dispatch (optional, RuntimeConfig's), layer_ranges,
max_seq_len, prompts, num_blocks, block_size, timeout (optional: the ranks' wait within a
step, 30 s), ahead (optional: rank 0's replica, of one rank, takes steps scheduled ahead
as on a GPU), jobs [{name, max_batch, params, num_blocks (optional: fewer forces
preemption), warmup, idle_s (optional: seconds idle after the warm-up)}].
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, for `tests`

import torch  # noqa: E402

from llamadist.config import RuntimeConfig  # noqa: E402
from llamadist.engine.engine import LLMEngine  # noqa: E402
from llamadist.engine.executor import RankExecutor  # noqa: E402
from llamadist.generation.sampling import SamplingParams  # noqa: E402
from llamadist.runtime.worker import RankSpec, Session, setup_worker_logging  # noqa: E402
from llamadist.weights.checkpoint import open_checkpoint  # noqa: E402


def run_job(session: Session, job: dict, cfg: dict, tok) -> list[list[int]]:
    """Rank 0: the job's prompts through a fresh engine over the loaded ranks."""
    g = session.groups
    runtime = RuntimeConfig(max_seq_len=cfg["max_seq_len"], max_batch=job["max_batch"],
                            max_batch_tokens=job.get("max_batch_tokens"))
    execs = [RankExecutor(session.rank_stage, k, ["cpu"]) for k in range(g.dp_size)]
    if cfg.get("ahead"):  # steps scheduled ahead, as a one-rank replica does on a GPU
        execs[0].ahead = True
    # a job's num_blocks below the ranks' cache: the scheduler must preempt
    engine = LLMEngine(execs, tok, runtime, job.get("num_blocks", cfg["num_blocks"]),
                       cfg["block_size"] * g.cp_size,  # under CP: cp blocks of each rank
                       lockstep=cfg.get("ep", 1) > g.tp_size)
    if job.get("warmup"):  # dummy decode steps of every bucket, sampling nothing
        engine.warmup(force=True)
        time.sleep(job.get("idle_s", 0))  # the ranks wait, told nothing is in flight
    params = SamplingParams(**job["params"])
    reqs = [engine.add_request(p, params, f"{job['name']}/{i}")
            for i, p in enumerate(cfg["prompts"])]
    while engine.has_unfinished:
        engine.step()
    return ([r.output_ids for r in reqs], engine.gauges()["preemptions"],
            sum(r.num_cached_prompt or 0 for r in reqs))


def main(config_path: str) -> None:
    cfg = json.loads(Path(config_path).read_text())
    torch.set_num_threads(1)
    session = Session.start(cfg["pp"], cfg.get("tp", 1), cfg.get("dp", 1),
                            timeout=cfg.get("timeout", 30.0), cp=cfg.get("cp", 1))
    setup_worker_logging(session.rank, False)
    ckpt = open_checkpoint(cfg["model"])
    tok = ckpt.tokenizer()
    rt = RuntimeConfig(max_seq_len=cfg["max_seq_len"], max_batch=len(cfg["prompts"]),
                       ep_dispatch=cfg.get("ep_dispatch", "auto"),
                       hot_experts=cfg.get("hot_experts", 0),
                       expert_load=cfg.get("expert_load"))
    spec = RankSpec(tuple(tuple(r) for r in cfg["layer_ranges"]), "float32", rt,
                    cfg["num_blocks"], cfg["block_size"], cfg.get("ep", 1),
                    tuple(tuple(s) for s in cfg.get("expert_shares", ())))
    ranks = session.load(ckpt, spec, record_logits=True)
    results = {}
    if session.is_driver:
        for job in cfg["jobs"]:
            results[job["name"]] = run_job(session, job, cfg, tok)
        RankExecutor(ranks, 0, ["cpu"]).close()
        for k in range(1, session.groups.dp_size):
            RankExecutor(ranks, k, ["cpu"]).close()
    else:
        ranks.serve()
    # per rank: steps run, and of them the ones with tokens (the rest: empty lockstep steps)
    # and, for a mixture-of-experts model, the experts whose weights each rank holds
    held = {i: sorted(int(e) for e in layer.block_sparse_moe.experts)
            for i, layer in ranks.stage.model.model.layers.items()
            if getattr(layer, "block_sparse_moe", None) is not None}
    gathered = session.gather((ranks.recorded, (ranks.stats.steps, ranks.stage.stats.calls),
                               held))
    everyone, steps, experts = zip(*gathered) if gathered else ((), (), ())
    if session.is_driver:
        for job in cfg["jobs"]:
            logits = {}
            for rec in everyone:
                logits.update({k: v for k, v in rec.items() if k[0].startswith(job["name"] + "/")})
            tokens, preemptions, cached = results[job["name"]]
            torch.save({"tokens": tokens, "logits": logits, "preemptions": preemptions,
                        "cached": cached, "rank_steps": steps,
                        "rank_experts": experts},
                       Path(cfg["out"]) / f"{job['name']}.pt")
    session.close()


if __name__ == "__main__":
    main(sys.argv[1])
