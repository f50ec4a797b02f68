# shellcheck shell=bash
# shellcheck disable=SC2034  # the variables set here are read by the scripts that source this file
# Shared helpers for the mobiledistill TPU VM launch scripts (sourced, never executed).
#
# - flag declaration and parsing (--flag VALUE and --flag=VALUE; --help; --dry-run),
# - `run`: prints a command shell-quoted on one line prefixed with "+ " and, unless --dry-run, executes it,
# - validation of TPU names, zones, accelerator types, gs:// workdirs,
# - the remote layout on every worker: ~/ROOT/{code,venv,logs} (ROOT defaults to "mobiledistill").
#
# Written for bash >= 3.2 (macOS' /bin/bash): no associative arrays, no ${x,,}, no mapfile.

MD_SCRIPT="$(basename "$0")"
MD_LAUNCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
MD_REPO_ROOT="$(cd "$MD_LAUNCH_DIR/.." && pwd)"

DRY_RUN=0

# ----------------------------------------------------------------------------------------------------------------
# Messages
# ----------------------------------------------------------------------------------------------------------------

# die MESSAGE: one line on stderr, exit 2.
die() {
  printf '%s: error: %s\n' "$MD_SCRIPT" "$*" >&2
  exit 2
}

warn() {
  printf '%s: warning: %s\n' "$MD_SCRIPT" "$*" >&2
}

info() {
  printf '%s: %s\n' "$MD_SCRIPT" "$*" >&2
}

# ----------------------------------------------------------------------------------------------------------------
# Quoting and running
# ----------------------------------------------------------------------------------------------------------------

