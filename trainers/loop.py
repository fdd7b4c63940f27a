"""The training loop: train() sets a run up, then repeats train_step() with eval, logging and checkpoints.

    train()
      _setup()          distributed env, seed, data, checks, model, optimizer, resume, loggers
      loop over steps:
        train_step()    <- the whole optimizer step in one place
        evaluate()      every eval_every steps and at the end
        _stop_reason()  SIGUSR2 / SIGTERM (preempted) or should_stop (stopped), agreed by all ranks
        _checkpoint()   every ckpt_every steps, at the end, and before returning early

Exit statuses: "finished" (all steps done), "preempted" (a signal asked to stop, TrainResult.signal says
which: SIGUSR2 = preemption / timeout, requeue; SIGTERM = cancelled; run the same command again to
resume), "stopped" (should_stop returned True, e.g. an Optuna pruner). The logger's flush() is called right
after each checkpoint only, so every flush commits the rows it was handed so far.
Non-finite loss or grad norm raises NonFiniteError before the optimizer step; checkpoints are untouched.
"""

from __future__ import annotations

import math
import os
import random
import signal
import threading
import time
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from analysis.devices import peak_flops_of
from analysis.planning import COMPILE_AUTO_MIN_S, compiles, expected_eager_s
from models import build_model
from models.config import ModelConfig
from models.counts import flops_per_token
from trainers import checkpoint as ckpt
from trainers.config import DataConfig, TrainConfig
from trainers.data import prepare_data
from trainers.distributed import (
    DistEnv,
    all_gather_objects,
    all_reduce_sum,
    barrier,
    cleanup,
    init_distributed,
    unwrap,
    wrap,
)
from trainers.loader import Loader, eval_batches
from trainers.metrics_log import JsonlLogger, MetricLogger, MultiLogger
from trainers.optim import build_optimizer, lr_at, set_lr
from trainers.rundir import RunDir

STOP_SIGNALS = (signal.SIGUSR2, signal.SIGTERM)


class NonFiniteError(FloatingPointError):
    """Loss or gradient norm is NaN / inf at some step; raised before that step's optimizer update."""


@dataclass
class TrainResult:
    status: str
    """finished | preempted | stopped."""
    step: int
    train_loss: float
    eval_loss: float | None
    tokens: int
    signal: int | None = None
    """preempted: the signal that stopped the run (SIGUSR2 wins when ranks received different ones)."""


def peak_flops(device: torch.device, precision: str) -> float:
    """Peak FLOP/s that MFU divides by.

    $TPB_PEAK_FLOPS when set (e.g. 989e12 for an H100's dense bf16). Otherwise, on CPU, the measured
    rate of a 1024 x 1024 matmul in the run's precision on this process's threads (fastest of 5, about
    0.1 s once per process): MFU on CPU is then "fraction of the achievable matmul rate", and it is only
    as steady as the machine's load. On CUDA, the device's dense bf16 peak from the device table of
    analysis/devices.py (fp32 taken as bf16 / 2; 1e14 for unknown devices).
    """
    if os.environ.get("TPB_PEAK_FLOPS"):
        return float(os.environ["TPB_PEAK_FLOPS"])
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = peak_flops_of(name) or 1e14
        return peak if dtype == torch.bfloat16 else peak / 2
    return _measured_cpu_flops(dtype)


_CPU_FLOPS: dict[tuple[torch.dtype, int], float] = {}


def _measured_cpu_flops(dtype: torch.dtype, n: int = 1024, reps: int = 5) -> float:
    """Fastest of `reps` n x n matmuls (the fastest, not the mean: other processes on a shared
    machine slow some of them down); cached per (dtype, threads) for the process."""
    key = (dtype, torch.get_num_threads())
    if key not in _CPU_FLOPS:
        a = torch.randn(n, n, generator=torch.Generator().manual_seed(0)).to(dtype)
        torch.mm(a, a)  # warm-up (oneDNN / AMX kernel selection)
        best = math.inf
        for _ in range(reps):
            start = time.perf_counter()
            torch.mm(a, a)
            best = min(best, time.perf_counter() - start)
        _CPU_FLOPS[key] = 2 * n**3 / best
    return _CPU_FLOPS[key]


