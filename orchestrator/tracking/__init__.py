"""MLflow tracking: the parent's store.py, ui.py and liveness.py; the job's job_logger.py."""

from orchestrator.tracking.job_logger import MlflowLogger as MlflowLogger
from orchestrator.tracking.store import open_experiment as open_experiment
