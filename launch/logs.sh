#!/usr/bin/env bash
# Show, follow or fetch the pipeline logs of one worker or of all workers.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

MD_USAGE="Usage: launch/logs.sh --name NAME --zone ZONE [--worker 0|N|all] [--follow] [--lines 100] [--fetch DIR] [--remote-root mobiledistill] [--project PROJECT] [--dry-run]"
MD_DESCRIPTION="Prints the last --lines lines of the newest pipeline log (~/ROOT/logs/latest.log, written by launch/run.sh)
of a worker, or of all workers with each line prefixed by the worker's hostname; --follow keeps streaming (tail -F,
Ctrl-C to stop). --fetch DIR instead copies the whole logs into DIR: DIR/worker-N.log for one worker, one file per
worker named by gcloud ({WORKER_ID}.log) for --worker all."
MD_EPILOG="Examples:
  launch/logs.sh --name md-v3 --zone europe-west4-a --follow
  launch/logs.sh --name md-v3 --zone europe-west4-a --worker all --lines 20
  launch/logs.sh --name md-v3 --zone europe-west4-a --worker all --fetch logs/md-v3"

md_tpu_flags
md_flag worker WORKER "0|N|all" 0 "which worker's log: an index, or all"
md_bool follow FOLLOW "keep streaming new lines (tail -F)"
md_flag lines LINES N 100 "number of last lines to show first"
md_flag fetch FETCH_DIR DIR "" "copy the complete logs into this local directory instead of printing them"
md_flag remote-root REMOTE_ROOT DIR mobiledistill "directory under the workers' home holding code/, venv/ and logs/ (as in setup.sh)"
md_parse "$@"

md_validate_tpu_flags
md_validate_worker "$WORKER"
md_validate_uint lines "$LINES"
md_validate_remote_root "$REMOTE_ROOT"
if [[ -n $FETCH_DIR && $FOLLOW == 1 ]]; then
  die "--fetch and --follow cannot be combined"
fi

md_remote_paths "$REMOTE_ROOT"
LOG="$MD_R_LOGS/latest.log"
md_scope_args

if [[ -n $FETCH_DIR ]]; then
  run mkdir -p "$FETCH_DIR"
  if [[ $WORKER == all ]]; then
    run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${MD_SCOPE[@]}" --worker=all --command="cat \"$LOG\"" \
      --output-directory="$FETCH_DIR"
  else
    run gcloud compute tpus tpu-vm scp "$TPU_NAME:$REMOTE_ROOT/logs/latest.log" "${FETCH_DIR%/}/worker-$WORKER.log" \
      "${MD_SCOPE[@]}" --worker="$WORKER"
  fi
  exit 0
fi

tail_cmd="tail -n $LINES"
[[ $FOLLOW == 1 ]] && tail_cmd+=" -F"
tail_cmd+=" \"$LOG\""
if [[ $WORKER == all ]]; then
  tail_cmd+=" | sed -u \"s/^/\$(hostname): /\""
fi
run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${MD_SCOPE[@]}" --worker="$WORKER" --command="$tail_cmd"