# --- one run's objects ---

@dataclass
class _Run:
    env: DistEnv
    cfg: TrainConfig
    model: nn.Module
    """DDP-wrapped when world size > 1."""
    optimizer: torch.optim.Optimizer
    loader: Loader
    test_tokens: np.ndarray
    unigram_entropy: float
    """Of the corpus's tokens (nats): logged beside every eval_loss as the loss to beat."""
    accum: int
    run_dir: Path
    state: ckpt.ResumeState
    logger: MetricLogger | None
    """Rank 0 only: metrics.jsonl plus the caller's logger."""
    local: JsonlLogger | None
    flops_per_token: int
    peak_flops: float
    saved_step: int = -1
    params: list[nn.Parameter] = field(default_factory=list)

    def autocast(self):
        return torch.autocast(self.env.device.type, dtype=torch.bfloat16, enabled=self.cfg.precision == "bf16")


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _setup(model_cfg: ModelConfig, cfg: TrainConfig, data_cfg: DataConfig, run_dir: Path, env: DistEnv,
           logger: MetricLogger | None, build_data: bool = True) -> _Run:
    """Everything before the first step; every input check happens here, before any training."""
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    accum = cfg.grad_accum(env.world_size)  # ValueError naming protocol.batch_tokens
    if cfg.context > model_cfg.max_seq_len:
        raise ValueError(f"protocol.context={cfg.context} exceeds architecture.max_seq_len={model_cfg.max_seq_len}")
    if env.is_main:
        data = prepare_data(data_cfg, cfg.context, progress=True, build=build_data)
    barrier(env)  # rank 0 builds the cache, the others then read it
    if not env.is_main:
        data = prepare_data(data_cfg, cfg.context, progress=False, build=build_data)
    if data.vocab_size > model_cfg.vocab_size:
        raise ValueError(
            f"architecture.vocab_size={model_cfg.vocab_size} is smaller than the data's tokenizer vocabulary "
            f"({data.vocab_size}, data.tokenizer={data_cfg.tokenizer!r}): set architecture.vocab_size >= "
            f"{data.vocab_size}"
        )
    loader = Loader(data.train, cfg.context, cfg.micro_batch, rank=env.rank, world_size=env.world_size,
                    seed=data_cfg.seed, reshuffle=data_cfg.reshuffle)  # data.seed, not protocol.seed: a fixed order

    _seed_everything(cfg.seed)
    bare = build_model(model_cfg).to(env.device)
    optimizer = build_optimizer(bare, cfg)
    state = _resume(run_dir, bare, optimizer, loader, env)
    peak = peak_flops(env.device, cfg.precision)
    expected = expected_eager_s(model_cfg, cfg, peak, from_step=state.step)
    votes = torch.tensor([float(compiles(cfg.compile, expected))], device=env.device)  # CPU peaks are measured
    compiled = all_reduce_sum(votes, env).item() > 0  # per rank: the ranks agree on rank-local estimates
    if compiled:
        bare.compile()  # compiles forward in place: parameter names, state dict and DDP wrapping unchanged
    if env.is_main and cfg.compile == "auto":
        print(f"protocol.compile=auto: {'compiled' if compiled else 'eager'} (expected eager training "
              f"{expected:,.0f} s; compiles from {COMPILE_AUTO_MIN_S:.0f} s)", flush=True)
    model = wrap(bare, env)

    local = JsonlLogger(RunDir(run_dir).metrics, keep_through=state.step) if env.is_main else None
    return _Run(env=env, cfg=cfg, model=model, optimizer=optimizer, loader=loader, test_tokens=data.test,
                unigram_entropy=data.unigram_entropy,
                accum=accum, run_dir=run_dir, state=state,
                logger=MultiLogger(local, logger) if env.is_main else None, local=local,
                flops_per_token=flops_per_token(model_cfg, cfg.context),
                peak_flops=peak, saved_step=state.step,
                params=[p for p in bare.parameters() if p.requires_grad])


