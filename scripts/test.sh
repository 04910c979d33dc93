#!/usr/bin/env bash
# Runs the whole test suite (unit, host and browser tests) after making sure the environment is set up.
# Prints how many host tests ran and how many were skipped. Extra arguments go to pytest.
set -uo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
venv=${NEWBIE_VENV:-$HOME/.cache/comfyui-newbie-lowvram/venv}
bash "$here/scripts/setup.sh" || exit 1
report=$(mktemp -d)/junit.xml
cd "$here"
"$venv/bin/python" -m pytest -q -rs --junitxml="$report" "$@"
rc=$?
"$venv/bin/python" "$here/scripts/count_host_tests.py" "$report" || true
# The Comfy Registry's own check (comfy-cli, from PyPI) in a venv of its own, so its dependencies never touch ComfyUI's.
cli=$(dirname "$venv")/comfy-cli-venv
if [ -x "$cli/bin/comfy" ] || { python3 -m venv "$cli" && "$cli/bin/pip" install -q comfy-cli >/dev/null 2>&1; }; then
  (cd "$here" && "$cli/bin/comfy" --skip-prompt --no-enable-telemetry node validate 2>&1 | tail -n 3) || rc=1
else
  echo "[test] !!! comfy-cli could not be installed; registry fields are still checked by tests/unit/test_registry.py"
fi
# pytest's exit code 5 means "no tests collected": with only host tests selected and no host, that is a skip.
if [ $rc -eq 5 ]; then echo "[test] no tests were collected"; rc=0; fi
exit $rc
