"""A torchrun worker for tests/e2e/test_launcher.py, chosen by MODE:

  exit75, exit1   exit with that status at once (75: what anndist's ranks do after a preemption)
  term75          say "ready", then exit 75 on SIGTERM (as anndist's ranks do: save, exit 75)
  term            say "ready", then die of SIGTERM (a program that does not handle it)
"""
import os
import signal
import sys

mode = os.environ["MODE"]
if mode.startswith("exit"):
    sys.exit(int(mode[len("exit"):]))
if mode == "term75":
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(75))
print(f"ready {os.environ['RANK']}", flush=True)
while True:
    signal.pause()
