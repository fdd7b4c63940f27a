"""Where tracking stores live: the one resolution of store URIs, for the orchestrator (MLflow, Optuna) and the
analysis (which reads them). Light on purpose: a job process imports it through orchestrator/tracking/store.py.
"""

from __future__ import annotations

from pathlib import Path

SQLITE, JOURNAL = "sqlite:///", "journal:"
DEFAULT_STORE = "mlflow.db"
"""The MLflow store of a launch directory when tracking.uri / --tracking-uri is not given."""


def resolve_uri(uri: str | None, base: str | Path, default: str = DEFAULT_STORE) -> str:
    """'' or None -> sqlite:///<base>/<default>; a relative SQLite or journal path -> absolute against base (the
    launch directory: jobs may run elsewhere); others (sqlite:///:memory:, postgresql://..., http://...) unchanged."""
    base = Path(base).resolve()
    if not uri:
        return f"{SQLITE}{base / default}"
    for scheme in (SQLITE, JOURNAL):
        if uri.startswith(scheme) and uri != "sqlite:///:memory:":
            path = Path(uri[len(scheme):]).expanduser()
            return f"{scheme}{path if path.is_absolute() else base / path}"
    return uri


def sqlite_path(uri: str) -> Path | None:
    """The file of a sqlite:/// URI, else None."""
    return Path(uri[len(SQLITE):]) if uri.startswith(SQLITE) else None
