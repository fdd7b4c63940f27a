"""Hydra sweeper plugin `tpb_optuna`: our Optuna studies (orchestrator/study.py) as a Hydra sweeper."""
