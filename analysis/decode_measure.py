"""Measured decode vs the analytic model (report eq. 9 / 10), on real processes and collectives.

    python -m analysis decode-measure [--gpus 1 2] [--hidden 256 --layers 4 --vocab 8192] [--figure out.png]

For a Llama and a hybrid TPB of equal parameters (models.budget solves the hybrid's hidden size), at
each G: the decode step time (spawned ranks, one thread each, trainers.tensor_parallel), tokens/s,
syncs per step, t_sync (an all-reduce of the [batch, hidden] payload on the same process group),
the calibrated prediction and its error; then the delayed-communication curve (step time vs
comm_length at the largest G, beside the no-communication step and the analytic threshold).

Calibration (one device, G = 1, no sync). A decode step on a CPU is reads plus per-op dispatch:

    t_1 = overhead + M_read / beta        overhead = the step of a tiny model with the same ops
                                          (hidden, FFN and vocabulary shrunk: its reads are nil)
    t_G = n_sync x t_sync + overhead + (M_sharded / G + M_replicated) / beta        (eq. 9 / 10 + dispatch)

M_read = layer weights + LM head (the head and norms are replicated on every rank, the layers split).
eq. 9 / 10 as printed by the report keep only n_sync x t_sync + M / (beta G) (`eq_s` below): when the
weights fit in the last-level cache the step is bound by op dispatch, which does not shrink with G.

t_sync is measured twice on the same process group: back to back (the issue's definition), and with
the decode's own compute time between two all-reduces (its threads then sleep and the ranks drift,
as in a real step); both predictions are printed.

Error per term, measured the same way on the TP run: syncs (time inside collectives, per step),
overhead (the tiny model's TP step outside its collectives), reads (the rest). The three predicted
terms and the three measured ones each add up to the step, so their differences add up to the error.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

from models.budget import hidden_step
from models.config import ModelConfig
from models.counts import embedding_params, param_count, sync_count

BYTES = 4  # fp32


def llc_bytes() -> int | None:
    """Size of this CPU's last-level cache (from sysfs), None when unknown."""
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    sizes = []
    for index in sorted(base.glob("index*")):
        try:
            text = (index / "size").read_text().strip()
        except OSError:
            continue
        unit = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1], 1)
        sizes.append(int(text.rstrip("KMG")) * unit)
    return max(sizes) if sizes else None


def read_bytes(cfg: ModelConfig) -> tuple[int, int]:
    """(sharded, replicated) weight bytes one decode step reads: the layers, and the LM head + final norm
    (the embedding is looked up one row per token: not counted)."""
    head = cfg.vocab_size * cfg.hidden
    layers = param_count(cfg) - embedding_params(cfg) - cfg.hidden
    return layers * BYTES, (head + cfg.hidden) * BYTES


def tiny_like(cfg: ModelConfig) -> ModelConfig:
    """The same layers and ops with (nearly) nothing to read: smallest valid hidden, FFN 8, vocabulary 64."""
    step, _ = hidden_step(cfg)
    fields = dict(hidden=step, vocab_size=64, ffn_dim=8)
    if cfg.arch == "tpb":
        fields["lane_ffn_dim"] = 8
    return dataclasses.replace(cfg, **fields)


def llama(hidden: int = 256, layers: int = 4, vocab: int = 8192, ffn: int = 0, heads: int = 4, kv_heads: int = 2,
          max_seq_len: int = 256) -> ModelConfig:
    return ModelConfig(arch="llama", vocab_size=vocab, hidden=hidden, n_layers=layers, n_heads=heads,
                       n_kv_heads=kv_heads, ffn_dim=ffn or 2 * hidden, max_seq_len=max_seq_len)


def hybrid_like(base: ModelConfig, lanes: int = 4, lane_depth: int = 6, **comm) -> ModelConfig:
    """A sandwich TPB (1 block, 1 classic layer) of the Llama's parameter count (trainers.tp_measure)."""
    from trainers.tp_measure import equal_params_hybrid

    return equal_params_hybrid(base, lanes, lane_depth, **comm)


