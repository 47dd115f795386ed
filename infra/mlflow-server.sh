#!/usr/bin/env bash
# The study's MLflow tracking server: a SQL backend store (a SQLite file on shared storage, or a PostgreSQL
# URL) and an artifact root on shared storage. Only the launcher's driver writes to it (one Tune callback),
# so the workers never need to reach it; the UI and other readers do.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(dirname "$HERE")"
if [[ -z "${MLFLOW:-}" ]]; then
    if [[ -x "$REPO/.venv/bin/mlflow" ]]; then MLFLOW="$REPO/.venv/bin/mlflow"; else MLFLOW="mlflow"; fi
fi

ROOT="runs/mlflow"
BACKEND=""
ARTIFACTS=""
HOST="127.0.0.1"
PORT="5000"
WORKERS="2"
ALLOWED_HOSTS=""
AUTH=0
DRY_RUN=0

usage() {
    cat <<EOF
usage: infra/mlflow-server.sh [--root DIR] [--backend-store-uri URI] [--artifacts DIR|URI]
                              [--host HOST] [--port PORT] [--workers N] [--allowed-hosts LIST]
                              [--auth] [--dry-run]

Starts \`mlflow server\` for the study (in the foreground; Ctrl-C stops it).

  --root DIR               shared folder for the store and artifacts (default: $ROOT)
  --backend-store-uri URI  the SQL backend store (default: sqlite:///DIR/mlflow.db); for several
                           readers and writers use PostgreSQL, e.g. postgresql://mlflow@db-host:5432/mlflow
                           (the password from ~/.pgpass or PGPASSWORD, never on the command line)
  --artifacts DIR|URI      the artifact root (default: DIR/artifacts; s3://bucket/prefix works too)
  --host HOST              the interface to bind (default: 127.0.0.1, this machine only). Bind another
                           address only behind authentication (see below)
  --port PORT              default $PORT
  --workers N              server worker processes (default $WORKERS)
  --allowed-hosts LIST     Host headers the server accepts (MLflow's default: localhost and private IPs);
                           set it to the public name when a proxy serves it under one
  --auth                   MLflow's basic-auth app (--app-name basic-auth; needs pip install 'mlflow[auth]'):
                           users in DIR/basic_auth.db; the first start needs MLFLOW_AUTH_ADMIN_PASSWORD set
  --dry-run                print the command, start nothing

Then point the study at it:
  python -m study.launch --grid full --mlflow-uri http://HOST:PORT [--address auto --storage /shared/...]

Authentication in front of it (anything bound beyond 127.0.0.1 must have one):
  * MLflow's own basic auth: --auth here, then clients set MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD
    (change the admin password after the first start; add users through the REST API or the UI).
  * or keep --host 127.0.0.1 and put a reverse proxy with authentication and TLS in front (nginx/Caddy with
    basic auth or an OAuth2 proxy), and --allowed-hosts set to the proxy's public name.
  * or no listener at all: reach it through an SSH tunnel, ssh -L 5000:127.0.0.1:5000 head-node.
EOF
}

while [[ $# -gt 0 ]]; do
    case "$1" in
        --root) ROOT="$2"; shift 2 ;;
        --backend-store-uri|--backend) BACKEND="$2"; shift 2 ;;
        --artifacts) ARTIFACTS="$2"; shift 2 ;;
        --host) HOST="$2"; shift 2 ;;
        --port) PORT="$2"; shift 2 ;;
        --workers) WORKERS="$2"; shift 2 ;;
        --allowed-hosts) ALLOWED_HOSTS="$2"; shift 2 ;;
        --auth) AUTH=1; shift ;;
        --dry-run) DRY_RUN=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "error: unknown option $1" >&2; usage >&2; exit 2 ;;
    esac
done

[[ "$PORT" =~ ^[0-9]+$ ]] || { echo "error: --port must be a number, got '$PORT'" >&2; exit 2; }
mkdir -p "$ROOT"
ROOT="$(cd "$ROOT" && pwd)"
BACKEND="${BACKEND:-sqlite:///$ROOT/mlflow.db}"
ARTIFACTS="${ARTIFACTS:-$ROOT/artifacts}"
case "$BACKEND" in
    sqlite:*|postgresql:*|postgresql+*:*|mysql:*|mysql+*:*|mssql:*|mssql+*:*) ;;
    *) echo "error: --backend-store-uri must be a SQLAlchemy URL (sqlite:///..., postgresql://...), got '$BACKEND'" >&2
       exit 2 ;;
esac
[[ "$ARTIFACTS" == *://* ]] || mkdir -p "$ARTIFACTS"

cmd=("$MLFLOW" server --backend-store-uri "$BACKEND" --artifacts-destination "$ARTIFACTS" --serve-artifacts
     --host "$HOST" --port "$PORT" --workers "$WORKERS")
if (( AUTH )); then
    export MLFLOW_AUTH_CONFIG_PATH="${MLFLOW_AUTH_CONFIG_PATH:-$ROOT/basic_auth.ini}"
    if [[ ! -f "$MLFLOW_AUTH_CONFIG_PATH" ]]; then
        cat >"$MLFLOW_AUTH_CONFIG_PATH" <<EOF
[mlflow]
default_permission = READ
database_uri = sqlite:///$ROOT/basic_auth.db
admin_username = admin
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
EOF
    fi
    cmd+=(--app-name basic-auth)
fi

[[ -n "$ALLOWED_HOSTS" ]] && cmd+=(--allowed-hosts "$ALLOWED_HOSTS")
if [[ "$HOST" != "127.0.0.1" && "$HOST" != "localhost" && "$HOST" != "::1" ]] && (( ! AUTH )); then
    echo "warning: binding $HOST without --auth: anyone who reaches this port can read and change every run." >&2
    echo "         Use --auth, or bind 127.0.0.1 behind an authenticating reverse proxy (see --help)." >&2
fi

mask() { sed -E 's#(://[^:/@ ]+):[^@ ]*@#\1:***@#g'; }  # never print a password from a URL
shown_host="$HOST"; [[ "$HOST" == "0.0.0.0" || "$HOST" == "::" ]] && shown_host="$(hostname)"
echo "MLflow tracking server: http://$shown_host:$PORT  (backend $(mask <<<"$BACKEND"), artifacts $ARTIFACTS)"
echo "study:  python -m study.launch ... --mlflow-uri http://$shown_host:$PORT"
if (( DRY_RUN )); then
    printf '%q ' "${cmd[@]}" | mask; echo
    exit 0
fi
# The study needs no server-side jobs (MLflow's GenAI evaluation/trace job runner: several huey processes
# and a slower start); set MLFLOW_SERVER_ENABLE_JOB_EXECUTION=true to have them.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"
if (( AUTH )); then
    "$(dirname "$(command -v "$MLFLOW")")/python" -c 'import flask_wtf' 2>/dev/null \
        || { echo "error: --auth needs MLflow's auth extra: pip install 'mlflow[auth]'" >&2; exit 1; }
fi
exec "${cmd[@]}"
