#!/usr/bin/env bash
# Installs this checkout as a user installs it (`pip install .`, not editable) into STATE_DIR/pybuild-venv
# and prints the path of its `pybuild`. The benchmarks measure that program: an editable install's import
# hook alone adds about 12 ms to every start, which is not what users run.
#
#   bench/install_pybuild.sh /tmp/peer-bench    # -> /tmp/peer-bench/pybuild-venv/bin/pybuild
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:?usage: install_pybuild.sh STATE_DIR}/pybuild-venv"
# The interpreter is the one the README's users get: Debian 12's own /usr/bin/python3. A python3 earlier on PATH
# (a pyenv build, say) can be built without profile-guided optimisation and start pybuild a fifth slower, which
# would measure that build, not pybuild. PYBUILD_PYTHON picks another; the venv is remade when it changes.
PYTHON="${PYBUILD_PYTHON:-$(if [ -x /usr/bin/python3 ]; then echo /usr/bin/python3; else command -v python3; fi)}"
unset PYTHONDONTWRITEBYTECODE  # pip compiles the modules at install, as for any user
if [ "$(cat "$VENV/made-with" 2>/dev/null)" != "$PYTHON" ]; then
  rm -rf "$VENV"
  "$PYTHON" -m venv "$VENV" >&2
  echo "$PYTHON" > "$VENV/made-with"
fi
"$VENV/bin/pip" install -q "$REPO" >&2
# The version number does not change between commits: reinstall the package itself every time.
"$VENV/bin/pip" install -q --force-reinstall --no-deps "$REPO" >&2
echo "$VENV/bin/pybuild"
