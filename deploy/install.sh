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
[ -f deploy/meinheld/meinheld-1.0.2.patch ] && [ -f deploy/meinheld/apply_patch.py ] \
    || { echo "deploy/meinheld/ is missing: it goes wherever install.sh goes" >&2; exit 1; }

"$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
"${pip[@]}" install -U pip setuptools wheel
if [ "${INSTALL_MODE:-editable}" = regular ]; then
    "${pip[@]}" install ".$extras"
else
    "${pip[@]}" install -e ".$extras"
fi

# meinheld 1.0.2 (unmaintained) is built from its PyPI sdist with our patch,
# deploy/meinheld/meinheld-1.0.2.patch (what and why are in its header): a bad
# Upgrade/CONNECT request no longer breaks the next request on its worker, and
# it compiles against greenlet 3's own header. It is built from the patched
# tree, with no cache, and the import check proves the patched build is the
# one installed. It does not import on 3.13+, where the service falls back to
# another worker class (and says so).
meinheld_sha256=008c76937ac2117cc69e032dc69cea9f85fc605de9bac1417f447c41c16a56d6
if "$venv/bin/python" -c 'import sys; sys.exit(sys.version_info >= (3, 13))'; then
    "${pip[@]}" install "greenlet>=3"
    build=$(mktemp -d)
    trap 'rm -rf "$build"' EXIT
    "${pip[@]}" download --no-deps --no-binary :all: --no-cache-dir -d "$build" "meinheld==1.0.2"
    echo "$meinheld_sha256  $build/meinheld-1.0.2.tar.gz" | sha256sum -c --quiet - \
        || { echo "meinheld-1.0.2.tar.gz is not the sdist the patch was made for" >&2; exit 1; }
    tar -xzf "$build/meinheld-1.0.2.tar.gz" -C "$build"
    "$venv/bin/python" deploy/meinheld/apply_patch.py deploy/meinheld/meinheld-1.0.2.patch "$build/meinheld-1.0.2"
    # --no-build-isolation: setup.py finds greenlet.h in this venv's greenlet
    "${pip[@]}" install --no-deps --no-cache-dir --no-build-isolation --force-reinstall "$build/meinheld-1.0.2"
    "$venv/bin/python" -c 'import meinheld.server as s; assert s.CLICK_COUNTER_PATCH == 2' \
        || { echo "meinheld was installed but is not the patched build, or does not import" >&2; exit 1; }
fi
echo "installed into $venv: $("$venv/bin/python" --version), run $venv/bin/counter --help"
