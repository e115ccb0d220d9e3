#!/bin/bash
# Runs "$@" pinned with taskset to the CPU that PIN_CPUS ("0,1": one per local rank) gives this
# LOCAL_RANK, at the top priority where allowed (see hog_session.sh). torchrun starts it per rank
# with --no-python, so that each rank has a core of its own, or one shared with the CPU hog.
set -euo pipefail
IFS=, read -r -a cpus <<< "${PIN_CPUS:?set PIN_CPUS, e.g. 0,1}"
# torchrun starts each worker in a session of its own, which the scheduler weighs as a group.
echo -20 > /proc/self/autogroup 2>/dev/null || true
renice -n -20 -p $$ > /dev/null 2>&1 || true
exec taskset -c "${cpus[$LOCAL_RANK]}" "$@"