# md_quote ARG: ARG quoted for a POSIX shell exactly like Python's shlex.quote.
md_quote() {
  local LC_ALL=C
  local s=$1 sq="'" esc="'\"'\"'"
  if [[ -z $s ]]; then
    printf "''"
  elif [[ $s =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
    printf '%s' "$s"
  else
    printf "'%s'" "${s//$sq/$esc}"
  fi
}

# md_join ARG...: the arguments quoted and joined by spaces (like Python's shlex.join).
md_join() {
  local out="" a
  for a in "$@"; do
    out+="${out:+ }$(md_quote "$a")"
  done
  printf '%s' "$out"
}

# run CMD ARG...: with --dry-run print "+ CMD ARG..." (shell-quoted) on stdout; otherwise echo it on stderr and run it.
run() {
  if [[ $DRY_RUN == 1 ]]; then
    printf '+ %s\n' "$(md_join "$@")"
  else
    printf '+ %s\n' "$(md_join "$@")" >&2
    "$@"
  fi
}

# note TEXT: a comment line in dry-run output (stdout), an info line otherwise (stderr).
note() {
  if [[ $DRY_RUN == 1 ]]; then
    printf '# %s\n' "$*"
  else
    info "$*"
  fi
}

# md_script_join LINE...: remote shell statements joined into one line ("; " between them, " " after a trailing "&").
md_script_join() {
  local out="" line
  for line in "$@"; do
    if [[ -z $out ]]; then
      out=$line
    elif [[ $out == *'&' ]]; then
      out+=" $line"
    else
      out+="; $line"
    fi
  done
  printf '%s' "$out"
}

# ----------------------------------------------------------------------------------------------------------------
# Flags
# ----------------------------------------------------------------------------------------------------------------
# Declare flags, then call md_parse "$@".  Kinds: value (--x V or --x=V), bool (--x), list (repeatable --x V).

MD_FLAG_NAMES=()
MD_FLAG_VARS=()
MD_FLAG_KINDS=()
MD_FLAG_METAS=()
MD_FLAG_HELPS=()
MD_FLAG_DEFAULTS=()
MD_FLAG_REQUIRED=()

MD_USAGE=""           # "Usage: ..." line(s), set by each script
MD_DESCRIPTION=""     # paragraph printed after the usage line
MD_EPILOG=""          # examples etc.
MD_ACCEPT_OVERRIDES=0 # 1: collect --config.KEY=VALUE arguments into MD_OVERRIDES
MD_ACCEPT_REST=0      # 1: collect everything after "--" into MD_REST
MD_REST_HELP=""
MD_OVERRIDES=()
MD_REST=()

# md_flag NAME VAR META DEFAULT HELP [required]: a flag taking a value.
md_flag() {
  MD_FLAG_NAMES+=("$1")
  MD_FLAG_VARS+=("$2")
  MD_FLAG_KINDS+=("value")
  MD_FLAG_METAS+=("$3")
  MD_FLAG_DEFAULTS+=("$4")
  MD_FLAG_HELPS+=("$5")
  MD_FLAG_REQUIRED+=("${6:-}")
  printf -v "$2" '%s' "$4"
}

# md_bool NAME VAR HELP: a switch; VAR is 0 or 1.
md_bool() {
  MD_FLAG_NAMES+=("$1")
  MD_FLAG_VARS+=("$2")
  MD_FLAG_KINDS+=("bool")
  MD_FLAG_METAS+=("")
  MD_FLAG_DEFAULTS+=("")
  MD_FLAG_HELPS+=("$3")
  MD_FLAG_REQUIRED+=("")
  printf -v "$2" '%s' 0
}

# md_list NAME VAR META HELP: a repeatable flag appended to the array VAR (declare VAR=() first).
md_list() {
  MD_FLAG_NAMES+=("$1")
  MD_FLAG_VARS+=("$2")
  MD_FLAG_KINDS+=("list")
  MD_FLAG_METAS+=("$3")
  MD_FLAG_DEFAULTS+=("")
  MD_FLAG_HELPS+=("$4")
  MD_FLAG_REQUIRED+=("")
}

# The flags every TPU script has.
md_tpu_flags() {
  md_flag name TPU_NAME NAME "" "TPU VM (slice) name" required
  md_flag zone ZONE ZONE "" "zone, e.g. europe-west4-a" required
  md_flag project PROJECT PROJECT "" "Google Cloud project (default: gcloud's configured project)"
}

md_valid_flags() {
  local out="" n
  for n in "${MD_FLAG_NAMES[@]}"; do
    out+="${out:+, }--$n"
  done
  out+=", --dry-run, --help"
  [[ $MD_ACCEPT_OVERRIDES == 1 ]] && out+=", --config.KEY=VALUE"
  [[ $MD_ACCEPT_REST == 1 ]] && out+=", -- ARGS..."
  printf '%s' "$out"
}

md_usage() {
  local i n kind meta left req
  printf '%s\n\n' "$MD_USAGE"
  [[ -n $MD_DESCRIPTION ]] && printf '%s\n\n' "$MD_DESCRIPTION"
  printf 'Flags:\n'
  for i in "${!MD_FLAG_NAMES[@]}"; do
    n=${MD_FLAG_NAMES[$i]}
    kind=${MD_FLAG_KINDS[$i]}
    meta=${MD_FLAG_METAS[$i]}
    left="--$n"
    [[ $kind != bool ]] && left+=" $meta"
    req=""
    if [[ -n ${MD_FLAG_REQUIRED[$i]} ]]; then
      req=" (required)"
    elif [[ -n ${MD_FLAG_DEFAULTS[$i]} ]]; then
      req=" (default: ${MD_FLAG_DEFAULTS[$i]})"
    fi
    [[ $kind == list ]] && req+=" (repeatable)"
    printf '  %-28s %s%s\n' "$left" "${MD_FLAG_HELPS[$i]}" "$req"
  done
  if [[ $MD_ACCEPT_OVERRIDES == 1 ]]; then
    printf '  %-28s %s\n' "--config.KEY=VALUE" "config override passed through to mobiledistill.main (repeatable)"
  fi
  if [[ $MD_ACCEPT_REST == 1 ]]; then
    printf '  %-28s %s\n' "-- ARGS..." "$MD_REST_HELP"
  fi
  printf '  %-28s %s\n' "--dry-run" "print the exact commands (one per line, prefixed '+ ') and exit without running them"
  printf '  %-28s %s\n' "-h, --help" "show this help and exit"
  [[ -n $MD_EPILOG ]] && printf '\n%s\n' "$MD_EPILOG"
  return 0
}

# md_flag_index NAME: prints the index of flag NAME, or fails.
md_flag_index() {
  local i
  for i in "${!MD_FLAG_NAMES[@]}"; do
    if [[ ${MD_FLAG_NAMES[$i]} == "$1" ]]; then
      printf '%s' "$i"
      return 0
    fi
  done
  return 1
}

md_parse() {
  local arg name value has_value idx kind var
  while (($# > 0)); do
    arg=$1
    shift
    case $arg in
      -h | --help)
        md_usage
        exit 0
        ;;
      --dry-run)
        DRY_RUN=1
        continue
        ;;
      --)
        if [[ $MD_ACCEPT_REST == 1 ]]; then
          MD_REST+=("$@")
          break
        fi
        die "unexpected argument '--' (valid flags: $(md_valid_flags))"
        ;;
      --config.*)
        if [[ $MD_ACCEPT_OVERRIDES != 1 ]]; then
          die "unknown flag ${arg%%=*} (valid flags: $(md_valid_flags))"
        fi
        if [[ $arg != *=* || $arg == --config.=* ]]; then
          die "config override '$arg' must have the form --config.KEY=VALUE"
        fi
        MD_OVERRIDES+=("$arg")
        continue
        ;;
      --*) ;;
      *)
        die "unexpected argument '$arg' (valid flags: $(md_valid_flags))"
        ;;
    esac
    name=${arg#--}
    has_value=0
    if [[ $name == *=* ]]; then
      value=${name#*=}
      name=${name%%=*}
      has_value=1
    fi
    if ! idx=$(md_flag_index "$name"); then
      die "unknown flag --$name (valid flags: $(md_valid_flags))"
    fi
    kind=${MD_FLAG_KINDS[$idx]}
    var=${MD_FLAG_VARS[$idx]}
    if [[ $kind == bool ]]; then
      [[ $has_value == 1 ]] && die "flag --$name takes no value"
      printf -v "$var" '%s' 1
      continue
    fi
    if [[ $has_value == 0 ]]; then
      (($# > 0)) || die "flag --$name needs a value (--$name ${MD_FLAG_METAS[$idx]})"
      value=$1
      shift
    fi
    if [[ $kind == list ]]; then
      eval "$var+=(\"\$value\")"
    else
      printf -v "$var" '%s' "$value"
    fi
  done
  md_check_required
}

md_check_required() {
  local i var
  for i in "${!MD_FLAG_NAMES[@]}"; do
    [[ -n ${MD_FLAG_REQUIRED[$i]} ]] || continue
    var=${MD_FLAG_VARS[$i]}
    if [[ -z ${!var} ]]; then
      die "missing required flag --${MD_FLAG_NAMES[$i]} ${MD_FLAG_METAS[$i]} (see --help)"
    fi
  done
}

# ----------------------------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------------------------

md_validate_name() {
  [[ $1 =~ ^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$ ]] ||
    die "invalid --name '$1': lowercase letters, digits and hyphens, starting with a letter, at most 63 characters"
}

md_validate_zone() {
  [[ $1 =~ ^[a-z]+-[a-z]+[0-9]+-[a-z]$ ]] || die "invalid --zone '$1': expected a zone like europe-west4-a or us-central1-f"
}

md_validate_project() {
  [[ -z $1 || $1 =~ ^[a-z][-a-z0-9.:]{4,61}[a-z0-9]$ ]] || die "invalid --project '$1'"
}

md_validate_tpu_flags() {
  md_validate_name "$TPU_NAME"
  md_validate_zone "$ZONE"
  md_validate_project "$PROJECT"
}

# Accelerator types: TPU generation, optional variant letters, then cores or chips: v2-8, v3-512, v4-32, v5litepod-16,
# v5p-8, v6e-8.
md_validate_accelerator() {
  [[ $1 =~ ^v[0-9]+[a-z]*-[0-9]+$ ]] ||
    die "invalid --accelerator-type '$1': expected a TPU type like v3-8, v3-512, v4-32, v5litepod-16, v5p-8, v6e-8"
}

# md_default_runtime ACCELERATOR: the TPU software version (--version) to use with that generation.
md_default_runtime() {
  case $1 in
    v5litepod-* | v5e-*) printf 'v2-alpha-tpuv5-lite' ;;
    v5p-*) printf 'v2-alpha-tpuv5' ;;
    v6e-*) printf 'v2-alpha-tpuv6e' ;;
    *) printf 'tpu-ubuntu2204-base' ;;
  esac
}

