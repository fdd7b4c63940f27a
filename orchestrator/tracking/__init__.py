"""MLflow tracking: the parent's store.py, ui.py and liveness.py; the job's job_logger.py."""
