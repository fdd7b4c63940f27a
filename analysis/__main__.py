"""Command line of the analysis package: `python -m analysis <command> ...`.

    decode   the decode-time model of report section 3: a 22-layer Llama vs the section 6.7 hybrid
             on G devices, with the report's printed figures beside ours
    decode-measure  measured decode on real processes (CPU: gloo, GPU: NCCL): Llama vs an equal-parameter
             hybrid at G = 1, 2..., beside eq. 9/10 calibrated with the measured t_sync; the
             delayed-communication curve (analysis/decode_measure.py)
    samples  text decoded from the checkpoints of a sweep's runs (analysis/samples.py)
    decode-fill  measured decode time (ms per token, batch 1) of a sweep's finished runs, from their
             checkpoints, logged into their MLflow runs as metrics (analysis/decode_fill.py)
    report   a sweep's figures (PNG) and summary.md from MLflow, into reports/<sweep>/

Each command is a function `add_<command>(subparsers)` that registers its arguments and sets
`run`, a function of the parsed arguments returning the exit code.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from analysis import decode
from analysis.devices import DEVICES, get_device

# --- decode ---


def _check_figure(path: str) -> None:
    """The folder of --figure exists: checked before any work (the figure is written last)."""
    folder = Path(path).expanduser().parent
    if not folder.is_dir():
        what = "is a file, not a folder" if folder.exists() else "does not exist"
        raise ValueError(f"--figure={path!r}: its folder {str(folder)!r} {what}")


def add_decode(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("decode", help="decode-time model (report section 3): Llama vs hybrid",
                              description=decode.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = decode.SECTION_6_7  # the report's section 6.7 inputs are the defaults
    p.add_argument("--device", default=d["device"], help=f"one of {', '.join(DEVICES)} (default {d['device']})")
    p.add_argument("--gpus", type=int, default=d["gpus"], help=f"tensor-parallel devices G (default {d['gpus']})")
    p.add_argument("--model-bytes", type=float, default=d["model_bytes"],
                   help=f"bytes read per decode step, weights + KV cache (default {d['model_bytes']:g}, report 6.7)")
    p.add_argument("--llama-layers", type=int, default=d["llama_layers"],
                   help=f"layers of the Llama (2 syncs each; default {d['llama_layers']})")
    p.add_argument("--hybrid-syncs", type=int, default=d["hybrid_syncs"],
                   help=f"syncs of the hybrid, tp_blocks x (1 + 2 x n_classic_layers) (default {d['hybrid_syncs']})")
    p.add_argument("--batch", type=int, default=d["batch"])
    p.add_argument("--bandwidth", type=float, default=None, help="override the memory bandwidth, bytes/s")
    p.add_argument("--t-sync", type=float, default=None, help="override t_sync, seconds (default 5e-6)")
    p.add_argument("--examples", action="store_true",
                   help="also print every worked example of sections 3.4, 4.2 and 6.7, ours vs the report's")
    p.add_argument("--figure", default=None, metavar="PNG", help="also write figure 7 to this PNG file")
    p.set_defaults(run=run_decode)


def _comparison(args: argparse.Namespace) -> list[str]:
    device = get_device(args.device, mem_bw_bytes_per_s=args.bandwidth, t_sync_s=args.t_sync)
    runs = decode.section_6_7(device, args.gpus, args.model_bytes, args.llama_layers, args.hybrid_syncs, args.batch)
    given = dict(device=device.name, gpus=args.gpus, model_bytes=args.model_bytes, llama_layers=args.llama_layers,
                 hybrid_syncs=args.hybrid_syncs, batch=args.batch)
    as_report = given == decode.SECTION_6_7 and device == get_device(decode.SECTION_6_7["device"])
    base = runs["llama"].step_s
    lines = [
        f"Decode step on {args.gpus} x {device.name} ({device.mem_bw_bytes_per_s / 1e12:.2f} TB/s, "
        f"t_sync {device.t_sync_s * 1e6:g} us), {args.model_bytes / 1e9:.3g} GB read per step, batch {args.batch}",
        f"{'model':<26}{'syncs':>6}{'reads us':>10}{'syncs us':>10}{'step us':>10}{'tokens/s':>11}{'speed-up':>10}"
        + ("   | report: step us  tokens/s  speed-up" if as_report else ""),
    ]
    for key, run in runs.items():
        row = (f"{run.name:<26}{run.syncs:>6}{run.read_s * 1e6:>10.2f}{run.sync_s * 1e6:>10.2f}"
               f"{run.step_s * 1e6:>10.2f}{run.tokens_per_s:>11.1f}{base / run.step_s:>9.2f}x")
        if as_report:
            printed = decode.SECTION_6_7_PRINTED[key]
            step, tokens, gain = (f"{printed[k]:g}" if k in printed else "-" for k in ("step_us", "tokens_per_s",
                                                                                    "speedup"))
            row += f"   | {step:>15}{tokens:>10}{gain:>10}"
        lines.append(row)
    if as_report:
        hybrid = runs["hybrid"]
        lines += [
            "Where ours and the report's differ (section 6.7):",
            f"  - the report's hybrid step (70 us, 14181 tokens/s) is the read time alone "
            f"({hybrid.read_s * 1e6:.2f} us): it leaves out the hybrid's own 3 syncs "
            f"({hybrid.sync_s * 1e6:.0f} us) that eq. 10 counts;",
            f"  - so its speed-up is {base / hybrid.read_s:.2f}x, printed as 4.2x; with the syncs eq. 10 gives "
            f"{base / hybrid.step_s:.2f}x, and the best case of eq. 11 (1 sync) {base / runs['best'].step_s:.2f}x.",
        ]
    else:
        lines.append("(report column shown only for the section 6.7 inputs: H100 at 3.9 TB/s, 8 GPUs, 2.2e9 bytes, "
                     "22 layers, 3 syncs, batch 1, t_sync 5 us)")
    if args.gpus > 1:
        threshold = decode.tp_threshold_bytes(device, args.gpus)
        lines.append(f"Eq. 8: tensor parallelism on {args.gpus} devices pays off per synchronised operation "
                     f"only above {threshold / 1e6:.1f} MB read between two syncs.")
    return lines


def _fmt(value: float) -> str:
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.2f}" if abs(value) >= 10 else f"{value:.4g}"


def _examples() -> list[str]:
    lines = ["", "Worked examples of the report, recomputed from their stated inputs:",
             f"{'section':<9}{'quantity':<52}{'ours':>12}{'report':>10}  unit"]
    for ex in decode.report_examples():
        report = "-" if ex.report is None else f"{ex.report:g}"
        lines.append(f"{ex.section:<9}{ex.quantity:<52}{_fmt(ex.ours):>12}{report:>10}  {ex.unit}")
        if ex.note:
            lines.append(f"{'':<11}note: {ex.note}")
    return lines


def run_decode(args: argparse.Namespace) -> int:
    if args.gpus < 1 or args.batch < 1 or args.model_bytes <= 0:
        raise ValueError(f"--gpus={args.gpus}, --batch={args.batch} must be >= 1 and --model-bytes > 0")
    if args.figure:
        _check_figure(args.figure)
    lines = _comparison(args)
    if args.examples:
        lines += _examples()
    if args.figure:
        decode.figure_7(args.figure)
        lines.append(f"figure 7 written to {args.figure}")
    print("\n".join(lines))
    return 0


# --- decode-measure ---


def add_decode_measure(subparsers: argparse._SubParsersAction) -> None:
    from analysis import decode_measure

    p = subparsers.add_parser("decode-measure", help="measured decode (real processes) vs eq. 9/10",
                              description=decode_measure.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpus", type=int, nargs="+", default=[1, 2], help="world sizes G to measure (default 1 2)")
    p.add_argument("--hidden", type=int, default=256, help="Llama hidden size (default 256)")
    p.add_argument("--layers", type=int, default=4, help="Llama layers (default 4)")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--lanes", type=int, default=4, help="lanes of the hybrid (default 4; a multiple of every G)")
    p.add_argument("--lane-depth", type=int, default=6, help="lane depth of the hybrid (default 6)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=32, help="decode steps timed per measurement (default 32)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds, medians (default 3)")
    p.add_argument("--no-curve", action="store_true", help="skip the delayed-communication curve")
    p.add_argument("--figure", default="decode_measured.png", metavar="PNG", help="where to draw (default %(default)s)")
    p.set_defaults(run=run_decode_measure)


def run_decode_measure(args: argparse.Namespace) -> int:
    if min(args.gpus) < 1:
        raise ValueError(f"--gpus {' '.join(map(str, args.gpus))}: every world size G must be >= 1")
    if args.figure:
        _check_figure(args.figure)
    from analysis import decode_measure as dm

    base = dm.llama(args.hidden, args.layers, args.vocab, heads=args.heads, kv_heads=args.kv_heads)
    result = dm.measure(base, args.lanes, args.lane_depth, args.gpus, args.batch, args.steps, args.repeats,
                        curve=not args.no_curve)
    lines = dm.report(result)
    if args.figure:
        dm.figure(result.rows, result.curve, result.no_comm.step_s if result.no_comm else None, result.threshold,
                  args.figure)
        lines.append(f"figure written to {args.figure}")
    print("\n".join(lines))
    return 0


# --- samples ---


def add_samples(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("samples", help="text decoded from a sweep's (or one run's) checkpoints")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--sweep", help="every configuration of this sweep (MLflow experiment)")
    where.add_argument("--run-dir", help="one run's folder (its MLflow run is found by the tag run_dir)")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: sqlite:///<cwd>/mlflow.db)")
    p.add_argument("--prompt", default="def ", help="text the samples continue (default %(default)r)")
    p.add_argument("--tokens", type=int, default=64, help="new tokens per sample (default 64)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--all", action="store_true", help="every run, not one per configuration")
    p.set_defaults(run=run_samples)


def run_samples(args: argparse.Namespace) -> int:
    from analysis import samples

    if args.run_dir and not Path(args.run_dir).expanduser().is_dir():
        raise ValueError(f"--run-dir={args.run_dir!r}: no such folder (a run's folder: <output_dir>/<sweep>/<run key>)")
    if args.run_dir:
        items = [samples.run_dir_source(args.run_dir, args.tracking_uri)]
    else:
        items = samples.sweep_sources(args.sweep, args.tracking_uri)
        items = items if args.all else samples.one_per_config(
            [i for i in items if samples.has_checkpoint(i)] or items)
    printed = 0
    for item in items:
        got = samples.sample_text(item, args.prompt, args.tokens, args.temperature, args.top_k, args.seed)
        if got is None:
            print(f"== {item.name}: no checkpoint in {item.run_dir}")
            continue
        text, step = got
        print(f"== {item.name} (step {step}, {item.run_dir})\n{text}\n")
        printed += 1
    if not printed:
        raise ValueError("no run with a checkpoint: nothing to sample")
    return 0


# --- decode-fill ---


def add_decode_fill(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("decode-fill", help="measured decode time of a sweep's finished runs -> MLflow metrics",
                              description="Time single-device decoding (batch 1, 16-token prompt, 32 new tokens) of "
                                          "each FINISHED run's newest checkpoint and log decode_ms_per_token, "
                                          "decode_tokens_per_s (and how it was measured) into its MLflow run; "
                                          "see analysis/decode_fill.py.")
    p.add_argument("--sweep", required=True, help="sweep (MLflow experiment) name, e.g. lane_count")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: sqlite:///<cwd>/mlflow.db)")
    p.add_argument("--force", action="store_true", help="measure again runs that already have decode_ms_per_token")
    p.add_argument("--tp", type=int, default=0, metavar="G",
                   help="also time the run's model sharded over G processes (decode_ms_per_token_tp<G>)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads of the single-device measurement (default 1, like one TP rank; 0 = torch's)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run_decode_fill)


def run_decode_fill(args: argparse.Namespace) -> int:
    import torch

    from analysis import decode_fill

    if args.tp < 0 or args.tp == 1:
        raise ValueError(f"--tp={args.tp}: give G >= 2 processes (or 0 for single-device only)")
    if args.threads < 0:
        raise ValueError(f"--threads={args.threads}: must be >= 0 (0 = torch's default)")
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = decode_fill.fill(args.sweep, args.tracking_uri, force=args.force, tp=args.tp,
                            progress=not args.no_progress)
    print(decode_fill.table(rows, args.tp))
    counts = {s: sum(r.status == s for r in rows) for s in ("measured", "skipped", "no checkpoint", "failed")}
    print(", ".join(f"{n} {s}" for s, n in counts.items() if n) + f" (of {len(rows)} finished runs)")
    return 1 if counts["failed"] else 0


# --- report ---


def add_report(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("report", help="figures (PNG) and summary.md of a sweep, into <out>/<sweep>/")
    p.add_argument("--sweep", required=True, help="sweep (MLflow experiment) name, e.g. lane_count")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: sqlite:///<cwd>/mlflow.db)")
    p.add_argument("--out", default="reports", help="parent folder of the report (default: reports)")
    p.add_argument("--metric", default=None, choices=("eval_loss", "train_loss_mean", "train_loss"),
                   help="final-loss estimate for ranking, figures and findings: eval_loss (default: the final "
                        "eval loss on the held-out split), train_loss_mean (mean train loss over the last "
                        "--window steps) or train_loss (the last step's train loss, the report's criterion)")
    p.add_argument("--window", type=int, default=None, metavar="N",
                   help="steps averaged by train_loss_mean (default: the last 10%% of each run's steps)")
    p.set_defaults(run=run_report)


def run_report(args: argparse.Namespace) -> int:
    from analysis.report import run  # pandas, matplotlib and mlflow load only for this command

    return run(args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="command")
    for add in (add_decode, add_decode_measure, add_samples, add_decode_fill, add_report):
        add(subparsers)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except ValueError as err:  # bad input: a clear message and exit code 2, no traceback
        parser.exit(2, f"{parser.prog} {args.command}: error: {err}\n")


if __name__ == "__main__":
    sys.exit(main())
