"""Parse the arguments of documented commands with their own parsers, and stop there.

    python tests/support/scripts/parse_only.py COMMANDS.json

COMMANDS.json is a list of argv lists (``["python", "launch/train_cnn.py", "--epochs", "5"]``,
``["python", "-m", "anndist.plot", ...]``). Each runs as ``python`` would run it, in this one process,
until its first ``ArgumentParser.parse_args`` returns (then it stops: nothing trains or benchmarks) or
fails (argparse's error, exit 2). Prints one JSON line per command: ``{"argv", "ok", "error"}``.
Used by tests/test_docs_commands.py for the commands too heavy to run (benchmarks, long runs).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import runpy
import sys


class Parsed(BaseException):
    """Raised once the arguments parsed (a BaseException: an entry point's ``except Exception`` lets it by)."""


def parse_only(argv: list[str]) -> tuple[bool, str]:
    """Run ``argv`` (``python script.py ...`` or ``python -m module ...``) up to its argument parsing."""
    original = argparse.ArgumentParser.parse_args

    def parse_args(self, args=None, namespace=None):
        original(self, args, namespace)
        raise Parsed

    rest = argv[1:]
    module = rest[1] if rest[0] == "-m" else None
    script_args = rest[2:] if module else rest[1:]
    saved_argv, saved_path = sys.argv[:], sys.path[:]
    err = io.StringIO()
    argparse.ArgumentParser.parse_args = parse_args
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            if module:
                sys.argv = [module, *script_args]
                runpy.run_module(module, run_name="__main__", alter_sys=True)
            else:
                sys.argv = [rest[0], *script_args]
                sys.path.insert(0, os.path.dirname(os.path.abspath(rest[0])))
                runpy.run_path(rest[0], run_name="__main__")
        return False, "ran to the end without parsing arguments"
    except Parsed:
        return True, ""
    except SystemExit as exc:  # argparse's error (2), or --help (0)
        return exc.code == 0, err.getvalue().strip()[-2000:]
    except BaseException as exc:  # noqa: BLE001 - reported, one per command
        return False, f"{type(exc).__name__}: {exc}"
    finally:
        argparse.ArgumentParser.parse_args = original
        sys.argv, sys.path[:] = saved_argv, saved_path


def main() -> None:
    with open(sys.argv[1]) as f:
        commands = json.load(f)
    for argv in commands:
        ok, error = parse_only(argv)
        print(json.dumps({"argv": argv, "ok": ok, "error": error}), flush=True)


if __name__ == "__main__":
    main()
