# Sourced by the run scripts: find Python 3.12, create .venv once, install the project into it.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
find_python312() {
  for cand in python3.12 "$(command -v pyenv >/dev/null 2>&1 && PYENV_VERSION=3.12.1 pyenv which python3.12 2>/dev/null)" \
              "$HOME/.pyenv/versions/3.12.1/bin/python3.12" /usr/bin/python3.12 /usr/local/bin/python3.12; do
    [ -n "$cand" ] || continue
    if PYENV_VERSION=3.12.1 "$cand" -c 'import sys; assert sys.version_info[:2] == (3, 12)' >/dev/null 2>&1; then
      echo "$cand"; return 0
    fi
  done
  return 1
}
EXTRAS="${E2F_EXTRAS:-chem,md,test}"
STAMP="$VENV/.installed-$(cat "$ROOT/pyproject.toml" | sha1sum | cut -c1-12)-${EXTRAS//,/_}"
if [ ! -f "$STAMP" ]; then
  PY="$(find_python312)" || { echo "error: Python 3.12 not found (need python3.12 on PATH or pyenv 3.12.x)" >&2; exit 1; }
  [ -x "$VENV/bin/python" ] || PYENV_VERSION=3.12.1 "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
  "$VENV/bin/pip" install -q -e "$ROOT[$EXTRAS]"
  touch "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
