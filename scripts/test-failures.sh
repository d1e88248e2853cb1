#!/usr/bin/env bash
# Reprints, at the end of a test run, why each failed test failed: its panic message and
# the last lines it printed before (the trial, the seed to replay it with). A CI log is
# often read from its end only, where cargo prints the names of the failures but not why.
# Usage: scripts/test-failures.sh LOG
set -euo pipefail
log=${1:?usage: $0 LOG}
[ -r "$log" ] || { echo "test-failures: cannot read $log" >&2; exit 2; }
awk '
  function flush() {
    if (name == "") return
    print "==== " name
    n = (count < 40) ? count : 40
    for (i = count - n + 1; i <= count; i++) print "  " buf[i % 40]
    print ""
    name = ""; count = 0
  }
  /^---- .* stdout ----$/ { flush(); name = $2; count = 0; in_bt = 0; next }
  name == "" { next }
  /^failures:$/ || /^test result:/ { flush(); next }
  /^stack backtrace:$/ { in_bt = 1; next }
  in_bt && /^(thread |---- )/ { in_bt = 0 }
  in_bt { next }
  { count++; buf[count % 40] = $0 }
  END { flush() }
' "$log" | {
  out=$(cat)
  if [ -n "$out" ]; then
    echo "==================== why the failed tests failed (from $log) ===================="
    printf '%s\n' "$out"
  fi
}
