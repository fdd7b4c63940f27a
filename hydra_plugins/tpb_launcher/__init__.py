"""Hydra plugins `hydra/launcher=tpb` and `hydra/sweeper=tpb_grid` (thin faces of orchestrator.launcher / grid)."""
