"""Up-front checks of the launcher's arguments and of the services it will talk to, before any trial.

Each failure is a :class:`StudyInputError` that says what is wrong and how to fix it.
"""

from __future__ import annotations

import argparse
import socket
import urllib.error
import urllib.request
from urllib.parse import urlparse

from trainables.errors import StudyInputError

TIMEOUT_S = 5.0


def check_numbers(args: argparse.Namespace) -> None:
    """Resource and count arguments in range."""
    if args.gpus_per_trial is not None and not (
        0 < args.gpus_per_trial <= 1 or (args.gpus_per_trial > 1 and float(args.gpus_per_trial).is_integer())
    ):
        raise StudyInputError(f"--gpus-per-trial must be in (0, 1] or a whole number of GPUs, got {args.gpus_per_trial}")
    if args.cpus_per_trial is not None and args.cpus_per_trial <= 0:
        raise StudyInputError(f"--cpus-per-trial must be > 0, got {args.cpus_per_trial}")
    if args.max_concurrent is not None and args.max_concurrent < 0:
        raise StudyInputError(f"--max-concurrent must be >= 0 (0 = as resources allow), got {args.max_concurrent}")
    if args.max_failures is not None and args.max_failures < 0:
        raise StudyInputError(f"--max-failures must be >= 0, got {args.max_failures}")
    if args.num_samples is not None and args.num_samples < 1:
        raise StudyInputError(f"--num-samples must be >= 1, got {args.num_samples}")
    every = getattr(args, "checkpoint_every_s", None)
    if every is not None and not (every >= 0 and every != float("inf")):
        raise StudyInputError(f"--checkpoint-every-s must be a number of seconds >= 0 (0 = every epoch), got {every}")
    if getattr(args, "seeds", None) is not None and args.seeds < 0:
        raise StudyInputError(f"--seeds must be >= 0, got {args.seeds}")
    if getattr(args, "confirm_runs", None) is not None and args.confirm_runs < 0:
        raise StudyInputError(f"--confirm-runs must be >= 0 (0 = no confirmation on test), got {args.confirm_runs}")
    margin = getattr(args, "margin", None)
    if margin is not None and not 0 <= margin < 1:
        raise StudyInputError(f"--margin must be in [0, 1) (a difference in score, Dice or AUC), got {margin}")


def _tcp(host: str, port: int, what: str, fix: str) -> None:
    try:
        with socket.create_connection((host, port), timeout=TIMEOUT_S):
            return
    except OSError as exc:
        raise StudyInputError(f"{what} {host}:{port} is unreachable ({exc.strerror or exc}); {fix}") from None


def check_ray_address(address: str | None) -> None:
    """A ``HOST:PORT`` or ``ray://HOST:PORT`` address must accept connections (``auto`` is Ray's to find)."""
    if not address or address in ("auto", "local"):
        return
    parsed = urlparse(address if "://" in address else f"gcs://{address}")
    if not parsed.hostname or not parsed.port:
        raise StudyInputError(f"--address {address!r} is not HOST:PORT, ray://HOST:PORT or auto")
    _tcp(parsed.hostname, parsed.port, "Ray cluster at", "start it (ray start --head) or fix --address")


def check_mlflow_uri(uri: str | None) -> None:
    """An ``http(s)://`` tracking server must answer its health endpoint within the timeout."""
    if not uri or not uri.startswith(("http://", "https://")):
        return
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as resp:  # noqa: S310 - the user's own server
            if resp.status >= 400:
                raise StudyInputError(f"MLflow server {uri} answered {resp.status} on /health; check --mlflow-uri")
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):
            return  # alive, behind authentication: MLflow reads the credentials from its environment
        raise StudyInputError(f"MLflow server {uri} answered {exc.code} on /health; check --mlflow-uri") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise StudyInputError(
            f"MLflow server {uri} is unreachable ({reason}); start it (infra/mlflow-server.sh) or fix --mlflow-uri"
        ) from None
