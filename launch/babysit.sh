#!/usr/bin/env bash
# Keep a (spot) TPU VM slice running the mobiledistill pipeline until it has finished.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

MD_USAGE="Usage: launch/babysit.sh --name NAME --zone ZONE --workdir gs://BUCKET/PATH [--config configs/progressive.py] [--config.KEY=VALUE ...] [--accelerator-type v3-512] [--spot] [--marker GS_URL] [--interval 300] [--max-restarts 10] [--once] [--project PROJECT] [--dry-run] [-- MAIN_ARGS...]"
MD_DESCRIPTION="Every --interval seconds, until the marker (default WORKDIR/report.md, written when the pipeline has
finished) exists ('gcloud storage ls'):
  - slice missing, PREEMPTED or TERMINATED: delete it, create it again (create.sh), set it up (setup.sh) and start the
    pipeline (run.sh --restart), which resumes from the checkpoints in the gs:// workdir;
  - slice READY: ask every worker whether the pipeline is running; if a worker is not set up, run setup.sh and
    run.sh --restart; if it stopped on some worker (crash, host maintenance) restart it everywhere, at most
    --max-restarts times in all before giving up with an error;
  - any other state (CREATING, RESTARTING, REPAIRING, ...): wait.
The code copied to a recreated slice is the commit --ref resolved to when babysit.sh started. Starting babysit.sh on
no slice at all creates it, so this one command runs the whole job. Run it where it can stay up (tmux, a small VM).
With --dry-run it prints the commands of one iteration, every branch, and exits."
MD_EPILOG="Example:
  launch/babysit.sh --name md-v3 --zone europe-west4-a --spot --workdir gs://my-bucket/mobilebert \\
      --config configs/progressive.py"
MD_ACCEPT_OVERRIDES=1
MD_ACCEPT_REST=1
MD_REST_HELP="extra arguments appended to the mobiledistill.main command line (passed to run.sh)"

ENVS=()
md_tpu_flags
md_flag workdir WORKDIR gs://BUCKET/PATH "" "pipeline workdir (as in run.sh)" required
md_flag config CONFIG FILE configs/progressive.py "ml_collections config file, relative to the repository root (as in run.sh)"
md_list env ENVS KEY=VALUE "environment variable for the pipeline processes (as in run.sh)"
md_flag accelerator-type ACCELERATOR TYPE v3-512 "TPU type used when (re)creating the slice (as in create.sh)"
md_flag version RUNTIME_VERSION VERSION "" "TPU software version used when (re)creating the slice (as in create.sh)"
md_bool spot SPOT "(re)create the slice as a spot slice"
md_flag ref REF REF HEAD "git commit copied to (re)created workers (as in setup.sh), resolved once at start"
md_flag python PYTHON_VERSION VERSION 3.11 "Python version on the workers (as in setup.sh)"
md_flag python-installer PYTHON_INSTALLER "uv|deadsnakes" uv "how setup.sh installs Python"
md_flag extras EXTRAS EXTRAS tpu "setup.py extras installed by setup.sh"
md_flag remote-root REMOTE_ROOT DIR mobiledistill "directory under the workers' home holding code/, venv/ and logs/"
md_flag marker MARKER GS_URL "" "object whose existence means the pipeline has finished (default: WORKDIR/report.md)"
md_flag interval INTERVAL SECONDS 300 "seconds between checks, 30 to 3600"
md_flag max-restarts MAX_RESTARTS N 10 "give up after restarting a stopped pipeline on a READY slice this many times"
md_bool once ONCE "run a single iteration and exit (e.g. from cron)"
md_parse "$@"

# ---------------------------------------------------------------------------------------------------- validation
md_validate_tpu_flags
WORKDIR=$(md_normalize_workdir "$WORKDIR")
md_validate_config "$CONFIG"
md_validate_accelerator "$ACCELERATOR"
md_validate_remote_root "$REMOTE_ROOT"
md_validate_uint interval "$INTERVAL"
md_validate_uint max-restarts "$MAX_RESTARTS"
if ((INTERVAL < 30 || INTERVAL > 3600)); then
  die "invalid --interval '$INTERVAL': must be between 30 and 3600 seconds"