# --- spawned measurements ----------------------------------------------------------------------------


def measure_many(rank: int, world: int, cfgs: dict[str, ModelConfig], batch: int, steps: int, repeats: int
                 ) -> dict[str, dict[str, float]]:
    """trainers.tp_measure.measure_tp of every config in one process group, `repeats` rounds
    interleaved (A, B, A, B...) so that load from other processes hits them alike; medians."""
    from trainers.tp_measure import measure_tp

    rounds = [{name: measure_tp(rank, world, cfg, batch=batch, steps=steps) for name, cfg in cfgs.items()}
              for _ in range(repeats)]
    return {name: {key: statistics.median(r[name][key] for r in rounds) for key in rounds[0][name]}
            for name in cfgs}


def run_all(cfgs: dict[str, ModelConfig], worlds: list[int], batch: int = 1, steps: int = 32, repeats: int = 3
            ) -> dict[int, dict[str, dict[str, float]]]:
    """{G: {name: figures}}: one spawn of G processes per G, every config measured in it."""
    from trainers.tensor_parallel import check_world
    from trainers.tp_measure import spawn

    out = {}
    for world in worlds:
        if cfgs and world > 1:
            check_world(next(iter(cfgs.values())), world)  # the first config (the Llama) must split: say why not
        usable = {}
        for name, cfg in cfgs.items():
            try:
                check_world(cfg, world)
                usable[name] = cfg
            except ValueError:
                continue
        out[world] = spawn(measure_many, world, usable, batch, steps, repeats)
    return out


# --- the model of the step ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    name: str
    cfg: ModelConfig
    world: int
    batch: int
    step_s: float
    sync_s: float
    """Measured time inside synchronisations per step."""
    syncs: int
    messages: int
    t_sync_s: float
    pred_sync_s: float
    pred_reads_s: float
    pred_overhead_s: float
    overhead_s: float
    """Measured: the tiny model's step outside its collectives at this G."""
    eq_s: float
    """The report's eq. 9 / 10 with beta calibrated on G = 1 and no dispatch term."""
    t_sync_gap_s: float = 0.0
    """t_sync measured with the decode's compute between two all-reduces (see time_all_reduce)."""

    @property
    def predicted_gap_s(self) -> float:
        """The prediction with t_sync_gap_s in place of t_sync."""
        n_sync = sync_count(self.cfg) if self.world > 1 else 0
        return n_sync * self.t_sync_gap_s + self.pred_reads_s + self.pred_overhead_s

    @property
    def error_gap(self) -> float:
        return abs(self.step_s - self.predicted_gap_s) / self.step_s

    @property
    def predicted_s(self) -> float:
        return self.pred_sync_s + self.pred_reads_s + self.pred_overhead_s

    @property
    def reads_s(self) -> float:
        return self.step_s - self.sync_s - self.overhead_s

    @property
    def error(self) -> float:
        return abs(self.step_s - self.predicted_s) / self.step_s

    @property
    def tokens_per_s(self) -> float:
        return self.batch / self.step_s

    def term_errors(self) -> dict[str, float]:
        """Predicted - measured per term, as a fraction of the measured step (they add up to the signed error)."""
        return {"syncs": (self.pred_sync_s - self.sync_s) / self.step_s,
                "reads": (self.pred_reads_s - self.reads_s) / self.step_s,
                "overhead": (self.pred_overhead_s - self.overhead_s) / self.step_s}

    def worst_term(self) -> str:
        errors = self.term_errors()
        return max(errors, key=lambda k: abs(errors[k]))


