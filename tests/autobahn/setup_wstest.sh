#!/usr/bin/env bash
# Install the Autobahn|Testsuite client (wstest: Python 2 only) next to a Python 2.7 if the machine has
# one, and print the command that starts it (for BERTH_WSTEST; tests/server/test_ws_conformance.py runs
# cases 1-7 with it). Prints nothing and exits 1 when no Python 2.7 is available or the install fails.
set -euo pipefail
py2=""
for candidate in python2.7 "$HOME/.pyenv/versions/2.7.18/bin/python"; do
  if "$candidate" -c 'import sys; assert sys.version_info[:2] == (2, 7)' >/dev/null 2>&1; then
    py2=$(command -v "$candidate"); break
  fi
done
[ -n "$py2" ] || exit 1
dir="${BERTH_CACHE:-$HOME/.cache/berth}/wstest"
if [ ! -f "$dir/ok" ]; then
  mkdir -p "$dir/sdist"
  "$py2" -m pip download -q --no-deps --no-binary :all: autobahntestsuite -d "$dir/sdist" >&2
  tar xzf "$dir"/sdist/autobahntestsuite-*.tar.gz -C "$dir/sdist"
  "$py2" -m pip install -q --target "$dir/site" \
    -r "$(ls -d "$dir"/sdist/autobahntestsuite-*/)autobahntestsuite.egg-info/requires.txt" \
    "$dir"/sdist/autobahntestsuite-*.tar.gz >&2
  cat > "$dir/wstest.py" <<PY
import site, sys
site.addsitedir('$dir/site')
from autobahntestsuite import wstest
sys.argv[0] = 'wstest'
wstest.run()
PY
  touch "$dir/ok"
fi
echo "$py2 $dir/wstest.py"
