"""A test rank for the process pipeline: started by the llamadist launcher (so it also
exercises the launcher), it runs several requests through one loaded pipeline and rank 0
saves tokens and the last stage's logits for the test to compare with the Engine.

    python tests/dist/pipeline_worker.py CONFIG.json      (as each of N ranks)

CONFIG: model, out, pp, tp, dp, layer_ranges, max_seq_len, prompts, jobs [{name,
micro_batches, params}].
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, for `tests`

import torch  # noqa: E402

from llamadist.runtime.worker import Session, setup_worker_logging  # noqa: E402
from llamadist.generation.sampling import SamplingParams  # noqa: E402
from llamadist.runtime.pipeline import PipelineSpec, Request  # noqa: E402
from llamadist.weights.checkpoint import open_checkpoint  # noqa: E402


def main(config_path: str) -> None:
    cfg = json.loads(Path(config_path).read_text())
    torch.set_num_threads(1)
    session = Session.start(cfg["pp"], cfg.get("tp", 1), cfg.get("dp", 1), timeout=30.0)
    setup_worker_logging(session.rank, False)
    ckpt = open_checkpoint(cfg["model"])
    tok = ckpt.tokenizer()
    prompts = cfg["prompts"]
    most = max(j["micro_batches"] for j in cfg["jobs"])
    spec = PipelineSpec([tuple(r) for r in cfg["layer_ranges"]], "float32",
                        -(-len(prompts) // cfg.get("dp", 1)), cfg["max_seq_len"], most,
                        lane_rows=len(prompts))
    runner = session.load(ckpt, spec, tok)
    for job in cfg["jobs"]:
        req = Request(prompts, SamplingParams(**job["params"]), job["micro_batches"],
                      record_logits=True)
        for _ in runner.run(req):
            pass
        first = session.groups.pp.is_first and session.groups.tp_index == 0
        mine = {"dp": session.groups.dp_index,
                "tokens": [s.token_ids for s in runner.sequences] if first else None,
                "logits": runner.logits if runner.stage.has_head else None}
        everyone = session.gather(mine)
        if session.is_driver:
            tokens = [t for r in sorted(everyone, key=lambda r: r["dp"]) if r["tokens"] is not None
                      for t in r["tokens"]]
            logits = {}
            for r in everyone:
                logits.update(r["logits"] or {})
            torch.save({"tokens": tokens, "logits": logits}, Path(cfg["out"]) / f"{job['name']}.pt")
    session.close()


if __name__ == "__main__":
    main(sys.argv[1])
