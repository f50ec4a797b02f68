#!/usr/bin/env bash
# Delete a TPU VM slice (the gs:// workdir is kept).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

MD_USAGE="Usage: launch/delete.sh --name NAME --zone ZONE [--project PROJECT] [--dry-run]"
MD_DESCRIPTION="Deletes the TPU VM slice without prompting ('gcloud compute tpus tpu-vm delete --quiet'). Checkpoints,
metrics and the report live in the gs:// workdir and are not touched."

md_tpu_flags
md_parse "$@"
md_validate_tpu_flags

md_scope_args
run gcloud compute tpus tpu-vm delete "$TPU_NAME" "${MD_SCOPE[@]}" --quiet
