#!/usr/bin/env bash
# Installs this checkout as a user installs it (`pip install .`, not editable) into STATE_DIR/pybuild-venv
# and prints the path of its `pybuild`. The benchmarks measure that program: an editable install's import
# hook alone adds about 12 ms to every start, which is not what users run.
#
#   bench/install_pybuild.sh /tmp/peer-bench    # -> /tmp/peer-bench/pybuild-venv/bin/pybuild
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:?usage: install_pybuild.sh STATE_DIR}/pybuild-venv"
unset PYTHONDONTWRITEBYTECODE  # pip compiles the modules at install, as for any user
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV" >&2
"$VENV/bin/pip" install -q "$REPO" >&2
# The version number does not change between commits: reinstall the package itself every time.
"$VENV/bin/pip" install -q --force-reinstall --no-deps "$REPO" >&2
echo "$VENV/bin/pybuild"