# md_normalize_workdir WORKDIR: checks a gs:// URL and prints it without trailing slashes.
md_normalize_workdir() {
  local w=$1
  if [[ $w != gs://* ]]; then
    die "invalid --workdir '$w': it must start with gs:// (every worker of a multi-host slice reads and writes the same workdir, and it must survive preemption)"
  fi
  while [[ $w == */ && $w != gs:// ]]; do w=${w%/}; done
  local bucket=${w#gs://}
  bucket=${bucket%%/*}
  if ! [[ $bucket =~ ^[a-z0-9][-a-z0-9_.]{1,220}[a-z0-9]$ ]]; then
    die "invalid --workdir '$1': '$bucket' is not a valid bucket name"
  fi
  if [[ $w == *$'\n'* || $w == *$'\r'* ]]; then
    die "invalid --workdir: it contains a line break"
  fi
  printf '%s' "$w"
}

md_validate_remote_root() {
  [[ $1 =~ ^[A-Za-z0-9_][A-Za-z0-9._-]*$ ]] ||
    die "invalid --remote-root '$1': a plain directory name under the workers' home directory (letters, digits, . _ -)"
}

md_validate_uint() { # NAME VALUE
  [[ $2 =~ ^[0-9]+$ ]] || die "invalid --$1 '$2': expected a non-negative integer"
}

md_validate_worker() {
  [[ $1 == all || $1 =~ ^[0-9]+$ ]] || die "invalid --worker '$1': expected 'all' or a worker index (0, 1, ...)"
}

md_validate_config() {
  [[ $1 =~ ^[A-Za-z0-9_./-]+\.py(:.*)?$ && $1 != /* ]] ||
    die "invalid --config '$1': expected a config file relative to the repository root, e.g. configs/progressive.py[:variant]"
}

# ----------------------------------------------------------------------------------------------------------------
# gcloud command prefixes and the remote layout
# ----------------------------------------------------------------------------------------------------------------

# md_scope_args: "--zone Z [--project P]" into the array MD_SCOPE.
md_scope_args() {
  MD_SCOPE=(--zone "$ZONE")
  if [[ -n $PROJECT ]]; then
    MD_SCOPE+=(--project "$PROJECT")
  fi
}

# Remote paths, as text for the remote shell ($HOME expands on the worker).  ROOT is validated to need no quoting.
md_remote_paths() { # ROOT
  # shellcheck disable=SC2016  # $HOME must expand on the worker, not here
  MD_R_ROOT='$HOME/'"$1"
  MD_R_CODE="$MD_R_ROOT/code"
  MD_R_VENV="$MD_R_ROOT/venv"
  MD_R_LOGS="$MD_R_ROOT/logs"
  MD_R_PIDFILE="$MD_R_LOGS/main.pid"
  MD_R_SETUP_DONE="$MD_R_ROOT/setup-done"
}

# Remote shell function: is process $1 alive (and not a zombie left by an init that does not reap)?
# shellcheck disable=SC2016  # expands on the worker
MD_R_ALIVE_FN='md_alive() { kill -0 "$1" 2>/dev/null && ! grep -qs "^State:[[:space:]]*Z" "/proc/$1/status"; }'

# md_status_command ROOT: remote command printing one line per worker: MD_STATE=RUNNING|STOPPED|NOSETUP.
md_status_command() {
  md_remote_paths "$1"
  md_script_join \
    "$MD_R_ALIVE_FN" \
    "if [ ! -f \"$MD_R_SETUP_DONE\" ] || [ ! -x \"$MD_R_VENV/bin/python\" ]; then echo \"MD_STATE=NOSETUP \$(hostname)\"" \
    "elif [ -f \"$MD_R_PIDFILE\" ] && md_alive \"\$(cat \"$MD_R_PIDFILE\")\"; then echo \"MD_STATE=RUNNING \$(hostname)\"" \
    "else echo \"MD_STATE=STOPPED \$(hostname)\"" \
    "fi"
}
