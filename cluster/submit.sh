#!/usr/bin/env bash
# Submit a DiPro job to a running Ray cluster with `ray job submit`.
#
#   cluster/submit.sh train      --config configs/mortality.yaml [key=value ...] [--resume RUN]
#   cluster/submit.sh regenerate --processed /mnt/dipro/processed --out /mnt/dipro/shards
#   cluster/submit.sh shard      --processed /mnt/dipro/processed --out /mnt/dipro/shards
#   cluster/submit.sh evaluate|experiment|predict|dipro ARGS...   (any other dipro command)
#
# Environment:
#   RAY_ADDRESS          the cluster's dashboard/jobs address, e.g. http://127.0.0.1:8265 (required)
#   RAY_AUTH_MODE=token  and the token (~/.ray/auth_token, RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH),
#                        the same as the cluster's
#   MLFLOW_TRACKING_URI  passed to the job (runtime env) when set; otherwise the
#                        cluster nodes' own value is used
#   SUBMIT_FLAGS         extra `ray job submit` flags, e.g. "--no-wait --submission-id dipro-train-1"
#
# The runtime env is cluster/runtime_env.yaml (the repository is uploaded as the
# working dir, data and venvs excluded).  Without --no-wait the script follows
# the job's logs and exits non-zero when the job fails.
set -euo pipefail

usage() { sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'; }

if [[ $# -lt 1 || "$1" == "-h" || "$1" == "--help" ]]; then usage; exit 0; fi
if [[ -z "${RAY_ADDRESS:-}" ]]; then
  echo "submit.sh: error: set RAY_ADDRESS to the cluster's jobs address (e.g. http://127.0.0.1:8265)" >&2
  exit 2
fi

kind="$1"; shift
case "$kind" in
  regenerate) cmd=(python -m dipro shards regenerate "$@") ;;
  dipro)      cmd=(python -m dipro "$@") ;;
  synth|prepare|shard|shards|train|evaluate|experiment|registry|predict)
              cmd=(python -m dipro "$kind" "$@") ;;
  *) echo "submit.sh: error: unknown job kind '$kind' (train, regenerate, shard, evaluate, experiment, predict, dipro)" >&2
     exit 2 ;;
esac

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"   # working_dir "." in runtime_env.yaml is the repository root
if [[ -x "$root/.venv/bin/python" ]]; then py="$root/.venv/bin/python"; else py="python3"; fi
ray_cli="$(dirname "$py")/ray"; [[ -x "$ray_cli" ]] || ray_cli="ray"

runtime_env_json="$("$py" - "$root/cluster/runtime_env.yaml" <<'PY'
import json, os, sys
import yaml
env = yaml.safe_load(open(sys.argv[1]))
if os.environ.get("MLFLOW_TRACKING_URI"):
    env.setdefault("env_vars", {})["MLFLOW_TRACKING_URI"] = os.environ["MLFLOW_TRACKING_URI"]
print(json.dumps(env))
PY
)"

# shellcheck disable=SC2086  # SUBMIT_FLAGS is a list of flags on purpose
exec "$ray_cli" job submit --address "$RAY_ADDRESS" --runtime-env-json "$runtime_env_json" \
  ${SUBMIT_FLAGS:-} -- "${cmd[@]}"