def _resume(run_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer, loader, env: DistEnv
            ) -> ckpt.ResumeState:
    """Load the newest valid checkpoint into model / optimizer / loader / RNGs; a fresh state if none."""
    found = ckpt.load_latest(run_dir)
    if found is None:
        return ckpt.ResumeState()
    model.load_state_dict(found.model)
    optimizer.load_state_dict(found.optimizer)
    if found.world_size == env.world_size:
        state = found.resume[env.rank]
        ckpt.restore_rng(state.rng)
    else:
        state = found.resume[0]
        warnings.warn(f"resuming a world-size-{found.world_size} checkpoint with {env.world_size} processes: "
                      "RNG states are not restored (the data cursor is global and carries over)", stacklevel=2)
    loader.load_state_dict(state.loader)
    return state


# --- the training step ---

def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, run: _Run) -> torch.Tensor:
    with run.autocast():  # the head fused with an fp32 cross-entropy, logits never materialised (models/loss.py)
        return model(x, y)


def train_step(run: _Run, step: int) -> dict[str, float]:
    """One optimizer step: accum micro-steps (DDP syncs gradients on the last one only), clip,
    non-finite check, AdamW update at lr_at(step)."""
    start = time.perf_counter()
    device, ddp = run.env.device, run.env.distributed
    loss_sum = torch.zeros((), device=device)
    for micro in range(run.accum):
        x, y = run.loader.next()
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        sync = nullcontext() if (not ddp or micro == run.accum - 1) else run.model.no_sync()
        with sync:
            loss = _loss(run.model, x, y, run)
            (loss / run.accum).backward()
        loss_sum += loss.detach()
    max_norm = run.cfg.grad_clip if run.cfg.grad_clip > 0 else math.inf
    grad_norm = torch.nn.utils.clip_grad_norm_(run.params, max_norm, foreach=True)
    train_loss = all_reduce_sum(loss_sum, run.env).item() / (run.accum * run.env.world_size)
    _check_finite(step, train_loss, grad_norm.item())
    lr = lr_at(step, run.cfg)
    set_lr(run.optimizer, lr)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    tokens_per_s = run.cfg.batch_tokens / (time.perf_counter() - start)
    return {
        "train_loss": train_loss,
        "lr": lr,
        "grad_norm": grad_norm.item(),
        "tokens": float(step * run.cfg.batch_tokens),
        "tokens_per_s": tokens_per_s,
        "mfu": run.flops_per_token * tokens_per_s / run.peak_flops / run.env.world_size,
    }


def _check_finite(step: int, loss: float, grad_norm: float) -> None:
    problems = [f"{name} is {value}" for name, value in (("loss", loss), ("grad norm", grad_norm))
                if not math.isfinite(value)]
    if problems:
        raise NonFiniteError(f"step {step}: " + ", ".join(problems) + " (stopped before the optimizer step)")


@torch.no_grad()
def evaluate(run: _Run) -> float:
    """Mean loss over eval_batches micro-batches of the test split, spread over all of it (the same
    windows at every eval, whatever the world size: rank r evaluates batches r, r + W, ...)."""
    bare, env = unwrap(run.model), run.env
    bare.eval()
    total = torch.zeros(2, device=env.device)  # [sum of losses x sequences, sequences]
    batches = eval_batches(run.test_tokens, run.cfg.context, run.cfg.micro_batch, run.cfg.eval_batches)
    for i, (x, y) in enumerate(batches):
        if i % env.world_size == env.rank:
            total[0] += _loss(bare, x.to(env.device), y.to(env.device), run) * len(x)
            total[1] += len(x)
    bare.train()
    total = all_reduce_sum(total, env)
    return (total[0] / total[1]).item()


# --- stopping, checkpoints, the loop ---

