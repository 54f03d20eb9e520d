#!/usr/bin/env bash
# Install click-counter and everything it needs into a virtualenv, from the
# package registries alone.   usage: deploy/install.sh [--dev]
#   --dev   also the test tools            env: VENV (.venv), PYTHON (python3),
#                                          INSTALL_MODE (editable | regular)
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${VENV:-.venv}
python=${PYTHON:-python3}
extras=""
if [ "${1:-}" = "--dev" ]; then extras="[test]"; fi

"$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
"${pip[@]}" install -U pip setuptools wheel
if [ "${INSTALL_MODE:-editable}" = regular ]; then
    "${pip[@]}" install ".$extras"
else
    "${pip[@]}" install -e ".$extras"
fi

# meinheld pins greenlet<0.5, which does not build on Python 3.11+: install a
# current greenlet, then meinheld without its pins. It does not import on
# 3.13+, where the service falls back to another worker class (and says so).
if "$venv/bin/python" -c 'import sys; sys.exit(sys.version_info >= (3, 13))'; then
    "${pip[@]}" install "greenlet>=3"
    "${pip[@]}" install --no-deps "meinheld==1.0.2"
    "$venv/bin/python" -c 'import meinheld.server' \
        || { echo "meinheld was installed but does not import" >&2; exit 1; }
fi
echo "installed into $venv: $("$venv/bin/python" --version), run $venv/bin/counter --help"
