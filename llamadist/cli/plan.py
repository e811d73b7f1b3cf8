"""The planning commands: `analyze`, `plan` (a strategy's stages, the rank table of a
process grid, or the auto planner's layouts) and `convert`. The text builders return what
to print, so tests need no subprocess; the ``*_cmd`` functions take the parsed flags."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from llamadist.cli.args import grid_flags
from llamadist.config import ModelConfig, RuntimeConfig
from llamadist.distributed.grid import coords, grid_size
from llamadist.planning.devices import parse_devices
from llamadist.planning.plan import Plan, format_plan_table
from llamadist.planning.profile import (format_profile_table, native_profile, planned_head,
                                        profile)
from llamadist.planning.checks import check_ep, check_grid, plan_problems
from llamadist.planning.strategies import make_plan
from llamadist.planning.units import PlanningError, format_bytes

if TYPE_CHECKING:
    from llamadist.planning.experts import ExpertPlacement

log = logging.getLogger(__name__)


def analyze_command(config: ModelConfig, dtype: str = "bfloat16", seq_len: int | None = None,
                    as_json: bool = False, held: dict | None = None) -> str:
    """`llamadist analyze`: the per-layer profile of ``config``.

    dtype    weight dtype: bfloat16 | float16 | float32 (aliases bf16, fp16, fp32)
    seq_len  context for decode attention FLOPs and prefill length
             (None: RuntimeConfig's default, min(context, DEFAULT_MAX_SEQ_LEN))
    as_json  return ModelProfile JSON instead of the table
    held     a quantized checkpoint's tensors as --weights native holds them per device
             kind (cli.layout.held_weights): the table's weights as a CPU stage holds
             them (as stored), a line for a GPU stage's; the JSON's rows list both
             (``stored``)
    """
    from llamadist.planning.profile import quantized_profile
    prof = profile(config, dtype=dtype, seq_len=seq_len)
    if not held:
        return prof.to_json() if as_json else format_profile_table(prof)
    prof = native_profile(prof, held)
    if as_json:
        return prof.to_json()
    on = {kind: quantized_profile(prof, None, [kind]) for kind in ("cpu", "cuda")}
    return (format_profile_table(on["cpu"]) + "\nweights: as a --weights native run holds "
            f"them on a CPU stage (as stored; {format_bytes(prof.total_weight_bytes)} in "
            f"{prof.dtype}); on a GPU stage {format_bytes(on['cuda'].total_weight_bytes)} "
            f"(decoder linears as int8 / int4, the rest in {prof.dtype})")


def plan_command(config: ModelConfig, devices: str | None = None, max_memory: str | None = None,
                 device_speed: str | None = None, strategy: str | None = None,
                 boundaries: str | None = None, plan_file: str | None = None,
                 batch_size: int = 1, max_seq_len: int | None = None, dtype: str = "bfloat16",
                 as_json: bool = False, save: str | None = None, plot: str | None = None,
                 headroom: float | int = 0.1, tp: int = 1) -> str:
    """`llamadist plan`: one stage per device, printed as a table (or Plan JSON).

    devices        "cuda:0,cuda:1,cpu" (a device may repeat); None: every visible GPU, or cpu;
                   with plan_file and no devices, the plan file's devices are used
    max_memory     per-device budgets "20GiB,20GiB,64GiB" ("" / "auto" entries are
                   discovered: free memory, split evenly between repeats of one device)
    device_speed   per-device relative speeds "1,1,0.05" (1 = an H100); None: per-kind defaults
    strategy       uniform | memory | compute | mixed | custom; None: custom with
                   boundaries, else uniform when it fits, else mixed
    boundaries     custom only: "0:7,7:19,19:30" (half-open layer ranges)
    plan_file      custom only: take the boundaries from a saved plan JSON
    batch_size, max_seq_len   size the KV cache and the predicted decode step
    dtype          weight and KV dtype
    as_json        return the Plan JSON (messages go to logging so the output stays parseable)
    save           write the Plan JSON to this path
    plot           write a PNG of the plan to this path (needs matplotlib)
    headroom       per-device activation reserve: fraction of the budget if < 1, else bytes
    tp             each stage a tensor-parallel group of tp such devices (memory per shard)
    Devices need not be on this machine (absent ones need an explicit budget).
    """
    return plan_and_text(config, devices, max_memory, device_speed, strategy, boundaries,
                         plan_file, batch_size, max_seq_len, dtype, as_json, save, plot,
                         headroom, tp)[1]


def plan_and_text(config: ModelConfig, devices: str | None, max_memory: str | None,
                  device_speed: str | None, strategy: str | None, boundaries: str | None,
                  plan_file: str | None, batch_size: int, max_seq_len: int | None, dtype: str,
                  as_json: bool, save: str | None, plot: str | None, headroom: float | int,
                  tp: int, ep: int = 1, quantize: str | None = None,
                  fit_bits: bool = False, one_format: bool = False,
                  experts: "ExpertPlacement | None" = None,
                  held: dict | None = None, quantize_head: bool = False) -> tuple[Plan, str]:
    """plan_command's work: the Plan and the text to print (``quantize``: --quantize, each
    stage's weights counted in its format, and the bytes it saves per layer noted;
    ``fit_bits``: --fit-bits, the formats chosen by planning.bits.choose_bits, the same
    for every stage with ``one_format``: stages over processes; ``experts``: each EP
    rank's experts, planning.experts.ExpertPlacement, e.g. with hot-expert replicas;
    with ``ep`` > 1 every stage's experts per EP rank are printed; ``held``: a quantized
    checkpoint's tensors as --weights native holds them, cli.layout.held_weights;
    ``quantize_head``: --quantize-head, the last stage's head in its format too)."""
    from llamadist.config import quantize_for
    if plan_file is not None and devices is None:
        devices = ",".join(Plan.load(plan_file).devices)
    specs = parse_devices(devices, max_memory, device_speed)
    prof = profile(config, dtype=dtype, seq_len=max_seq_len)
    if held:
        prof = native_profile(prof, held)
    if plan_file is not None:
        if strategy not in (None, "custom", "uniform"):
            log.warning("--plan-file given: using strategy 'custom' instead of %r", strategy)
        strategy, boundaries = "custom", Path(plan_file)
    kw = dict(boundaries=boundaries, batch_size=batch_size, max_seq_len=max_seq_len,
              headroom=headroom, tp=tp, config=config, ep=ep, experts=experts)
    if fit_bits:
        from llamadist.planning.bits import bits_report, check_fit_bits, choose_bits
        check_fit_bits(quantize)
        prof = planned_head(prof, quantize_head, chosen_later=True)
        plan = choose_bits(prof, specs, strategy, one_format, **kw).plan
        notes = bits_report(plan, prof, specs)
    else:
        formats = [quantize_for(quantize, d.name) for d in specs]
        saved = [s.weight_format for s in Plan.load(plan_file).stages] if plan_file else []
        if quantize is None and any(saved) and len(saved) == len(specs):
            formats = saved   # a plan file's formats, costed again on these devices
        prof = planned_head(prof, quantize_head, formats, specs)
        plan = make_plan(prof, specs, strategy=strategy,
                         formats=formats if any(formats) else None, **kw)
        notes = format_notes(prof, specs, formats)
    notes = [f"error: {w}" for w in plan_problems(plan)] + notes + expert_notes(plan, prof,
                                                                                experts, tp,
                                                                                ep)
    if tp > 1:
        notes.insert(0, f"memory and time are per device of each stage's {tp}-way "
                        f"tensor-parallel group")
    if save:
        notes.append(f"saved plan to {plan.save(save)}")
    if plot:
        from llamadist.planning.plot import plot_plan  # lazy: matplotlib is optional
        notes.append(f"wrote plot to {plot_plan(plan, specs, plot)}")
    if as_json:
        for note in notes:
            if note.startswith("error"):
                log.warning(note)
            else:
                log.info(note)
        return plan, plan.to_json()
    return plan, "\n".join([format_plan_table(plan), *notes])


def expert_notes(plan: Plan, prof, experts: "ExpertPlacement | None", tp: int,
                 ep: int) -> list[str]:
    """A mixture-of-experts model over EP ranks (--ep, or tensor parallelism spreading
    the experts): each stage's experts per rank, hot replicas included, as the cost model
    counts them (the busiest rank's are in the stage's memory)."""
    from llamadist.planning.experts import ExpertPlacement, expert_rank_lines
    moe = [i for i, r in enumerate(prof.layers) if r.num_experts]
    if not moe:
        return []
    num = prof.layers[moe[0]].num_experts
    spread = max(ep, tp if tp <= num else 1)
    if spread <= 1:
        return []
    placement = experts or ExpertPlacement.build(num, spread)
    return expert_rank_lines(plan.boundaries, placement,
                             prof.layers[moe[0]].expert_bytes / num, moe)


def format_notes(prof, specs, formats: list[str | None]) -> list[str]:
    """One line per (format, device kind): a decoder layer's predicted bytes and the bytes
    the format saves against the profile's dtype (no accuracy claim: measure it with
    `llamadist perplexity`)."""
    from llamadist.planning.profile import layer_bytes
    row, out, seen = prof.layers[0], [], set()
    for spec, fmt in zip(specs, formats):
        if fmt is None or (fmt, spec.kind) in seen:
            continue
        seen.add((fmt, spec.kind))
        q = layer_bytes(row, fmt, spec.kind, prof.bytes_per_param)
        # against the weights as the run holds them unquantized (a GGUF: as stored)
        base = layer_bytes(row, None, spec.kind, prof.bytes_per_param)
        stored = "as --weights native holds it" if prof.has_stored else f"in {prof.dtype}"
        change = (f"{format_bytes(base - q)} saved" if base >= q else
                  f"{format_bytes(q - base)} more")
        out.append(f"weights {fmt} on {spec.kind}: {format_bytes(q)} per decoder layer "
                   f"instead of {format_bytes(base)} {stored} ({change} per layer, "
                   f"predicted)")
    return out


def model_config(model: str) -> ModelConfig:
    """A checkpoint's config, or a named shape's (planning needs no weights)."""
    from llamadist.config import NAMED_SHAPES, named_shape
    from llamadist.weights.checkpoint import open_checkpoint
    return named_shape(model) if model in NAMED_SHAPES else open_checkpoint(model).config


def analyze_cmd(args: argparse.Namespace) -> int:
    from llamadist.cli.layout import held_weights
    held = held_weights(args.model, getattr(args, "weights", None) or "native",
                        dtype=args.dtype)
    print(analyze_command(model_config(args.model), args.dtype, args.seq_len, args.json, held))
    return 0


def plan_dtype_devices(args: argparse.Namespace) -> str:
    """The devices a plan is for, as far as its default dtype goes: --devices; else the
    imagined GPUs of ``--auto --gpus N``; else a --plan file's devices; else every device
    here (the GPUs, or the CPU)."""
    if args.devices:
        return args.devices
    if getattr(args, "auto", False) and getattr(args, "gpus", None):
        return "cuda"
    if getattr(args, "plan", None):   # the plan file's own devices
        return ",".join(Plan.load(args.plan).devices)
    from llamadist.planning.devices import discover_devices
    return ",".join(d.name for d in discover_devices())


def check_output_paths(args: argparse.Namespace) -> None:
    """Refuse, before any planning, a --save / --plot path that cannot be written."""
    for flag, path in (("--save", args.save), ("--plot", args.plot)):
        if not path:
            continue
        out = Path(path)
        if out.is_dir():
            raise ValueError(f"{flag} {path} is a folder; give a file path, e.g. "
                             f"{out / ('plan.json' if flag == '--save' else 'plan.png')}")
        if not out.parent.is_dir():
            raise ValueError(f"{flag} {path}: the folder {out.parent} does not exist; "
                             f"create it or give another path")


def plan_cmd(args: argparse.Namespace) -> int:
    from llamadist.cli.layout import held_weights
    check_output_paths(args)
    config = model_config(args.model)
    runtime = RuntimeConfig(max_seq_len=args.max_seq_len, dtype=args.dtype,
                            weights=getattr(args, "weights", None) or "native")
    dtype = runtime.dtype_for(plan_dtype_devices(args))
    max_seq = runtime.seq_len_for(config.max_position_embeddings)
    held = held_weights(args.model, runtime.weights, dtype=dtype)  # as the run holds them
    if args.auto:
        return _auto_plan(args, config, dtype, max_seq, held)
    pp, tp, dp, ep = grid_flags(args)
    nproc, pp, _, _ = check_grid(config, None, pp, tp, dp)
    ep = check_ep(config, tp, dp, ep)
    from llamadist.cli.layout import check_rank_budgets, ep_ranks, ranked_placement
    # hot replicas and uneven shares (budgets per EP rank), counted per rank
    ranked = ep_ranks(args, config, pp, tp, ep)
    experts = ranked.placement
    if nproc > 1:
        from llamadist.planning.layout import stage_devices
        devices = ",".join(stage_devices(ranked.devices, pp))
    else:
        # devices None with --plan: the plan file's own devices
        devices = args.devices or (None if args.plan else plan_dtype_devices(args))
    from llamadist.planning.experts import replicas_refusal

    def planned(experts, save, plot):
        try:
            return plan_and_text(config, devices, ranked.max_memory, args.device_speed,
                                 args.strategy, args.boundaries, args.plan, args.batch_size,
                                 max_seq, dtype, args.json, save, plot, 0.1, tp,
                                 ep, quantize=args.quantize,
                                 quantize_head=getattr(args, "quantize_head", False),
                                 fit_bits=getattr(args, "fit_bits", False),
                                 one_format=nproc > 1, experts=experts, held=held)
        except PlanningError as e:   # memory / mixed / --fit-bits: no split fits
            raise replicas_refusal(e, experts, config.num_layers) from None
    if ranked.budgets is not None:   # budgets per EP rank: shares by the room for experts
        first, _ = planned(experts, None, None)
        experts = ranked_placement(args, config, ranked, first, ep, tp, dtype, max_seq)
    plan, text = planned(experts, args.save, args.plot)
    if ranked.budgets is not None:   # every EP rank against its own --max-memory
        from llamadist.planning.experts import ExpertPlacement
        check_rank_budgets(plan, config, experts or ExpertPlacement.build(
            config.num_experts, ep, tp=tp), ranked.budgets, dtype, max_seq)
    if nproc > 1 and not args.json:
        text += "\n\n" + format_rank_table([(s.start, s.end) for s in plan.stages],
                                            list(plan.devices), pp, tp, dp)
        if ep > 1:
            even = config.num_experts % ep == 0 and experts is None
            text += (f"\nexperts: each stage's spread over {ep} ranks "
                     + (f"(1/{ep} each)" if even else "(each rank's above)")
                     + (", its data-parallel replicas stepping together" if ep > tp else ""))
    print(text)
    over = plan_problems(plan)
    if over:  # the table above shows it; the exit code tells scripts
        hint = ("" if getattr(args, "fit_bits", False) or args.quantize else
                "; --fit-bits chooses weight formats (int8, int4) that make it fit")
        raise replicas_refusal(PlanningError(f"the plan does not fit: {over[0]}{hint}"),
                               experts, config.num_layers)
    return 0


def _auto_plan(args: argparse.Namespace, config: ModelConfig, dtype: str, max_seq: int,
               held: dict | None = None) -> int:
    from llamadist.cli.layout import (refuse_chosen_flags_with_auto,
                                      refuse_expert_flags_with_auto)
    from llamadist.planning.auto import auto_plan, format_auto_plans
    refuse_expert_flags_with_auto(args)
    refuse_chosen_flags_with_auto(args)
    prof = profile(config, dtype=dtype, seq_len=max_seq)
    if held:
        prof = native_profile(prof, held)
    devices = None if args.gpus else parse_devices(args.devices, args.max_memory,
                                                   args.device_speed, check_available=False)
    kw = dict(gpus=args.gpus, nodes=args.nodes,
              gpu_memory=args.gpu_memory, intra_link=args.intra_link,
              inter_link=args.inter_link, intra_bw=args.intra_bw, inter_bw=args.inter_bw,
              intra_latency_s=args.intra_latency, inter_latency_s=args.inter_latency,
              objective=args.objective, batch_size=args.batch_size, max_seq_len=max_seq,
              config=config)
    fmt, note = None, ""
    if getattr(args, "fit_bits", False):
        from llamadist.planning.bits import auto_bits_note, auto_fit_bits, check_fit_bits
        check_fit_bits(args.quantize, auto=True)
        kinds = sorted({d.kind for d in devices}) if devices else ["cuda"]
        fmt, cands = auto_fit_bits(prof, devices, kinds,
                                   getattr(args, "quantize_head", False), **kw)
        note = auto_bits_note(prof, fmt, kinds)
    else:
        from llamadist.planning.bits import auto_profile
        kinds = sorted({d.kind for d in devices}) if devices else ["cuda"]
        prof, fmt = auto_profile(prof, args.quantize, kinds,
                                 getattr(args, "quantize_head", False))
        try:
            cands = auto_plan(prof, devices, **kw)
        except PlanningError as e:
            # a hint for memory only (not a device count that the nodes cannot share)
            fits = "fits on no layout" in str(e)
            hint = "" if args.quantize or not fits else (
                "; --fit-bits finds the weight format (int8, int4) with which a layout fits")
            raise PlanningError(f"{e}{hint}") from None
    if args.json:
        print(json.dumps([dict(c.to_dict(), weight_format=fmt) for c in cands], indent=2))
    else:
        print(format_auto_plans(cands) + note)
    if args.save:
        cands[0].to_plan(prof.model, config.num_layers, prof.dtype, fmt).save(args.save)
        best = cands[0]
        cp = f" --cp {best.cp}" if best.cp > 1 else ""
        print(f"saved the winning layout's stages to {args.save}; run them with --tp {best.tp}"
              f"{cp} --pp {best.pp} --dp {best.dp} --plan {args.save}", file=sys.stderr)
    return 0


def format_rank_table(stages: list[tuple[int, int]], devices: list[str], pp: int, tp: int,
                      dp: int) -> str:
    """Which global rank runs which stage (``stages``: half-open layer ranges)."""
    nproc, pp = grid_size(None, pp, tp, dp)
    if len(stages) != pp:
        raise ValueError(f"{len(stages)} stages planned for pp={pp}")
    lines = [f"ranks: {nproc} processes = dp {dp} x pp {pp} x tp {tp} (tp innermost)",
             f"{'rank':>5} {'dp':>3} {'pp':>3} {'tp':>3}  {'layers':>10}  {'holds':<11} device"]
    for rank in range(nproc):
        d, p, t = coords(rank, pp, tp, dp)
        start, stop = stages[p]
        extra = "+".join(x for x, on in (("embed", p == 0), ("head", p == pp - 1)) if on) or "-"
        dev = "cuda:LOCAL_RANK" if devices[p].startswith("cuda") else devices[p]
        lines.append(f"{rank:>5} {d:>3} {p:>3} {t:>3}  {f'[{start}, {stop})':>10}  "
                     f"{extra:<11} {dev}" + (f" (1/{tp} shard)" if tp > 1 else ""))
    return "\n".join(lines)


def convert_cmd(args: argparse.Namespace) -> int:
    from llamadist.weights.checkpoint import resolve_model_path
    from llamadist.weights.gguf import convert_gguf_to_hf
    src = Path(resolve_model_path(args.gguf))
    if src.is_dir() or src.suffix != ".gguf":
        raise ValueError(f"convert reads a .gguf file, got {args.gguf}; a Hugging Face folder "
                         f"needs no conversion (pass it to any command as it is)")
    out = Path(args.out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} exists and is not a folder; give a new or empty folder to "
                         f"write the Hugging Face checkpoint into")
    # a bar only for a person watching: a log file would get every redraw
    print(f"wrote {convert_gguf_to_hf(src, out, dtype=args.dtype, progress=sys.stderr.isatty())}")
    return 0
