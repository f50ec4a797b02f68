#!/usr/bin/env bash
# Create a TPU VM slice for mobiledistill (default: v3-512, the paper's 256 chips).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

MD_USAGE="Usage: launch/create.sh --name NAME --zone ZONE [--accelerator-type v3-512] [--version VERSION] [--spot] [--project PROJECT] [--dry-run] [-- GCLOUD_ARGS...]"
MD_DESCRIPTION="Creates the TPU VM slice with 'gcloud compute tpus tpu-vm create'. The TPU software version defaults to
tpu-ubuntu2204-base (v2/v3/v4) or the generation's runtime (v5litepod: v2-alpha-tpuv5-lite, v5p: v2-alpha-tpuv5,
v6e: v2-alpha-tpuv6e). Then run launch/setup.sh and launch/run.sh, or let launch/babysit.sh do everything."
MD_EPILOG="Examples:
  launch/create.sh --name md-v3 --zone europe-west4-a --spot
  launch/create.sh --name md-small --zone us-central1-a --accelerator-type v4-32 -- --labels=team=nlp"
MD_ACCEPT_REST=1
MD_REST_HELP="extra arguments appended to 'gcloud compute tpus tpu-vm create' (e.g. --network=..., --labels=...)"

md_tpu_flags
md_flag accelerator-type ACCELERATOR TYPE v3-512 "TPU type: v3-8, v3-512, v4-32, v5litepod-16, ..."
md_flag version RUNTIME_VERSION VERSION "" "TPU software version (default: chosen from the accelerator type)"
md_bool spot SPOT "create a spot (preemptible, discounted) slice; use launch/babysit.sh to survive preemptions"
md_parse "$@"

md_validate_tpu_flags
md_validate_accelerator "$ACCELERATOR"
if [[ -z $RUNTIME_VERSION ]]; then
  RUNTIME_VERSION=$(md_default_runtime "$ACCELERATOR")
fi
[[ $RUNTIME_VERSION =~ ^[A-Za-z0-9][A-Za-z0-9._-]*$ ]] || die "invalid --version '$RUNTIME_VERSION'"

md_scope_args
cmd=(gcloud compute tpus tpu-vm create "$TPU_NAME" "${MD_SCOPE[@]}" --accelerator-type "$ACCELERATOR"
  --version "$RUNTIME_VERSION")
if [[ $SPOT == 1 ]]; then
  cmd+=(--spot)
fi
cmd+=(${MD_REST[@]+"${MD_REST[@]}"})
run "${cmd[@]}"
