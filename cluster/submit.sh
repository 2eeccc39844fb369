#!/usr/bin/env bash
# Submit a DiPro job to a running Ray cluster with `ray job submit`.
#
#   cluster/submit.sh train      --config configs/mortality.yaml [key=value ...] [--resume RUN]
#   cluster/submit.sh regenerate --processed /mnt/dipro/processed --out /mnt/dipro/shards
#   cluster/submit.sh shard      --processed /mnt/dipro/processed --out /mnt/dipro/shards
#   cluster/submit.sh evaluate|experiment|sweep|predict|dipro ARGS...   (any other dipro command)
#
# Environment:
#   RAY_ADDRESS          the cluster's dashboard/jobs address, e.g. http://127.0.0.1:8265 (required)
#   RAY_AUTH_MODE=token  and the token (~/.ray/auth_token, RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH),
#                        the same as the cluster's
#   MLFLOW_TRACKING_URI  passed to the job (runtime env) when set, without credentials: a
#                        runtime env is visible to everyone who can list the cluster's jobs, so
#                        user:password@ and ?token= are stripped (a database URI with a password
#                        is not sent at all); the cluster's nodes provide them instead
#                        (MLFLOW_TRACKING_USERNAME / _PASSWORD / _TOKEN, from a secret). Unset:
#                        the cluster nodes' own value is used
#   SUBMIT_FLAGS         extra `ray job submit` flags, e.g. "--no-wait --submission-id dipro-train-1"
#
# The runtime env is cluster/runtime_env.yaml (the repository is uploaded as the
# working dir, data and venvs excluded).  Without --no-wait the script follows
# the job's logs and exits non-zero when the job fails.
set -euo pipefail

usage() { sed -n '2,23p' "$0" | sed 's/^# \{0,1\}//'; }

if [[ $# -lt 1 || "$1" == "-h" || "$1" == "--help" ]]; then usage; exit 0; fi
if [[ -z "${RAY_ADDRESS:-}" ]]; then
  echo "submit.sh: error: set RAY_ADDRESS to the cluster's jobs address (e.g. http://127.0.0.1:8265)" >&2
  exit 2
fi

kind="$1"; shift
case "$kind" in
  regenerate) cmd=(python -m dipro shards regenerate "$@") ;;
  dipro)      cmd=(python -m dipro "$@") ;;
  synth|prepare|shard|shards|train|evaluate|experiment|sweep|registry|predict)
              cmd=(python -m dipro "$kind" "$@") ;;
  *) echo "submit.sh: error: unknown job kind '$kind' (train, regenerate, shard, evaluate, experiment, sweep, predict, dipro)" >&2
     exit 2 ;;
esac

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"   # working_dir "." in runtime_env.yaml is the repository root
if [[ -x "$root/.venv/bin/python" ]]; then py="$root/.venv/bin/python"; else py="python3"; fi
ray_cli="$(dirname "$py")/ray"; [[ -x "$ray_cli" ]] || ray_cli="ray"

runtime_env_json="$("$py" - "$root/cluster/runtime_env.yaml" <<'PY'
import json, os, sys
import yaml
from dipro.tracking.uri import redact_uri, split_credentials
env = yaml.safe_load(open(sys.argv[1]))
uri = os.environ.get("MLFLOW_TRACKING_URI")
if uri:
    clean, creds = split_credentials(uri)
    if redact_uri(clean) != clean:  # e.g. postgresql://user:password@host/db: no safe form to send
        print("submit.sh: MLFLOW_TRACKING_URI holds a password that cannot be moved out of it; not sent "
              "with the job (the cluster nodes' own MLFLOW_TRACKING_URI is used)", file=sys.stderr)
    else:
        if creds:
            print("submit.sh: the credentials in MLFLOW_TRACKING_URI are not sent with the job (a runtime env "
                  "is visible on the cluster); give the cluster MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD "
                  "or MLFLOW_TRACKING_TOKEN from a secret", file=sys.stderr)
        env.setdefault("env_vars", {})["MLFLOW_TRACKING_URI"] = clean
print(json.dumps(env))
PY
)"

# shellcheck disable=SC2086  # SUBMIT_FLAGS is a list of flags on purpose
exec "$ray_cli" job submit --address "$RAY_ADDRESS" --runtime-env-json "$runtime_env_json" \
  ${SUBMIT_FLAGS:-} -- "${cmd[@]}"
