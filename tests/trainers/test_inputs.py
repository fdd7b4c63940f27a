"""trainers/inputs.py in process: what the parent checks before anything is written (the command-line rows of
every refusal are tests/infra/test_bad_inputs.py). Permission cases expect what the OS says: root reads anyway."""

from __future__ import annotations

from pathlib import Path

import pytest

from trainers import inputs
from trainers.config import DataConfig
from trainers.data import cache_target
from trainers.inputs import check_hub, check_inputs


def tree(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def denied(action) -> bool:
    """True when the OS refuses `action()` with a permission error (never as root)."""
    try:
        action()
    except PermissionError:
        return True
    return False


def test_usable_inputs_pass_and_the_check_writes_nothing(tmp_path: Path):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("hello")
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text("{}")
    before = tree(tmp_path)
    check_inputs(DataConfig(source="files", files=[str(tmp_path / "corpus" / "*.txt")], tokenizer=str(tmp_path / "tok"),
                            cache_dir=str(tmp_path / "cache" / "deeper")))
    check_inputs(DataConfig(source="hub", hub_id=str(tmp_path / "corpus"), cache_dir=str(tmp_path / "cache")))
    assert tree(tmp_path) == before  # the cache folder that does not exist yet is not made


def test_an_unreadable_data_file_is_refused_when_the_os_refuses_it(tmp_path: Path):
    path = tmp_path / "secret.txt"
    path.write_text("hello")
    path.chmod(0)
    cfg = DataConfig(source="files", files=[str(path)], cache_dir=str(tmp_path / "cache"))
    try:
        if denied(path.read_text):
            with pytest.raises(ValueError, match=r"data.files: '.*secret.txt' cannot be read \(permission denied\)"):
                check_inputs(cfg)
        else:  # root: the file is readable, so it must pass
            check_inputs(cfg)
    finally:
        path.chmod(0o644)


def test_a_cache_folder_that_cannot_be_written_is_refused_when_the_os_refuses_it(tmp_path: Path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    cfg = DataConfig(cache_dir=str(locked / "cache"))
    try:
        if denied(lambda: (locked / "probe").mkdir()):
            with pytest.raises(ValueError, match=r"data.cache_dir='.*locked/cache': .* cannot be written"):
                check_inputs(cfg)
        else:
            (locked / "probe").rmdir()
            check_inputs(cfg)
    finally:
        locked.chmod(0o755)


def test_the_cache_setting_is_named_as_the_user_gave_it(tmp_path: Path, monkeypatch):
    (tmp_path / "blocker").write_text("a file")
    monkeypatch.setenv("TPB_CACHE", str(tmp_path / "blocker"))
    with pytest.raises(ValueError, match=r"^TPB_CACHE='.*blocker': exists and is not a folder"):
        check_inputs(DataConfig())
    with pytest.raises(ValueError, match=r"^data.cache_dir='.*blocker/sub': cannot be made a folder: .* is a file"):
        check_inputs(DataConfig(cache_dir=str(tmp_path / "blocker" / "sub")))
    monkeypatch.delenv("TPB_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "blocker"))
    with pytest.raises(ValueError, match=r"^data.cache_dir \(empty, TPB_CACHE unset: the default\)="):
        check_inputs(DataConfig())


def test_check_hub_asks_only_for_hub_ids_that_are_not_cached(tmp_path: Path, monkeypatch):
    asked = []

    def refusal(repo_id: str, repo_type: str) -> str:
        asked.append((repo_id, repo_type))
        return "no such dataset on the hub" if repo_type == "dataset" else ""

    monkeypatch.setattr(inputs, "_hub_refusal", refusal)
    cfg = DataConfig(source="hub", hub_id="nobody/none", tokenizer="nobody/tok", cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"^data.hub_id='nobody/none': no such dataset on the hub$"):
        check_hub(cfg, context=32)
    assert asked == [("nobody/none", "dataset")]
    check_hub(DataConfig(source="hub", hub_id=str(tmp_path), cache_dir=str(tmp_path)), context=32)  # a folder
    check_hub(DataConfig(cache_dir=str(tmp_path)), context=32)  # stdlib + bpe: nothing on the hub
    assert len(asked) == 1
    cache_target(cfg, 32)[0].mkdir(parents=True)  # prepared already: the job never downloads
    check_hub(cfg, context=32)
    assert len(asked) == 1