fi
if [[ -z $MARKER ]]; then
  MARKER="$WORKDIR/report.md"
fi
[[ $MARKER == gs://?* ]] || die "invalid --marker '$MARKER': it must be a gs:// URL"
COMMIT=$(git -C "$MD_REPO_ROOT" rev-parse --verify --quiet "$REF^{commit}") ||
  die "invalid --ref '$REF': not a commit of $MD_REPO_ROOT"

# ---------------------------------------------------------------------------------------- the sub-script commands
scope=(--name "$TPU_NAME" --zone "$ZONE")
[[ -n $PROJECT ]] && scope+=(--project "$PROJECT")
create_args=("${scope[@]}" --accelerator-type "$ACCELERATOR")
[[ -n $RUNTIME_VERSION ]] && create_args+=(--version "$RUNTIME_VERSION")
[[ $SPOT == 1 ]] && create_args+=(--spot)
setup_args=("${scope[@]}" --ref "$COMMIT" --python "$PYTHON_VERSION" --python-installer "$PYTHON_INSTALLER"
  --extras "$EXTRAS" --remote-root "$REMOTE_ROOT")
run_args=("${scope[@]}" --workdir "$WORKDIR" --config "$CONFIG" --remote-root "$REMOTE_ROOT" --restart)
for kv in ${ENVS[@]+"${ENVS[@]}"}; do
  run_args+=(--env "$kv")
done
run_args+=(${MD_OVERRIDES[@]+"${MD_OVERRIDES[@]}"})
if ((${#MD_REST[@]} > 0)); then
  run_args+=(-- "${MD_REST[@]}")
fi
dry=()
[[ $DRY_RUN == 1 ]] && dry=(--dry-run)

launch() { # SCRIPT ARGS...: run a sibling script (with --dry-run in dry-run mode)
  local script=$1
  shift
  bash "$MD_LAUNCH_DIR/$script" ${dry[@]+"${dry[@]}"} "$@" # --dry-run first: everything after "--" is passed on
}

md_scope_args
describe_cmd=(gcloud compute tpus tpu-vm describe "$TPU_NAME" "${MD_SCOPE[@]}" "--format=value(state)")
marker_cmd=(gcloud storage ls "$MARKER")
status_cmd=(gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${MD_SCOPE[@]}" --worker=all
  "--command=$(md_status_command "$REMOTE_ROOT")")

log() {
  printf '[%s] %s: %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$MD_SCRIPT" "$*" >&2
}

# ---------------------------------------------------------------------------------------------------- dry run
if [[ $DRY_RUN == 1 ]]; then
  note "babysit $TPU_NAME: one iteration (the loop repeats every $INTERVAL s until $MARKER exists)"
  note "finished? (exit 0 when the marker exists)"
  run "${marker_cmd[@]}"
  note "slice state"
  run "${describe_cmd[@]}"
  note "state READY: is the pipeline running on every worker? (one MD_STATE line per worker)"
  run "${status_cmd[@]}"
  note "READY, some worker not set up: set up and start"
  launch setup.sh "${setup_args[@]}"
  launch run.sh "${run_args[@]}"
  note "READY, pipeline stopped on some worker: restart it everywhere (at most $MAX_RESTARTS times)"
  launch run.sh "${run_args[@]}"
  note "state PREEMPTED or TERMINATED (missing: skip the delete): recreate the slice and resume"
  launch delete.sh "${scope[@]}"
  launch create.sh "${create_args[@]}"
  launch setup.sh "${setup_args[@]}"
  launch run.sh "${run_args[@]}"
  note "any other state (CREATING, STARTING, RESTARTING, REPAIRING, ...): wait $INTERVAL s"
  exit 0
fi

# ---------------------------------------------------------------------------------------------------- the loop
# Preflight: let the sub-scripts validate the flags passed on to them now, not after a slice was created.
bash "$MD_LAUNCH_DIR/create.sh" --dry-run "${create_args[@]}" >/dev/null || exit 2
bash "$MD_LAUNCH_DIR/setup.sh" --dry-run "${setup_args[@]}" >/dev/null || exit 2
bash "$MD_LAUNCH_DIR/run.sh" --dry-run "${run_args[@]}" >/dev/null || exit 2
ERR_FILE=$(mktemp "${TMPDIR:-/tmp}/babysit.XXXXXX")
SLEEP_PID=""
cleanup() {
  rm -f "$ERR_FILE"
  if [[ -n $SLEEP_PID ]]; then kill "$SLEEP_PID" 2>/dev/null || true; fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

last_error() { # the last non-empty line gcloud wrote on stderr
  local line
  line=$(grep -v '^[[:space:]]*$' "$ERR_FILE" | tail -n 1 || true)
  printf '%s' "${line:-no error message}"
}

finished() {
  "${marker_cmd[@]}" >/dev/null 2>"$ERR_FILE"
}

slice_state() { # prints READY, PREEMPTED, ..., NOT_FOUND, or UNKNOWN (describe failed for another reason)
  local out
  if out=$("${describe_cmd[@]}" 2>"$ERR_FILE"); then
    out=$(printf '%s' "$out" | tr -d '[:space:]')
    printf '%s' "${out:-UNKNOWN}"
  elif grep -qiE 'NOT_FOUND|not found|does not exist' "$ERR_FILE"; then
    printf 'NOT_FOUND'
  else
    log "describe failed: $(last_error)"
    printf 'UNKNOWN'
  fi
}

start_pipeline() {
  launch run.sh "${run_args[@]}" || log "run.sh failed; will retry"
}

setup_and_start() {
  if launch setup.sh "${setup_args[@]}"; then
    start_pipeline
  else
    log "setup.sh failed; will retry"
  fi
}

restarts=0
iteration() {
  local state out running stopped nosetup
  if finished; then
    log "finished: $MARKER exists"
    exit 0
  fi
  state=$(slice_state)
  case $state in
    READY)
      if ! out=$("${status_cmd[@]}" 2>"$ERR_FILE"); then
        log "could not reach every worker ($(last_error)); will retry"
        return 0
      fi
      running=$(grep -c 'MD_STATE=RUNNING' <<<"$out" || true)
      stopped=$(grep -c 'MD_STATE=STOPPED' <<<"$out" || true)
      nosetup=$(grep -c 'MD_STATE=NOSETUP' <<<"$out" || true)
      if ((nosetup > 0)); then
        log "READY; $nosetup worker(s) not set up: setting up and starting the pipeline"
        setup_and_start
      elif ((stopped > 0)); then
        if finished; then
          log "finished: $MARKER exists"
          exit 0
        fi
        if ((restarts >= MAX_RESTARTS)); then
          die "the pipeline stopped on $stopped worker(s) of a READY slice and was already restarted $restarts times; giving up (see launch/logs.sh; is --marker $MARKER what the pipeline writes at the end?)"
        fi
        restarts=$((restarts + 1))
        log "READY; pipeline stopped on $stopped worker(s), running on $running: restart $restarts of at most $MAX_RESTARTS"
        start_pipeline
      elif ((running > 0)); then
        log "READY; pipeline running on $running worker(s)"
      else
        log "READY; no answer from the workers; will retry"
      fi
      ;;
    PREEMPTED | TERMINATED)
      log "state $state: recreating the slice"
      launch delete.sh "${scope[@]}" || log "delete.sh failed; trying to create anyway"
      if launch create.sh "${create_args[@]}"; then
        setup_and_start
      else
        log "create.sh failed (no capacity?); will retry"
      fi
      ;;
    NOT_FOUND)
      log "no slice named $TPU_NAME: creating it"
      if launch create.sh "${create_args[@]}"; then
        setup_and_start
      else
        log "create.sh failed (no capacity?); will retry"
      fi
      ;;
    *)
      log "state $state: waiting"
      ;;
  esac
}

log "babysitting $TPU_NAME every $INTERVAL s until $MARKER exists (code: ${COMMIT:0:12})"
while true; do
  iteration
  if [[ $ONCE == 1 ]]; then
    exit 0
  fi
  sleep "$INTERVAL" &
  SLEEP_PID=$!
  wait "$SLEEP_PID" || true
  SLEEP_PID=""
done
