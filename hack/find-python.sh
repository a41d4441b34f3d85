#!/usr/bin/env bash
# Prints the path of a working Python 3.12 interpreter, or explains how to get one.
# Juturna 2.1.1 needs Python >= 3.12, and its telemetry breaks on 3.13, so 3.12 it is.
set -u
candidates=("${PYTHON312:-}" python3.12 "$HOME"/.pyenv/versions/3.12*/bin/python3.12)
for c in "${candidates[@]}"; do
  [ -n "$c" ] || continue
  if out=$("$c" -c 'import sys; print(sys.executable) if sys.version_info[:2] == (3, 12) else sys.exit(1)' 2>/dev/null); then
    echo "$out"; exit 0
  fi
done
# printf is a builtin: this message must show even on a machine that lacks coreutils on PATH.
printf '%s\n' >&2 \
  "error: no Python 3.12 found. juturna-operator runs Juturna 2.1.1, which needs Python 3.12" \
  "(3.11 is too old, and Juturna's telemetry breaks on 3.13)." \
  "Fix: install it (apt-get install python3.12 python3.12-venv, or pyenv install 3.12)," \
  "or point PYTHON312=/path/to/python3.12 at one, then run make again."
exit 1
