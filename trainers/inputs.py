"""Checks of the inputs a DataConfig names, made by the parent before anything is launched or written.

    check_inputs(cfg)          offline, file stats only: data.files, data.hub_id (a local data set folder),
                               data.tokenizer (a local folder), the cache folder (data.cache_dir / $TPB_CACHE)
    check_hub(cfg, context)    over the network: data.hub_id and data.tokenizer on the hub (exist, not gated
                               for this machine's token); skipped when the prepared data is cached already

Each raises ValueError naming the field; without them a job would find the same inputs missing only after its
MLflow run and its run folder were created. The job (trainers/data.py) still reports them on its own.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

from trainers.config import DataConfig
from trainers.corpus import data_files
from trainers.data import cache_setting, cache_target
from trainers.tokenizer import pretrained_spec

HUB_EXAMPLE = "HuggingFaceTB/smollm-corpus"


def _looks_like_path(name: str) -> bool:
    """Hub ids are "name" or "org/name": anything starting with '/', '.' or '~', or deeper, is a path."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1


def check_folder_usable(path: Path, field: str, value: str) -> None:
    """`path` is, or can be made as, a folder this process may read and write (nothing is created)."""
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if probe == path and not path.is_dir():
        raise ValueError(f"{field}={value!r}: exists and is not a folder")
    if not probe.is_dir():
        raise ValueError(f"{field}={value!r}: cannot be made a folder: {str(probe)!r} is a file")
    if not os.access(probe, os.R_OK | os.W_OK | os.X_OK):
        raise ValueError(f"{field}={value!r}: {str(probe)!r} cannot be written (permission denied)")


def _check_readable_folder(path: Path, field: str, value: str, what: str) -> None:
    if not path.is_dir():
        raise ValueError(f"{field}={value!r} is a file, not a folder: expected {what}")
    if not os.access(path, os.R_OK | os.X_OK):
        raise ValueError(f"{field}={value!r}: the folder cannot be read (permission denied)")
    if not any(path.iterdir()):
        raise ValueError(f"{field}={value!r} is an empty folder: expected {what}")


def _check_files(cfg: DataConfig) -> None:
    for path in data_files(cfg):
        if not os.access(path, os.R_OK):
            raise ValueError(f"data.files: {str(path)!r} cannot be read (permission denied)")


def _check_hub_folder(cfg: DataConfig) -> None:
    local = Path(cfg.hub_id).expanduser()
    if local.exists():
        _check_readable_folder(local, "data.hub_id", cfg.hub_id, "a local data set folder or a datasets hub id")
    elif _looks_like_path(cfg.hub_id):
        raise ValueError(f"data.hub_id={cfg.hub_id!r}: no such folder (expected a datasets hub id such as "
                         f"{HUB_EXAMPLE}, or a local data set folder)")


def _check_tokenizer_folder(cfg: DataConfig) -> None:
    pretrained_spec(cfg.tokenizer)  # raises naming data.tokenizer for a path that does not exist
    local = Path(cfg.tokenizer).expanduser()
    if local.exists():
        _check_readable_folder(local, "data.tokenizer", cfg.tokenizer,
                               "'bpe', a tokenizer folder saved with save_pretrained, or a hub id")


def check_inputs(cfg: DataConfig) -> None:
    """Every path the data config names exists and can be used; raises ValueError naming the field."""
    if cfg.source == "files":
        _check_files(cfg)
    elif cfg.source == "hub":
        _check_hub_folder(cfg)
    if cfg.tokenizer != "bpe":
        _check_tokenizer_folder(cfg)
    field, value = cache_setting(cfg)
    check_folder_usable(Path(value).expanduser(), field, value)


def _hub_ids(cfg: DataConfig) -> list[tuple[str, str, str]]:
    """(field, hub id, repo type) of what this config downloads from the hub (local folders left out)."""
    ids = []
    if cfg.source == "hub" and not Path(cfg.hub_id).expanduser().exists():
        ids.append(("data.hub_id", cfg.hub_id, "dataset"))
    if cfg.tokenizer != "bpe" and not Path(cfg.tokenizer).expanduser().exists():
        ids.append(("data.tokenizer", cfg.tokenizer, "model"))
    return ids


@functools.lru_cache(maxsize=64)
def _hub_refusal(repo_id: str, repo_type: str) -> str:
    """Why the hub refuses `repo_id` ('' when it serves it, or when the hub cannot be asked: offline, no network,
    an error of the hub; the job then meets the same answer, or finds the files in its local caches)."""
    from huggingface_hub import auth_check
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        auth_check(repo_id, repo_type=repo_type)
    except GatedRepoError:
        return ("is gated on the hub and this machine's token has no access: request access on its hub page, "
                "then log in (`hf auth login`) or set HF_TOKEN")
    except RepositoryNotFoundError:
        return f"no such {repo_type} on the hub (or it is private and this machine's token cannot see it)"
    except Exception:  # offline, unreachable or failing hub: not a verdict on the input
        return ""
    return ""


def check_hub(cfg: DataConfig, context: int) -> None:
    """data.hub_id and a hub data.tokenizer exist on the hub and may be downloaded here; raises ValueError
    naming the field. Asks nothing when the prepared data is cached (the job then never downloads)."""
    ids = _hub_ids(cfg)
    if not ids or cache_target(cfg, context)[0].is_dir():
        return
    for field, repo_id, repo_type in ids:
        refusal = _hub_refusal(repo_id, repo_type)
        if refusal:
            raise ValueError(f"{field}={repo_id!r}: {refusal}")
