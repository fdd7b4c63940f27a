"""Run identity: a short hash of everything that changes a run's result, and nothing else.

    key = sha256(canonical JSON of {architecture: solved fields the arch uses, protocol, data})[:16]

Left out, because they do not change what is trained: cluster, tracking, launcher settings,
dry_run, detach, output_dir, the sweep name, the budget request (the solved shape stands for it),
the fields marked NON_RESULT in trainers/config.py (threads, compile, measure_decode, ckpt_every, keep_ckpts,
cache_dir: speed, a measurement, checkpointing, cache folder; data.max_tokens when 0, no bound; the ranking of
analysis/ranking.py reads the same list). Fields an architecture ignores are dropped too (every TPB
field for llama / gpt2, comm_* when comm is off, classic-layer heads without classic layers), so a Llama
baseline inside a TPB grid hashes the same for every lane_count and the launcher runs it once. Fields are excluded by name, so a field added
to a config later changes the key by default (a safe miss: a re-run instead of a wrong skip).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

from models.config import ModelConfig
from trainers.config import DataConfig, TrainConfig, non_result_fields

KEY_VERSION = 1
TPB_FIELDS = frozenset({
    "recipe", "lane_count", "lane_depth", "tp_blocks", "n_classic_layers", "lane_heads", "lane_kv_heads",
    "lane_ffn_mult", "comm", "comm_start", "comm_interleave", "comm_length", "comm_reduction",
})
COMM_FIELDS = frozenset({"comm_start", "comm_interleave", "comm_length", "comm_reduction"})
CLASSIC_FIELDS = frozenset({"n_heads", "n_kv_heads", "ffn_mult"})
PROTOCOL_IGNORED = non_result_fields(TrainConfig)
DATA_IGNORED = non_result_fields(DataConfig)


def ignored_architecture_fields(cfg: ModelConfig) -> frozenset[str]:
    """Fields of cfg that its architecture does not use; dropout when it is 0 (the keys of runs made before
    the field existed stay the same)."""
    off = {"dropout"} if cfg.dropout == 0 else set()
    if cfg.arch == "llama":
        return TPB_FIELDS | {"max_seq_len"} | off  # RoPE: the table length does not change the numbers
    if cfg.arch == "gpt2":
        return TPB_FIELDS | {"n_kv_heads", "rope_theta"} | off  # max_seq_len sizes the position table: kept
    ignored = {"n_layers", "max_seq_len"} | off
    if not cfg.comm:
        ignored |= COMM_FIELDS
    if cfg.n_classic_layers == 0:
        ignored |= CLASSIC_FIELDS
    return frozenset(ignored)


def _fields(obj: Any, ignored: frozenset[str]) -> dict[str, Any]:
    return {k: v for k, v in dataclasses.asdict(obj).items() if k not in ignored}


def key_fields(run: Any) -> dict[str, Any]:
    """The result-defining fields of a RunConfig whose architecture is already solved."""
    return {
        "version": KEY_VERSION,
        "architecture": _fields(run.architecture, ignored_architecture_fields(run.architecture)),
        "protocol": _fields(run.protocol, PROTOCOL_IGNORED),
        "data": _fields(run.data, DATA_IGNORED | ({"max_tokens"} if run.data.max_tokens == 0 else set())),
    }


def canonical_json(fields: dict[str, Any]) -> str:
    return json.dumps(fields, sort_keys=True, separators=(",", ":"), allow_nan=False)


def run_key(run: Any) -> str:
    """16 hex digits (64 bits) of the sha256 of key_fields(run)."""
    return hashlib.sha256(canonical_json(key_fields(run)).encode()).hexdigest()[:16]
