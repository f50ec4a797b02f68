#!/usr/bin/env bash
# Start the mobiledistill pipeline on every worker of a TPU VM slice, in the background.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

MD_USAGE="Usage: launch/run.sh --name NAME --zone ZONE --workdir gs://BUCKET/PATH [--config configs/progressive.py] [--config.KEY=VALUE ...] [--env KEY=VALUE ...] [--restart] [--remote-root mobiledistill] [--project PROJECT] [--dry-run] [-- MAIN_ARGS...]"
MD_DESCRIPTION="Runs 'python -m mobiledistill.main --config=CONFIG --workdir=WORKDIR [overrides]' on ALL workers at once
(--worker=all), under nohup, each writing its own log ~/ROOT/logs/main-<UTC time>.log (~/ROOT/logs/latest.log points
to the newest) and its pid to ~/ROOT/logs/main.pid; the ssh returns as soon as the processes are started. Re-running
resumes from the checkpoints in WORKDIR. A worker where the pipeline is still running refuses to start a second copy
unless --restart is given: it then sends SIGTERM (the pipeline saves a checkpoint), waits up to 300 s, and starts again.
Follow the logs with launch/logs.sh."
MD_EPILOG="Examples:
  launch/run.sh --name md-v3 --zone europe-west4-a --workdir gs://my-bucket/mobilebert
  launch/run.sh --name md-v3 --zone europe-west4-a --workdir gs://my-bucket/tiny --config configs/progressive.py:tiny \\
      --config.train.batch_size=4096 '--config.note=first try'"
MD_ACCEPT_OVERRIDES=1
MD_ACCEPT_REST=1
MD_REST_HELP="extra arguments appended to the mobiledistill.main command line"

ENVS=()
md_tpu_flags
md_flag workdir WORKDIR gs://BUCKET/PATH "" "pipeline workdir, shared by all workers and surviving preemption" required
md_flag config CONFIG FILE configs/progressive.py "ml_collections config file (optionally FILE:variant), relative to the repository root"
md_list env ENVS KEY=VALUE "environment variable for the pipeline processes"
md_bool restart RESTART "stop a pipeline that is still running (SIGTERM, then SIGKILL after 300 s) and start again"
md_flag remote-root REMOTE_ROOT DIR mobiledistill "directory under the workers' home holding code/, venv/ and logs/ (as in setup.sh)"
md_parse "$@"

md_validate_tpu_flags
WORKDIR=$(md_normalize_workdir "$WORKDIR")
md_validate_config "$CONFIG"
md_validate_remote_root "$REMOTE_ROOT"
for kv in ${ENVS[@]+"${ENVS[@]}"}; do
  [[ $kv =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "invalid --env '$kv': expected KEY=VALUE"
done

md_remote_paths "$REMOTE_ROOT"
STOP_TIMEOUT=300

main_cmd=("$MD_R_VENV/bin/python" -m mobiledistill.main "--config=$CONFIG" "--workdir=$WORKDIR")
main_cmd+=(${MD_OVERRIDES[@]+"${MD_OVERRIDES[@]}"} ${MD_REST[@]+"${MD_REST[@]}"})
# Quote every argument for the remote shell, except the interpreter path whose $HOME must expand there.
main_line="\"${main_cmd[0]}\" $(md_join "${main_cmd[@]:1}")"

if [[ $RESTART == 1 ]]; then
  running="pid=\$(cat \"$MD_R_PIDFILE\"); echo \"\$(hostname): stopping mobiledistill.main (pid \$pid)\"; kill -TERM \"\$pid\" || true; for _ in \$(seq $STOP_TIMEOUT); do md_alive \"\$pid\" || break; sleep 1; done; kill -KILL \"\$pid\" 2>/dev/null || true"
else
  running="echo \"\$(hostname): mobiledistill.main is already running (pid \$(cat \"$MD_R_PIDFILE\")); use --restart to stop and restart it\" >&2; exit 1"
fi

remote=(
  "set -euo pipefail"
  "if [ ! -f \"$MD_R_SETUP_DONE\" ]; then echo \"\$(hostname): $MD_R_ROOT is not set up; run launch/setup.sh first\" >&2; exit 1; fi"
  "mkdir -p \"$MD_R_LOGS\""
  "$MD_R_ALIVE_FN"
  "if [ -f \"$MD_R_PIDFILE\" ] && md_alive \"\$(cat \"$MD_R_PIDFILE\")\"; then $running; fi"
  "cd \"$MD_R_CODE\""
  "log=\"$MD_R_LOGS/main-\$(date -u +%Y%m%dT%H%M%SZ).log\""
  "ln -sfn \"\$log\" \"$MD_R_LOGS/latest.log\""
  "export PYTHONUNBUFFERED=1"
)
for kv in ${ENVS[@]+"${ENVS[@]}"}; do
  remote+=("export ${kv%%=*}=$(md_quote "${kv#*=}")")
done
remote+=(
  "nohup $main_line > \"\$log\" 2>&1 < /dev/null &"
  "echo \$! > \"$MD_R_PIDFILE\""
  "echo \"\$(hostname): started mobiledistill.main (pid \$!), log \$log\""
)

md_scope_args
run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${MD_SCOPE[@]}" --worker=all --command="$(md_script_join "${remote[@]}")"
