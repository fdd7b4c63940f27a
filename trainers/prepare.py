"""A sweep's data, prepared once by its parent before any job starts; the jobs only read it (trainers/data.py).

    datas = sweep_data(pairs)             each job's DataConfig: a hub source gets data.max_tokens from the sweep
    bound_lines(pairs)                    the dry run's lines: one per data set, its max_tokens figure
    prepare_sets(sets)                    build the caches (local sweeps: in the parent); one line per set
    submit_prepare(executor, sets)        Slurm: one first job prepares, the array depends on it (afterok)

pairs: (protocol, data) of every job, steps already scaled by token_scale; sets: (data, context) of the jobs.

The bound: a hub source left at data.max_tokens=0 is bounded by the largest steps x batch_tokens of the jobs that
read it, plus its data.test_tokens, plus TOKEN_MARGIN_PERCENT. So every run of the sweep, dataset_size's 2..10 x
included, reads one cache in one order, and no more is streamed than the longest run trains on. The bound is part
of the cache fingerprint and of the run key; a user-given data.max_tokens wins. stdlib and files sources get no
automatic bound: they are local and finite (set data.max_tokens to bound them).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable

from trainers.config import DataConfig, TrainConfig
from trainers.data import cache_target, prepare_data

TOKEN_MARGIN_PERCENT = 5
"""Added to the tokens a sweep needs: the held-out split is whole documents (it may exceed data.test_tokens), and
train windows are cut at document-independent offsets."""
PREPARE_DROPPED = ("gpus_per_node", "gpus_per_task", "gres", "num_gpus", "cpus_per_gpu", "mem_per_gpu",
                   "array_parallelism", "dependency")
"""Slurm parameters of the training jobs the prepare job does not take (it tokenizes on one node, without GPUs)."""


def needed_tokens(protocol: TrainConfig, data: DataConfig) -> int:
    """Tokens one run reads: steps x batch_tokens of training, plus the held-out split."""
    return protocol.steps * protocol.batch_tokens + data.test_tokens


def token_bound(pairs: Iterable[tuple[TrainConfig, DataConfig]]) -> int:
    """The largest need of the jobs plus TOKEN_MARGIN_PERCENT (rounded up)."""
    need = max(needed_tokens(protocol, data) for protocol, data in pairs)
    return need + -(-need * TOKEN_MARGIN_PERCENT // 100)


def _key(data: DataConfig, **changes) -> str:
    return json.dumps(dataclasses.asdict(dataclasses.replace(data, **changes)), sort_keys=True)


def _groups(pairs: list[tuple[TrainConfig, DataConfig]]) -> dict[str, list[int]]:
    """Job indices by data set (the data config, max_tokens aside), in order of first appearance."""
    groups: dict[str, list[int]] = {}
    for i, (_, data) in enumerate(pairs):
        groups.setdefault(_key(data, max_tokens=0), []).append(i)
    return groups


def sweep_data(pairs: list[tuple[TrainConfig, DataConfig]]) -> list[DataConfig]:
    """Each job's DataConfig; a hub source left at max_tokens=0 gets the bound of the jobs reading it."""
    out = [data for _, data in pairs]
    for indices in _groups(pairs).values():
        bound = token_bound(pairs[i] for i in indices)
        for i in indices:
            if out[i].source == "hub" and out[i].max_tokens == 0:
                out[i] = dataclasses.replace(out[i], max_tokens=bound)
    return out


def bound_lines(pairs: list[tuple[TrainConfig, DataConfig]]) -> list[str]:
    """One line per data set: its data.max_tokens (after sweep_data), and what the sweep reads of it."""
    lines = []
    for indices in _groups(pairs).values():
        data = pairs[indices[0]][1]
        largest = max(pairs[i][0].steps * pairs[i][0].batch_tokens for i in indices)
        need = f"the sweep's largest steps x batch_tokens {largest:,} + data.test_tokens {data.test_tokens:,}"
        if data.max_tokens == 0:
            lines.append(f"data {data.name}: data.max_tokens=0, no bound: the whole corpus is tokenized ({need})")
        elif data.max_tokens == token_bound(pairs[i] for i in indices):
            lines.append(f"data {data.name}: data.max_tokens={data.max_tokens:,} ({need}, + {TOKEN_MARGIN_PERCENT}%)")
        else:
            lines.append(f"data {data.name}: data.max_tokens={data.max_tokens:,} (given; {need})")
    return lines


def distinct_sets(sets: Iterable[tuple[DataConfig, int]]) -> list[tuple[DataConfig, int]]:
    """(data, context) pairs without repeats, in order: one cache folder each."""
    seen: dict[str, tuple[DataConfig, int]] = {}
    for data, context in sets:
        seen.setdefault(f"{_key(data)}/{context}", (data, context))
    return list(seen.values())


def prepare_sets(sets: Iterable[tuple[DataConfig, int]], progress: bool = True,
                 error: type[Exception] = ValueError) -> None:
    """Build every set's cache that is missing (tokenizer progress bars on stderr); one line per set. A data error
    (a missing column, a corpus too small) is raised as `error`, its message kept."""
    for data, context in distinct_sets(sets):
        cached = cache_target(data, context)[0].is_dir()
        try:
            prepared = prepare_data(data, context, progress=progress)
        except ValueError as failure:
            raise error(str(failure)) from failure
        print(f"data {data.name} (context {context}): {len(prepared.train):,} train + {len(prepared.test):,} "
              f"test tokens, {'cached' if cached else 'prepared'} in {prepared.path}", flush=True)


def submit_prepare(executor, sets: Iterable[tuple[DataConfig, int]]) -> str:
    """Slurm: submit one job that prepares the sets not prepared yet (one node, one task, no GPU; the training
    jobs' partition, account, time, cpus and setup), and make the executor's next submission (the job array)
    depend on it: afterok, and Slurm cancels the array if it fails. Returns its job id ('' if nothing is missing)."""
    missing = [(d, c) for d, c in distinct_sets(sets) if not cache_target(d, c)[0].is_dir()]
    if not missing:
        return ""
    params = {k: v for k, v in executor.parameters.items() if k not in PREPARE_DROPPED}
    prep = type(executor)(executor.folder, executor.max_num_timeout)
    prep.update_parameters(**{**params, "nodes": 1, "ntasks_per_node": 1,
                              "job_name": f"{params.get('job_name', 'tpb')}-prepare"})
    job = prep.submit(prepare_sets, missing)
    extra = {**executor.parameters.get("additional_parameters", {}), "kill_on_invalid_dep": "yes"}
    executor.update_parameters(dependency=f"afterok:{job.job_id}", additional_parameters=extra)
    print(f"data: Slurm job {job.job_id} prepares {len(missing)} data set(s); the job array starts after it "
          f"(log {job.paths.stdout})", flush=True)
    return job.job_id
