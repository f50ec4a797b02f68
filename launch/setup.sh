#!/usr/bin/env bash
# Put the code and its Python environment on every worker of a TPU VM slice.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

MD_USAGE="Usage: launch/setup.sh --name NAME --zone ZONE [--ref HEAD] [--python 3.11] [--python-installer uv|deadsnakes] [--extras tpu] [--remote-root mobiledistill] [--worker all] [--project PROJECT] [--dry-run]"
MD_DESCRIPTION="Copies the repository at a git commit (git archive: uncommitted changes are NOT copied) to
~/ROOT/code on every worker, installs Python (the base image's python3 is older than the project's 3.11) into
~/ROOT/venv and runs 'pip install -e code[EXTRAS]' (jax[tpu] from the 'tpu' extra). Safe to re-run: the code is
replaced, the venv is reused when it has the right Python. Writes ~/ROOT/setup-done (the commit) when it succeeds."
MD_EPILOG="Example:
  launch/setup.sh --name md-v3 --zone europe-west4-a"

md_tpu_flags
md_flag ref REF REF HEAD "git commit (or branch/tag) of this repository to copy"
md_flag python PYTHON_VERSION VERSION 3.11 "Python version to install on the workers"
md_flag python-installer PYTHON_INSTALLER "uv|deadsnakes" uv "how to get that Python: uv (standalone build, no root needed) or deadsnakes (apt PPA)"
md_flag extras EXTRAS EXTRAS tpu "setup.py extras to install, comma-separated"
md_flag remote-root REMOTE_ROOT DIR mobiledistill "directory under the workers' home holding code/, venv/ and logs/"
md_flag worker WORKER "all|N" all "worker(s) to set up: all, or one index to repair a single worker"
md_parse "$@"

md_validate_tpu_flags
md_validate_remote_root "$REMOTE_ROOT"
md_validate_worker "$WORKER"
[[ $PYTHON_VERSION =~ ^3\.[0-9]+$ ]] || die "invalid --python '$PYTHON_VERSION': expected a version like 3.11"
[[ $PYTHON_INSTALLER == uv || $PYTHON_INSTALLER == deadsnakes ]] ||
  die "invalid --python-installer '$PYTHON_INSTALLER': expected uv or deadsnakes"
[[ $EXTRAS =~ ^[A-Za-z0-9_-]+(,[A-Za-z0-9_-]+)*$ ]] || die "invalid --extras '$EXTRAS': expected names like tpu or tpu,tf"

# The exact commit to copy (read-only git queries; nothing is written even without --dry-run).
git -C "$MD_REPO_ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1 ||
  die "$MD_REPO_ROOT is not a git checkout: setup.sh copies the code with git archive"
COMMIT=$(git -C "$MD_REPO_ROOT" rev-parse --verify --quiet "$REF^{commit}") ||
  die "invalid --ref '$REF': not a commit of $MD_REPO_ROOT"
if [[ $REF == HEAD ]] && ! git -C "$MD_REPO_ROOT" diff --quiet HEAD -- 2>/dev/null; then
  warn "the working tree has uncommitted changes; only commit ${COMMIT:0:12} is copied"
fi

ARCHIVE="${TMPDIR:-/tmp}/mobiledistill-$TPU_NAME-code.tar.gz"
ARCHIVE=${ARCHIVE//\/\//\/}
REMOTE_ARCHIVE="$REMOTE_ROOT-code.tar.gz" # in the workers' home directory
md_remote_paths "$REMOTE_ROOT"
PY="python$PYTHON_VERSION"

remote=(
  "set -euo pipefail"
  "mkdir -p \"$MD_R_ROOT\""
  "rm -f \"$MD_R_SETUP_DONE\""
  "rm -rf \"$MD_R_CODE.new\""
  "mkdir -p \"$MD_R_CODE.new\""
  "tar -xzf \"\$HOME/$REMOTE_ARCHIVE\" -C \"$MD_R_CODE.new\""
  "rm -rf \"$MD_R_CODE\""
  "mv \"$MD_R_CODE.new\" \"$MD_R_CODE\""
  "rm -f \"\$HOME/$REMOTE_ARCHIVE\""
)
if [[ $PYTHON_INSTALLER == uv ]]; then
  remote+=(
    "export PATH=\"\$HOME/.local/bin:\$PATH\""
    "if ! command -v uv >/dev/null 2>&1; then curl -LsSf https://astral.sh/uv/install.sh | sh; fi"
    "if [ ! -x \"$MD_R_VENV/bin/$PY\" ]; then rm -rf \"$MD_R_VENV\"; uv venv --seed --python $PYTHON_VERSION \"$MD_R_VENV\"; fi"
    "uv pip install --python \"$MD_R_VENV/bin/python\" -e \"${MD_R_CODE}[$EXTRAS]\""
  )
else
  apt="sudo DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600"
  remote+=(
    "if ! command -v $PY >/dev/null 2>&1; then $apt update -q; $apt install -y -q software-properties-common; sudo add-apt-repository -y ppa:deadsnakes/ppa; $apt update -q; $apt install -y -q $PY $PY-venv; fi"
    "if [ ! -x \"$MD_R_VENV/bin/$PY\" ]; then rm -rf \"$MD_R_VENV\"; $PY -m venv \"$MD_R_VENV\"; fi"
    "\"$MD_R_VENV/bin/python\" -m pip install -q --upgrade pip"
    "\"$MD_R_VENV/bin/python\" -m pip install -e \"${MD_R_CODE}[$EXTRAS]\""
  )
fi
remote+=(
  "\"$MD_R_VENV/bin/python\" -c $(md_quote 'import jax, mobiledistill; print("jax", jax.__version__)')"
  "echo $COMMIT > \"$MD_R_SETUP_DONE\""
  "echo \"\$(hostname): mobiledistill ${COMMIT:0:12} set up in $MD_R_ROOT\""
)

md_scope_args
run git -C "$MD_REPO_ROOT" archive --format=tar.gz -o "$ARCHIVE" "$COMMIT"
run gcloud compute tpus tpu-vm scp "$ARCHIVE" "$TPU_NAME:$REMOTE_ARCHIVE" "${MD_SCOPE[@]}" --worker="$WORKER"
run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${MD_SCOPE[@]}" --worker="$WORKER" --command="$(md_script_join "${remote[@]}")"
run rm -f "$ARCHIVE"