def rows(cfgs: dict[str, ModelConfig], measured: dict[int, dict[str, dict[str, float]]], batch: int) -> list[Row]:
    """Measured figures beside the calibrated prediction, per config and G (configs `name` and `name:tiny`)."""
    out = []
    for name, cfg in cfgs.items():
        if name.endswith(":tiny") or name not in measured.get(1, {}):
            continue
        one, tiny_one = measured[1][name], measured[1][f"{name}:tiny"]
        overhead_1 = tiny_one["step_s"]
        sharded, replicated = read_bytes(cfg)
        beta = (sharded + replicated) / max(one["step_s"] - overhead_1, 1e-9)
        for world, figures in sorted(measured.items()):
            if name not in figures:
                continue
            got, tiny = figures[name], figures[f"{name}:tiny"]
            t_sync = got.get("t_sync_s", 0.0)
            n_sync = sync_count(cfg) if world > 1 else 0
            out.append(Row(
                name, cfg, world, batch, got["step_s"], got["sync_s"], int(got["syncs"]), int(got["messages"]),
                t_sync, n_sync * t_sync, (sharded / world + replicated) / beta, overhead_1,
                tiny["step_s"] - tiny["sync_s"], n_sync * t_sync + one["step_s"] / world, got.get("t_sync_gap_s", 0.0),
            ))
    return out


def free_comm_threshold(no_comm: Row) -> float:
    """Section 4.2 with measured figures: comm_length from which a message (t_sync) hides behind the
    lane layers computed meanwhile, t_sync / (time of one sequential layer outside the syncs)."""
    layers = no_comm.cfg.depth
    return no_comm.t_sync_s / ((no_comm.step_s - no_comm.sync_s) / layers)


# --- printing and drawing -----------------------------------------------------------------------------


def table(rows_: list[Row]) -> list[str]:
    llc = llc_bytes()
    lines = [f"{'model':<14}{'params':>10}{'G':>3}{'step ms':>9}{'tok/s':>9}{'syncs':>6}{'msgs':>5}"
             f"{'t_sync us':>10}{'pred ms':>9}{'error':>7}{'eq9/10 ms':>10}  error per term (pred - meas) / meas"]
    for r in rows_:
        terms = " ".join(f"{k} {v:+.0%}" for k, v in r.term_errors().items())
        lines.append(f"{r.name:<14}{param_count(r.cfg):>10,}{r.world:>3}{r.step_s * 1e3:>9.3f}{r.tokens_per_s:>9.0f}"
                     f"{r.syncs:>6}{r.messages:>5}{r.t_sync_s * 1e6:>10.0f}{r.predicted_s * 1e3:>9.3f}"
                     f"{r.error:>7.0%}{r.eq_s * 1e3:>10.3f}  {terms}")
    for r in rows_:
        if r.world > 1:
            lines.append(f"  {r.name} G={r.world}: a sync inside the step costs {r.sync_s / max(r.syncs, 1) * 1e6:.0f} us "
                         f"(t_sync back to back {r.t_sync_s * 1e6:.0f} us, after the step's compute gap "
                         f"{r.t_sync_gap_s * 1e6:.0f} us); predicted with the latter {r.predicted_gap_s * 1e3:.3f} ms, "
                         f"error {r.error_gap:.0%}")
    for r in rows_:
        if r.world != 1:
            continue
        sharded, replicated = read_bytes(r.cfg)
        fits = llc is not None and sharded + replicated <= llc
        share = r.pred_overhead_s / r.step_s
        where = (f"fit in the last-level cache ({llc / 2**20:.0f} MiB)" if fits else
                 f"exceed the last-level cache ({llc / 2**20:.0f} MiB)" if llc else "(last-level cache unknown)")
        bound = "dispatch-bound" if share > 0.5 else "read-bound"
        note = (" (although they fit the nominal cache: this process's share of it is smaller, other "
                "processes and the KV cache use it too)" if fits and share <= 0.5 else "")
        lines.append(f"  {r.name}: weights read per step {(sharded + replicated) / 2**20:.1f} MiB {where}; "
                     f"op dispatch is {share:.0%} of the one-device step: {bound}{note}")
    return lines


