#!/bin/bash
# hog_session.sh CPU COMMAND...: runs COMMAND while a CPU hog (a busy loop) runs pinned to CPU
# ("-": no hog), and stops the hog afterwards.
#
# Priority: on a machine shared with other work, what slows a rank is whatever shares its core,
# and the scheduler spreads the other work so that every core is about as busy. The hog and the
# ranks (pinned_rank.sh) therefore run at the top priority where allowed (root): the nice of their
# sessions' autogroups, which the scheduler weighs against other sessions, and their own nice. They
# then compete with each other only: the rank that shares its core with the hog gets half of it,
# the other rank nearly all of its own. Without the rights, everything runs as it is.
set -uo pipefail
cpu=$1; shift
# A busy loop in a session of its own (a kill of this one does not reach it) that ends with this
# script: it checks that this script's process is still there, and stops after HOG_SECONDS anyway.
# Its output goes nowhere, so that it never holds the caller's pipes open.
busy="import os, time
end = time.monotonic() + ${HOG_SECONDS:-120}
while time.monotonic() < end:
    try:
        os.kill($$, 0)
    except ProcessLookupError:
        break"
hog=
if [[ $cpu != - ]]; then
    setsid bash -c 'echo -20 > /proc/self/autogroup 2>/dev/null; renice -n -20 -p $$ > /dev/null 2>&1
                    exec taskset -c "$1" "${PYTHON:-python}" -c "$2"' hog "$cpu" "$busy" < /dev/null > /dev/null 2>&1 &
    hog=$!
fi
"$@"
status=$?
[[ -n $hog ]] && kill "$hog"
exit "$status"
