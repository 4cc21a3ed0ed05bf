"""Writing params and metrics to a run by id, within MLflow's limits, with URL passwords hidden."""
from __future__ import annotations

import re
import time
from typing import Any

MAX_PARAM_LEN = 6000        # MLflow 3's limit on a param value
MAX_KEY_LEN = 250

_URL_CREDENTIALS = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^/@:\s]*):(?P<secret>[^/@\s]+)@")


def redact(text: str) -> str:
    """Hide the password of `scheme://user:password@host` URLs (a tracking URI in a config, say)."""
    return _URL_CREDENTIALS.sub(lambda m: f"{m['scheme']}{m['user']}:***@", text)


def flat_params(params: dict[str, Any]) -> dict[str, str]:
    out = {}
    for k, v in params.items():
        s = "" if v is None else redact(str(v))
        out[k[:MAX_KEY_LEN]] = s[:MAX_PARAM_LEN]
    return out


def log_params(c, run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param

    items = [Param(k, v) for k, v in flat_params(params).items()]
    for i in range(0, len(items), 100):
        c.log_batch(run_id, params=items[i:i + 100])


def log_metrics(c, run_id: str, metrics: dict[str, Any], step: int | None = None) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [Metric(k[:MAX_KEY_LEN], float(v), now, step or 0) for k, v in metrics.items()
             if isinstance(v, (int, float)) and not isinstance(v, bool)]
    for i in range(0, len(items), 500):
        c.log_batch(run_id, metrics=items[i:i + 500])
