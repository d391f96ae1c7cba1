#!/usr/bin/env bash
# Runs the shared peer benchmark with pybuild as its "custom" builder, so pybuild, Buildah and BuildKit build the
# same cases (trivial = one `RUN true`, the fixed overhead; a-multistage; b-srcrepo; c-manysteps) in one run.
#
#   bench/peer_bench.sh                       # buildah docker-buildkit custom(pybuild), 3 reps
#   BENCH_REPS=5 BENCH_CASES="trivial b-srcrepo" bench/peer_bench.sh custom buildah
#
# Env: PEER_BENCH_DIR (default <repo>/../shared/bench), PYBUILD (default: this checkout installed by
#      bench/install_pybuild.sh into $BENCH_STATE/pybuild-venv, as `pip install .` installs it),
#      PYBUILD_ROOT (default $BENCH_STATE/pybuild-root: wiped before every cold build), and everything
#      peer-bench.sh reads (BENCH_STATE, BENCH_REPS, BENCH_CASES, BENCH_BUILD_ARGS, ...; see its --help).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PEER="${PEER_BENCH_DIR:-$(dirname "$REPO")/shared/bench}"
[ -x "$PEER/peer-bench.sh" ] || { echo "error: no peer benchmark at $PEER (set PEER_BENCH_DIR)" >&2; exit 1; }
export BENCH_STATE="${BENCH_STATE:-${TMPDIR:-/tmp}/peer-bench}"
unset PYTHONDONTWRITEBYTECODE
if [ -n "${PYBUILD:-}" ]; then
  [ -x "$PYBUILD" ] || { echo "error: $PYBUILD not found (set PYBUILD to a pybuild program)" >&2; exit 1; }
  # Run it as an installed package runs: from compiled bytecode. Were PYBUILD an editable install,
  # every module would otherwise be recompiled on every build under PYTHONDONTWRITEBYTECODE=1.
  "$(dirname "$PYBUILD")/python" -m compileall -q "$REPO/builder" "$REPO/parser" "$REPO/cache" >/dev/null
else
  PYBUILD="$("$REPO/bench/install_pybuild.sh" "$BENCH_STATE")"  # compiled by pip at install
fi
export PYBUILD_ROOT="${PYBUILD_ROOT:-$BENCH_STATE/pybuild-root}"
case "$PYBUILD_ROOT" in "$BENCH_STATE"/*) ;; *) echo "error: PYBUILD_ROOT must be under BENCH_STATE: cold runs wipe it" >&2; exit 1;; esac

# The shared base archive names its image only "latest"; a copy named as the cases' FROM says loads by that name.
FIXTURE="$BENCH_STATE/fixtures/busybox-base.oci.tar"
[ -f "$FIXTURE" ] || (cd "$PEER" && IMPORT=0 ./make-base.sh >&2)
NAMED_BASE="$BENCH_STATE/fixtures/busybox-base.pybuild.oci.tar"
if [ ! -f "$NAMED_BASE" ] || [ "$FIXTURE" -nt "$NAMED_BASE" ]; then
  rm -f "$NAMED_BASE"
  skopeo copy -q "oci-archive:$FIXTURE" "oci-archive:$NAMED_BASE:localhost/busybox-base:latest"
fi

q() { printf '%q' "$1"; }
export BENCH_CUSTOM_NAME="${BENCH_CUSTOM_NAME:-pybuild}"
# cold = no store and no cache at all, then the base loaded as the others get it (untimed)
export BENCH_CUSTOM_CLEAN="rm -rf $(q "$PYBUILD_ROOT") && $(q "$PYBUILD") load -i $(q "$NAMED_BASE") >/dev/null"
export BENCH_CUSTOM_BUILD="$(q "$PYBUILD") build --progress plain ${BENCH_BUILD_ARGS:-} -t {tag} -f {dockerfile} {ctx}"
export BENCH_CUSTOM_EXPORT="$(q "$PYBUILD") save -o {out} {tag}"
# bytes of the image's layers as stored (compressed), from the store's own accounting
export BENCH_CUSTOM_SIZE="$(q "$(dirname "$PYBUILD")/python") -c 'import sys; import os; from builder.oci.store import ImageStore; print(ImageStore(os.environ[\"PYBUILD_ROOT\"]).resolve(sys.argv[1]).size)' {tag}"

[ $# -gt 0 ] || set -- buildah docker-buildkit custom
exec "$PEER/peer-bench.sh" "$@"
