#!/usr/bin/env bash
# The pod image's entrypoint (deploy/docker/Dockerfile{,.cpu}; the Helm chart in deploy/helm/nemovl-trt).
#
# For `nemovl serve ...` it first makes sure the engines and the Triton repository are on the data volume
# (the chart's model-cache PVC), then execs `nemovl serve` on them; any other command runs as given
# (`docker run IMAGE make gpu-acceptance`, `... bash`).
#
#   NEMOVL_DATA         data volume root (PVC mount)                       default /workspace
#   NEMOVL_ENGINES_DIR  engines directory                                   default $NEMOVL_DATA/engines
#   NEMOVL_REPO         Triton model repository                             default $NEMOVL_DATA/repo
#   NEMOVL_TARGET       build target (build_configs/<name>.yaml)            required when NEMOVL_BUILD=1
#   NEMOVL_CHECKPOINT   HF checkpoint directory the engines are built from  required when NEMOVL_BUILD=1
#   NEMOVL_BUILD        1: run `nemovl-build engines` + `repo` first (up-to-date steps are skipped, so a
#                       restart on a warm volume costs seconds); 0: serve what is on the volume
#   NEMOVL_CHECKPOINT_WAIT  seconds to wait for $NEMOVL_CHECKPOINT/config.json before giving up (default 0),
#                       so the checkpoint can be copied into the running pod: copy it to a sibling directory,
#                       then rename it into place (a rename is atomic; a half-copied directory is never seen)
#   NEMOVL_SERVE_ARGS   extra `nemovl serve` flags, split on spaces (the chart passes flags as args instead)
#
# Several pods may share one ReadWriteMany volume: the build runs under an exclusive flock on
# $NEMOVL_DATA/.nemovl-build.lock, so one pod builds and the others wait, then find it up to date.
# A user's mistake (missing checkpoint, no engines and NEMOVL_BUILD=0) is one line on stderr, exit 2.
set -euo pipefail

die() { echo "nemovl-entrypoint: $*" >&2; exit 2; }

if [ "$#" -lt 2 ] || [ "$1" != "nemovl" ] || [ "$2" != "serve" ]; then
  exec "$@"
fi

DATA="${NEMOVL_DATA:-/workspace}"
ENGINES="${NEMOVL_ENGINES_DIR:-$DATA/engines}"
REPO="${NEMOVL_REPO:-$DATA/repo}"
BUILD="${NEMOVL_BUILD:-0}"

attach=0
for a in "$@"; do
  case "$a" in
    --repo|--repo=*|--triton|--triton=*|--triton-url|--triton-url=*) attach=1 ;;  # caller chose the repo / servers
  esac
done

if [ "$attach" = 0 ]; then
  if [ ! -d "$DATA" ] || [ ! -w "$DATA" ]; then
    die "data volume $DATA is missing or not writable by uid $(id -u)"
  fi
  if [ "$BUILD" = 1 ]; then
    [ -n "${NEMOVL_TARGET:-}" ] || die "NEMOVL_BUILD=1 needs NEMOVL_TARGET (a100, l40s, h100, b200, cpu)"
    [ -n "${NEMOVL_CHECKPOINT:-}" ] || die "NEMOVL_BUILD=1 needs NEMOVL_CHECKPOINT (an HF checkpoint directory)"
    wait_s="${NEMOVL_CHECKPOINT_WAIT:-0}"
    case "$wait_s" in ''|*[!0-9]*) die "NEMOVL_CHECKPOINT_WAIT must be a whole number of seconds, got '$wait_s'" ;; esac
    if [ ! -f "$NEMOVL_CHECKPOINT/config.json" ] && [ "$wait_s" -gt 0 ]; then
      echo "nemovl-entrypoint: waiting up to $wait_s s for $NEMOVL_CHECKPOINT/config.json" >&2
      waited=0
      while [ ! -f "$NEMOVL_CHECKPOINT/config.json" ] && [ "$waited" -lt "$wait_s" ]; do
        sleep 1
        waited=$((waited + 1))
      done
    fi
    [ -f "$NEMOVL_CHECKPOINT/config.json" ] \
      || die "checkpoint $NEMOVL_CHECKPOINT has no config.json (copy the checkpoint onto the volume first)"
    (
      flock -x 9
      nemovl-build engines --target "$NEMOVL_TARGET" --checkpoint "$NEMOVL_CHECKPOINT" --out "$ENGINES"
      nemovl-build repo --engines "$ENGINES" --out "$REPO"
    ) 9>"$DATA/.nemovl-build.lock"
  fi
  [ -f "$ENGINES/manifest.json" ] \
    || die "no engines in $ENGINES (no manifest.json); set NEMOVL_BUILD=1 with NEMOVL_TARGET and NEMOVL_CHECKPOINT"
  [ -d "$REPO" ] || die "no Triton repository at $REPO; set NEMOVL_BUILD=1 or run nemovl-build repo"
  set -- "$@" --repo "$REPO" --engines-dir "$ENGINES"
fi

# shellcheck disable=SC2086  # NEMOVL_SERVE_ARGS is a flag list, split on purpose
exec "$@" ${NEMOVL_SERVE_ARGS:-}