class _StopSignals:
    """SIGUSR2 / SIGTERM set a flag (checked at the end of a step); previous handlers restored on exit."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _stop_reason(run: _Run, signals: _StopSignals, should_stop, metrics: dict[str, float]
                 ) -> tuple[str, int | None] | None:
    """('preempted', signal) / ('stopped', None) / None, the same answer on every rank."""
    stop = bool(run.env.is_main and should_stop is not None and should_stop(run.state.step, metrics))
    flags = torch.tensor([float(signals.received == sig) for sig in STOP_SIGNALS] + [float(stop)])
    flags = all_reduce_sum(flags.to(run.env.device), run.env).cpu()
    for sig, flag in zip(STOP_SIGNALS, flags, strict=False):
        if flag > 0:
            return "preempted", int(sig)
    if flags[-1] > 0:
        return "stopped", None
    return None


def _checkpoint(run: _Run) -> None:
    """Save (rank 0 writes every rank's resume state), then flush the metrics: both describe the same step."""
    if run.saved_step == run.state.step:
        return
    run.state.loader = run.loader.state_dict()
    run.state.rng = ckpt.capture_rng()
    states = all_gather_objects(run.state, run.env)
    if run.env.is_main:
        ckpt.save(run.run_dir, run.state.step, unwrap(run.model), run.optimizer, states, keep=run.cfg.keep_ckpts)
        run.logger.flush()
    barrier(run.env)
    run.saved_step = run.state.step


def _due(step: int, every: int, last: int) -> bool:
    return step == last or (every > 0 and step % every == 0)


def _run_steps(run: _Run, signals: _StopSignals, should_stop) -> tuple[str, int | None]:
    cfg, state = run.cfg, run.state
    bar = tqdm(total=cfg.steps, initial=state.step, disable=not run.env.is_main, mininterval=1.0,
               desc="train", unit="step")
    try:
        while state.step < cfg.steps:
            metrics = train_step(run, state.step + 1)
            state.step += 1
            state.tokens = state.step * cfg.batch_tokens
            state.train_loss = metrics["train_loss"]
            if _due(state.step, cfg.eval_every, cfg.steps):
                state.eval_loss = metrics["eval_loss"] = evaluate(run)
                metrics["unigram_entropy"] = run.unigram_entropy
            if run.logger is not None:
                run.logger.log(metrics, state.step)
            bar.update(1)
            bar.set_postfix(loss=f"{state.train_loss:.4f}", tok_s=f"{metrics['tokens_per_s']:.0f}", refresh=False)
            reason = _stop_reason(run, signals, should_stop, metrics) if state.step < cfg.steps else None
            if reason or _due(state.step, cfg.ckpt_every, cfg.steps):
                _checkpoint(run)
            if reason:
                return reason
        return "finished", None
    finally:
        bar.close()


def train(model_cfg: ModelConfig, train_cfg: TrainConfig, data_cfg: DataConfig, run_dir: str | Path,
          logger: MetricLogger | None = None,
          should_stop: Callable[[int, dict[str, float]], bool] | None = None, build_data: bool = True) -> TrainResult:
    """Train (or resume) one run in run_dir; see the module docstring for statuses and errors. build_data=False
    (a sweep's job): only read the data its parent prepared (trainers/prepare.py), FileNotFoundError if none."""
    run_dir = Path(run_dir)
    owns_group = not torch.distributed.is_initialized()
    env = init_distributed()
    run = None
    try:
        run = _setup(model_cfg, train_cfg, data_cfg, run_dir, env, logger, build_data)
        with _StopSignals() as signals:
            status, stopped_by = _run_steps(run, signals, should_stop)
        s = run.state
        barrier(env)  # ranks leave together: a rank tearing down gloo under a busy peer can abort it
        return TrainResult(status=status, step=s.step, train_loss=s.train_loss, eval_loss=s.eval_loss,
                           tokens=s.tokens, signal=stopped_by)
    finally:  # no logger.flush() here: rows past the last checkpoint are not committed
        if run is not None and run.local is not None:
            run.local.close()
        if owns_group:
            cleanup()