def figure(rows_: list[Row], curve: list[tuple[int, float, float]], no_comm_s: float | None, threshold: float | None,
           path: str | Path):
    """Left: measured vs predicted step per model and G (predicted split in its terms); right: the
    delayed-communication curve. Writes a PNG, returns the Figure."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.5))
    left, right = fig.subplots(1, 2)
    labels = [f"{r.name}\nG={r.world}" for r in rows_]
    xs = range(len(rows_))
    bottom = [0.0] * len(rows_)
    for term, attr in (("syncs", "pred_sync_s"), ("reads", "pred_reads_s"), ("overhead", "pred_overhead_s")):
        values = [getattr(r, attr) * 1e3 for r in rows_]
        left.bar([x - 0.2 for x in xs], values, 0.4, bottom=bottom, label=f"predicted: {term}")
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    left.bar([x + 0.2 for x in xs], [r.step_s * 1e3 for r in rows_], 0.4, color="black", label="measured")
    left.set_xticks(list(xs), labels, fontsize=8)
    left.set_ylabel("decode step (ms)")
    left.set_title("decode step: measured vs eq. 9/10 calibrated")
    left.legend(fontsize=8)
    if curve:
        right.plot([c[0] for c in curve], [c[1] * 1e3 for c in curve], "o-", label="with delayed communication")
        right.plot([c[0] for c in curve], [c[2] * 1e3 for c in curve], "x--", label="of which waiting for messages")
        if no_comm_s is not None:
            right.axhline(no_comm_s * 1e3, color="gray", ls="--", label="no communication")
        if threshold is not None and math.isfinite(threshold):
            right.axvline(threshold, color="red", ls=":", label=f"analytic threshold {threshold:.2f}")
        right.set_xlabel("comm_length (layers)")
        right.set_ylabel("decode step (ms)")
        right.set_title("delayed communication at G = 2")
        right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return fig


@dataclass
class Measured:
    rows: list[Row]
    curve: list[tuple[int, float, float]]
    """(comm_length, step seconds, seconds waiting for the messages at their receive depth)."""
    no_comm: Row | None
    threshold: float | None


def measure(base: ModelConfig, lanes: int, lane_depth: int, worlds: list[int], batch: int = 1, steps: int = 32,
            repeats: int = 3, curve: bool = True) -> Measured:
    """Llama `base` vs its equal-parameter hybrid at every G, and the comm_length curve at max(G)."""
    hybrid = hybrid_like(base, lanes, lane_depth)
    cfgs = {"llama": base, "hybrid": hybrid}
    comm = {}
    if curve:
        for length in range(1, lane_depth):
            comm[f"comm_l{length}"] = dataclasses.replace(hybrid, comm=True, comm_start=0, comm_interleave=0,
                                                          comm_length=length)
    with_tiny = {**cfgs, **{f"{k}:tiny": tiny_like(v) for k, v in cfgs.items()}}
    top = max(worlds)
    measured = run_all({**with_tiny, **comm}, sorted(set([1, *worlds])), batch, steps, repeats)
    table_rows = rows(with_tiny, measured, batch)
    at_top = measured.get(top, {})
    points = [(c.comm_length, at_top[name]["step_s"], at_top[name]["wait_s"]) for name, c in comm.items()
              if name in at_top]
    no_comm = next((r for r in table_rows if r.name == "hybrid" and r.world == top), None)
    threshold = free_comm_threshold(no_comm) if no_comm is not None and top > 1 else None
    return Measured(table_rows, points, no_comm, threshold)


def report(result: Measured) -> list[str]:
    lines = table(result.rows)
    if result.curve:
        top = result.no_comm.world if result.no_comm else "?"
        lines += ["", f"Delayed communication (hybrid, comm_start 0, interleave 0) at G={top}:",
                  f"{'comm_length':>12}{'step ms':>10}{'vs no comm':>12}{'wait ms':>10}"]
        base = result.no_comm.step_s if result.no_comm else float("nan")
        for length, step, wait in result.curve:
            lines.append(f"{length:>12}{step * 1e3:>10.3f}{step / base:>11.2f}x{wait * 1e3:>10.3f}")
        if result.no_comm is not None:
            lines.append(f"{'no comm':>12}{base * 1e3:>10.3f}")
        if result.threshold is not None:
            lines.append(f"analytic threshold (section 4.2, measured t_sync / layer time): comm_length >= "
                         f"{result.threshold:.2f}")
    return lines
