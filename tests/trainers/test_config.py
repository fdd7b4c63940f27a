"""trainers/config.py: protocol.compile's settings (auto by default; the rule: analysis/planning.py)."""

from __future__ import annotations

import pytest

from trainers.config import TrainConfig, non_result_fields


def test_compile_is_auto_by_default_and_takes_yaml_booleans():
    assert TrainConfig().compile == "auto"
    # YAML `true` / an override protocol.compile=true reach a str field as "True"; a bool from Python too
    assert [TrainConfig(compile=v).compile for v in (True, "True", "false", False, "AUTO")] == \
        ["true", "true", "false", "false", "auto"]
    with pytest.raises(ValueError, match=r"protocol\.compile='maybe': allowed: auto, true, false"):
        TrainConfig(compile="maybe")
    assert "compile" in non_result_fields(TrainConfig)  # a speed setting: not in the run key


def test_compile_override_through_hydra_reaches_the_run_config(tmp_path):
    from hydra import compose, initialize_config_dir

    from orchestrator.config import register_configs, to_run_config
    from tests.orchestrator.orch_support import ROOT

    register_configs()
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        runs = [to_run_config(compose("config", overrides=o)) for o in
                ([], ["protocol.compile=true"], ["protocol.compile=false"], ["protocol.compile=auto"])]
    assert [r.protocol.compile for r in runs] == ["auto", "true", "false", "auto"]
