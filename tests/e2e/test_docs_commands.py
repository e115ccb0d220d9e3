"""Every command in README.md, launch/README.md and docs/*.md runs as written, from a fresh clone.

The commands are read from the documents themselves: each line of a fenced ``bash`` block, and each
``$ `` line of another block. ``HOW`` says how each one is checked, and a command missing from it
(or an entry no document holds any more) fails ``test_every_documented_command_is_checked``:

- ``run``: for real, in doc order, in a copy of the checkout as a clone has it (git's files, no
  build outputs, no ``runs/``), with ``PYTHONPATH`` on the copy as the editable install puts it;
  the exit status must be the one given (75 for a preemption);
- ``parse``: too long or too heavy to run here (benchmarks, 4 processes, several nodes): the
  command's own argument parsers accept it: the script's ``argparse`` (tests/support/scripts/parse_only.py
  stops right after it), torchrun's parser, and the launch scripts' assembly of the torchrun command
  (run against a stand-in ``torchrun`` that records its arguments);
- ``pip``: ``pip install --dry-run --no-index`` of the same arguments (no download: what the extras
  name is installed here), and every extra it names exists in pyproject.toml;
- ``slurm``: a batch script passes ``bash -n`` and its entry script parses its arguments (with the
  ``parse`` ones); ``squeue``, ``scancel`` and ``tail`` know the options given (``--help`` after them
  exits 0; a ``<jobid>`` cannot run, and no controller is needed);
- ``help``: a server (``tensorboard``) lists the options given in its ``--help``;
- ``quickstart``: the README's two lines, part by part: the venv is created and activates, the pip
  parts as ``pip``, ``bash launch/torchrun.sh`` for real, ``pytest -n 2 -rs`` collects.

The two scripts of docs/migration.md (transformers' Trainer and anndist on the same GPT-2 job) run too.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from support import ROOT, child_env

DOCS = ("README.md", "launch/README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md")))
LIMIT_S = 240

HOW: dict[str, tuple] = {
    # README.md
    "python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 --index-url "
    "https://download.pytorch.org/whl/cpu && pip install -e '.[examples]' --config-settings editable_mode=compat "
    "&& bash launch/torchrun.sh": ("quickstart",),
    "pip install -e '.[test]' --config-settings editable_mode=compat && python -m pytest -n 2 -rs": ("quickstart",),
    "python launch/train_digits.py --epochs 5": ("parse",),  # the quickstart trains the same under torchrun
    "bash launch/torchrun.sh --epochs 20": ("parse",),  # the quickstart runs it (20 is the default)
    "NNODES=2 RDZV_HOST=node0 bash launch/torchrun_multinode.sh": ("parse",),
    "sbatch slurm/single_node.sbatch launch/train_digits.py --epochs 20 --checkpoint-dir runs/ckpt": ("slurm",),
    "sbatch slurm/multi_node.sbatch launch/train_digits.py --epochs 20 --checkpoint-dir runs/ckpt": ("slurm",),
    "sbatch slurm/srun_tasks.sbatch launch/train_digits.py --epochs 20 --checkpoint-dir runs/ckpt": ("slurm",),
    "squeue --me": ("slurm",),
    "tail -f anndist-<jobid>.out": ("slurm",),
    "scancel --batch --signal=USR1 <jobid>": ("slurm",),
    # launch/README.md
    "pip install -e '.[examples]' --config-settings editable_mode=compat": ("pip",),
    "pip install -e '.[hf,mlflow]' --config-settings editable_mode=compat": ("pip",),
    "python launch/train_cnn.py --max-steps 5": ("run", 0),
    "python launch/train_cnn.py --epochs 5": ("parse",),
    "bash launch/torchrun.sh --script launch/train_cnn.py --epochs 5": ("parse",),
    "NPROC=4 bash launch/torchrun.sh --script launch/custom_callbacks.py": ("parse",),
    "torchrun --standalone --nproc_per_node=2 launch/custom_callbacks.py --patience 5": ("parse",),
    "NNODES=2 RDZV_HOST=node0 bash launch/torchrun_multinode.sh --script launch/train_cnn.py": ("parse",),
    "bash launch/torchrun.sh --epochs 20 --log-dir runs/digits --profile --tensorboard --trace-steps 5 10": ("run", 0),
    "python -m anndist.plot runs/digits/metrics.jsonl -o runs/digits/curves.png": ("run", 0),
    "tensorboard --logdir runs/digits/tb": ("help",),
    "python launch/checkpoint_resume.py --checkpoint-dir runs/resume --preempt-at-step 50": ("run", 75),
    "python launch/checkpoint_resume.py --checkpoint-dir runs/resume": ("run", 0),
    "python launch/checkpoint_resume.py --checkpoint-dir runs/resume --resume-from "
    "runs/resume/step-000000400.ckpt": ("run", 0),
    "torchrun --standalone --nproc_per_node=2 --max-restarts=1 launch/checkpoint_resume.py --checkpoint-dir "
    "runs/resume --preempt-at-step 50": ("parse",),
    "sbatch slurm/single_node.sbatch launch/checkpoint_resume.py --checkpoint-dir runs/resume --epochs 50": ("slurm",),
    "sbatch slurm/multi_node.sbatch launch/checkpoint_resume.py --checkpoint-dir runs/resume --epochs 50": ("slurm",),
    # docs/benchmarks.md (run by hand: minutes each)
    "pip install torch==2.13.0 -e '.[bench]' --config-settings editable_mode=compat": ("pip",),
    "python tests/bench/compare_peers.py --json peers.json": ("parse",),
    "python tests/bench/bench_scale.py --json scale.json": ("parse",),
    "python tests/bench/bench_scale.py --from-json scale.json": ("parse",),
    "python tests/bench/peers/interleaved.py --nprocs 1 --steps 1000 --epochs 3": ("parse",),
    "python tests/bench/peers/interleaved.py --nprocs 2 --steps 500 --epochs 3": ("parse",),
    "python tests/bench/peers/alternating.py --nprocs 1 --reps 100 --steps 100": ("parse",),
    "python tests/bench/peers/alternating.py --nprocs 2 --reps 60 --steps 100": ("parse",),
    "python tests/bench/peers/instructions.py --nprocs 1": ("parse",),
    "python tests/bench/peers/interleaved.py --nprocs 1 --steps 1000 --epochs 3 --own-cost": ("parse",),
    "python tests/bench/peers/interleaved.py --nprocs 2 --steps 500 --epochs 3 --own-cost": ("parse",),
    "python tests/bench/peers/interleaved.py --nprocs 1 --size large --steps 50 --epochs 2 --own-cost": ("parse",),
    "python tests/bench/peers/alternating.py --nprocs 1 --reps 100 --steps 100 --own-cost": ("parse",),
    "python tests/bench/peers/alternating.py --nprocs 2 --reps 60 --steps 100 --own-cost": ("parse",),
    "python tests/bench/peers/ablations.py --nprocs 1 --steps 1000 --epochs 3 --rounds 2": ("parse",),
    "python tests/bench/peers/ablations.py --nprocs 2 --steps 500 --epochs 3 --rounds 2": ("parse",),
    "python tests/bench/peers/ablations.py --nprocs 1 --checks --rounds 2": ("parse",),
    "python tests/bench/compare_peers.py --sizes small --nprocs 1,2 --reps 3 --no-audit": ("parse",),
    "python tests/bench/compare_peers.py --sizes small --nprocs 1,2 --reps 3 --no-audit --compile": ("parse",),
    "python tests/bench/peers/step_parts.py --nprocs 2": ("parse",),
    "python tests/bench/peers/step_parts.py --nprocs 1": ("parse",),
    # docs/slurm.md (pre-flight), docs/parallelism.md
    "PREFLIGHT=1 sbatch slurm/multi_node.sbatch launch/train_digits.py --checkpoint-dir runs/ckpt": ("slurm",),
    "PREFLIGHT=strict sbatch slurm/multi_node.sbatch launch/train_digits.py --checkpoint-dir runs/ckpt": ("slurm",),
    "torchrun --nproc_per_node=8 -m anndist.preflight --strict launch/train_digits.py --checkpoint-dir runs/ckpt":
        ("parse",),  # 8 ranks; tests/e2e/test_preflight_torchrun.py runs the check for real on 2
    "srun python -m anndist.preflight --checkpoint-size 20G launch/train_digits.py": ("parse",),
    "torchrun --standalone --nproc_per_node=4 launch/train_gpt2.py --tp 2 --strategy fsdp --max-steps 30":
        ("parse",),  # tests/e2e/test_tensor_parallel.py runs the example on 4 ranks
    # docs/elastic.md (tests/e2e/test_elastic.py runs an elastic job for real, with a script of its own)
    "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun --nnodes=1:2 --nproc-per-node=1 --max-restarts=3 "
    "--rdzv-backend=c10d --rdzv-endpoint=HOST:29400 --rdzv-id=job1 "
    "--rdzv-conf=last_call_timeout=2,keep_alive_interval=2,keep_alive_max_attempt=5 "
    "launch/train_digits.py --global-batch-size 64 --checkpoint-dir runs/elastic --checkpoint-every 10": ("parse",),
    # docs/fsdp.md, docs/observability.md
    "OMP_NUM_THREADS=1 python tests/bench/bench_fsdp_memory.py": ("parse",),
    "ls -l runs/digits/traces": ("run", 0),  # after launch/README.md's run with --trace-steps 5 10
}


# ------------------------------------------------------------------ reading the documents
def documented_commands(doc: str) -> list[tuple[int, str]]:
    """``(line, command)`` of each command in ``doc``: continuation lines joined, comments dropped."""
    commands, lang, body = [], None, None
    for number, line in enumerate((ROOT / doc).read_text().splitlines(), 1):
        if line.startswith("```"):
            if body is None:
                lang, body = line[3:].strip(), []
                continue
            for start, text in _logical(body):
                if lang not in ("bash", "sh", "shell"):
                    if not text.startswith("$ "):
                        continue
                    text = text[2:]
                text = re.split(r"\s+#\s", " " + text.strip(), maxsplit=1)[0].strip()  # a trailing comment
                if text and not text.startswith("#"):
                    commands.append((start, " ".join(text.split())))
            body = None
        elif body is not None:
            body.append((number, line))
    return commands


def _logical(lines: list[tuple[int, str]]) -> list[tuple[int, str]]:
    joined: list[tuple[int, str]] = []
    for number, line in lines:
        if joined and joined[-1][1].endswith("\\"):
            joined[-1] = (joined[-1][0], joined[-1][1][:-1] + " " + line.strip())
        else:
            joined.append((number, line))
    return joined


def all_commands() -> list[tuple[str, int, str]]:
    return [(doc, line, command) for doc in DOCS for line, command in documented_commands(doc)]


def test_every_documented_command_is_checked():
    found = all_commands()
    unknown = [f"{doc}:{line}: {command}" for doc, line, command in found if command not in HOW]
    assert not unknown, "commands no test checks (add them to HOW):\n" + "\n".join(unknown)
    stale = sorted(set(HOW) - {command for _, _, command in found})
    assert not stale, f"HOW lists commands no document holds any more: {stale}"


# ------------------------------------------------------------------ the copy a clone would be
@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    """git's files of this checkout (committed and new, not ignored), in a fresh folder."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, check=True).stdout.decode().split("\0")
    copy = tmp_path_factory.mktemp("clone")
    for name in filter(None, files):
        source = ROOT / name
        if source.is_file():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, copy / name)
    return copy


def _env(copy: Path, **extra: str) -> dict[str, str]:
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"  # this venv's torchrun, pip
    return child_env(**{"PYTHONPATH": str(copy), "PATH": path, "MLFLOW_ALLOW_FILE_STORE": "true", **extra})


def _shell(command: str, copy: Path, env: dict[str, str] | None = None, timeout: float = LIMIT_S):
    proc = subprocess.run(["bash", "-c", command], cwd=copy, env=env or _env(copy), capture_output=True, text=True,
                          timeout=timeout, start_new_session=True)
    return proc.returncode, proc.stdout + proc.stderr


def _split_env(command: str) -> tuple[dict[str, str], list[str]]:
    """``VAR=value ... argv``: the assignments and the command."""
    words = shlex.split(command)
    env = {}
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
        name, _, value = words.pop(0).partition("=")
        env[name] = value
    return env, words


# ------------------------------------------------------------------ run
def test_the_cheap_commands_run_as_written(clone):
    """In doc order, in the clone (a run leaves what the next command reads: runs/digits, runs/resume)."""
    ran, failures = set(), []
    for doc, line, command in all_commands():
        how = HOW.get(command, ())
        if how[:1] != ("run",) or command in ran:  # the same command again (observability.md) changes nothing
            continue
        ran.add(command)
        env, _ = _split_env(command)
        code, output = _shell(command, clone, _env(clone, **env))
        if code != how[1]:
            failures.append(f"{doc}:{line}: {command}\nexited {code}, expected {how[1]}\n{output[-3000:]}")
    assert not failures, "\n\n".join(failures)
    assert (clone / "runs" / "digits" / "curves.png").is_file()
    assert (clone / "runs" / "digits" / "traces" / "rank1.json").is_file()


# ------------------------------------------------------------------ parse
def _torchrun_script(argv: list[str]) -> list[str]:
    """torchrun's own parser on ``argv`` (without 'torchrun'); the entry script's command."""
    from torch.distributed.run import get_args_parser

    args = get_args_parser().parse_args(argv)
    if args.module:  # torchrun -m package.module ...
        return ["python", "-m", args.training_script, *args.training_script_args]
    assert Path(args.training_script).suffix == ".py", argv
    return ["python", args.training_script, *args.training_script_args]


def _launch_script_argv(command: str, copy: Path, stub: Path) -> list[str]:
    """Run a launch/*.sh command against a stand-in torchrun; the arguments it was given."""
    env, _ = _split_env(command)
    out = stub.parent / "torchrun-args.json"
    out.unlink(missing_ok=True)
    code, output = _shell(command, copy, _env(copy, PATH=f"{stub.parent}{os.pathsep}{_env(copy)['PATH']}",
                                              ANNDIST_STUB_OUT=str(out), **env))
    assert code == 0, f"{command}: {output[-2000:]}"
    return json.loads(out.read_text())


def test_the_heavy_commands_parse_their_arguments(clone, tmp_path):
    stub = tmp_path / "bin" / "torchrun"
    stub.parent.mkdir()
    stub.write_text("#!/usr/bin/env bash\n"  # records its arguments instead of starting anything
                    "exec python -c 'import json, os, sys; json.dump(sys.argv[1:], open(os.environ[\"ANNDIST_STUB_OUT\"], "
                    "\"w\"))' \"$@\"\n")
    stub.chmod(0o755)
    scripts = []
    for doc, line, command in all_commands():
        how = HOW.get(command)
        env, argv = _split_env(command)
        if how != ("parse",) and not (how == ("slurm",) and argv[0] == "sbatch"):
            continue
        if argv[0] == "srun":  # srun's own options none: what it starts
            argv = argv[1:]
        if argv[0] == "sbatch":  # the batch script's entry script and its arguments
            argv = ["python", *argv[2:]]
        elif argv[0] == "bash":
            torchrun_argv = _launch_script_argv(command, clone, stub)
            if env.get("NPROC"):
                assert f"--nproc_per_node={env['NPROC']}" in torchrun_argv, torchrun_argv
            argv = _torchrun_script(torchrun_argv)
            if os.path.isabs(argv[1]):  # the default entry script, by its absolute path
                argv[1] = os.path.relpath(argv[1], clone)
        elif argv[0] == "torchrun":
            argv = _torchrun_script(argv[1:])
        assert argv[0] == "python", command
        scripts.append((f"{doc}:{line}: {command}", argv))
    commands = tmp_path / "commands.json"
    commands.write_text(json.dumps([argv for _, argv in scripts]))
    proc = subprocess.run([sys.executable, str(clone / "tests" / "support" / "scripts" / "parse_only.py"), str(commands)],
                          cwd=clone, env=_env(clone), capture_output=True, text=True, timeout=LIMIT_S)
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(results) == len(scripts), proc.stdout[-2000:] + proc.stderr[-2000:]
    failures = [f"{where}\n  {result['error']}" for (where, _), result in zip(scripts, results) if not result["ok"]]
    assert not failures, "\n".join(failures)


def test_the_parse_check_tells_a_wrong_option_apart(clone, tmp_path):
    """The check has teeth: a misspelt option, an unknown one and a wrong type each fail it."""
    commands = tmp_path / "commands.json"
    commands.write_text(json.dumps([["python", "launch/train_cnn.py", "--epocs", "5"],
                                    ["python", "tests/bench/peers/interleaved.py", "--nprocs", "1", "--bogus"],
                                    ["python", "-m", "anndist.plot", "runs/x.jsonl", "-o"],
                                    ["python", "launch/train_cnn.py", "--epochs", "5"]]))
    proc = subprocess.run([sys.executable, str(clone / "tests" / "support" / "scripts" / "parse_only.py"), str(commands)],
                          cwd=clone, env=_env(clone), capture_output=True, text=True, timeout=LIMIT_S)
    assert [json.loads(line)["ok"] for line in proc.stdout.splitlines()] == [False, False, False, True]


# ------------------------------------------------------------------ pip, slurm, servers
def _check_pip(command: str, copy: Path) -> None:
    words = shlex.split(command)
    # Without compat mode, `import anndist` from the folder above the clone finds the clone folder as an
    # empty namespace package (the README says why): every editable install in the docs asks for it.
    assert "-e" not in words or "editable_mode=compat" in words, f"{command}: an editable install without compat mode"
    assert words[:2] == ["pip", "install"], command
    extras = {e for w in words if (m := re.fullmatch(r"\.\[(.+)\]", w)) for e in m.group(1).split(",")}
    declared = tomllib.loads((copy / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras <= set(declared), f"{command}: extras {sorted(extras - set(declared))} are not in pyproject.toml"
    requirements = [Requirement(r) for extra in sorted(extras) for r in declared[extra]]  # each one parses
    # The dry run has no index: it resolves the extras only where this environment holds what they pin
    # (the test extra does); otherwise (e.g. lightning for bench) it checks the project and its extras' syntax.
    no_deps = [] if all(_installed(r) for r in requirements) else ["--no-deps"]
    dry = [sys.executable, "-m", "pip", "install", "--dry-run", "--no-index", "--no-build-isolation", *no_deps,
           *words[2:]]
    proc = subprocess.run(dry, cwd=copy, env=_env(copy), capture_output=True, text=True, timeout=LIMIT_S)
    assert proc.returncode == 0, f"{command}\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}"


def _installed(requirement: Requirement) -> bool:
    try:
        return requirement.specifier.contains(metadata.version(requirement.name), prereleases=True)
    except metadata.PackageNotFoundError:
        return False


def test_the_pip_lines_resolve_with_the_extras_they_name(clone):
    for _, _, command in all_commands():
        if HOW.get(command) == ("pip",):
            _check_pip(command, clone)



def _knows_options(argv: list[str], env: dict[str, str] | None = None) -> None:
    """``argv`` with ``--help`` added exits 0: every option in it is one the program knows (an unknown one
    is an error before the help). Placeholders such as ``<jobid>`` are left out."""
    words = [w for w in argv if not re.search(r"<\w+>", w)]
    proc = subprocess.run([*words, "--help"], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, f"{' '.join(argv)}: {proc.stderr[-1000:]}"


def test_the_slurm_lines_name_real_scripts_and_options(clone, tmp_path):
    """The batch scripts exist and pass ``bash -n`` (their entry scripts' arguments are parsed above);
    the client commands know their options."""
    if shutil.which("squeue") is None and os.environ.get("ANNDIST_REQUIRE_SLURM") != "1":
        pytest.skip("Slurm's client commands are not installed (as for the Slurm tests, ANNDIST_REQUIRE_SLURM=1 fails)")
    conf = tmp_path / "slurm.conf"  # the clients read a configuration before anything, --help included
    conf.write_text("ClusterName=docs\nSlurmctldHost=localhost\n")
    for _, _, command in all_commands():
        if HOW.get(command) != ("slurm",):
            continue
        _, words = _split_env(command)
        if words[0] == "sbatch":
            assert subprocess.run(["bash", "-n", words[1]], cwd=clone).returncode == 0, command
            assert "#SBATCH" in (clone / words[1]).read_text()
        else:
            _knows_options(words, env={**os.environ, "SLURM_CONF": str(conf)})


def test_servers_know_the_options_given(clone):
    for _, _, command in all_commands():
        if HOW.get(command) == ("help",):
            _knows_options(shlex.split(command), env=_env(clone))


# ------------------------------------------------------------------ the quickstart
def test_the_quickstart_lines_part_by_part(clone):
    for _, _, command in all_commands():
        if HOW.get(command) != ("quickstart",):
            continue
        for part in command.split(" && "):
            if part == "python3 -m venv .venv":
                code, output = _shell(part, clone)
                assert code == 0, output
            elif part == ". .venv/bin/activate":
                code, output = _shell(f"{part} && command -v python", clone)
                assert code == 0 and output.strip() == str(clone / ".venv" / "bin" / "python"), output
            elif part.startswith("pip install"):
                _check_pip(part, clone)
            elif part == "bash launch/torchrun.sh":
                code, output = _shell(part, clone)
                assert code == 0 and "training on 2 process(es)" in output and "run ended after" in output, output
            elif part == "python -m pytest -n 2 -rs":
                code, output = _shell(f"{part} --collect-only -q -p no:cacheprovider tests/unit/test_env.py", clone)
                assert code == 0 and re.search(r"\d+ tests? collected", output), output[-2000:]
            else:
                raise AssertionError(f"a quickstart part no check knows: {part!r}")


# ------------------------------------------------------------------ docs/migration.md's two scripts
def _python_blocks(doc: str, heading: str) -> str:
    text = (ROOT / doc).read_text()
    after = text[text.index(heading):]
    return after[after.index("```python\n") + len("```python\n"):after.index("\n```", after.index("```python"))]


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                    reason="docs/migration.md's jobs need transformers (pip install '.[hf]')")
@pytest.mark.parametrize("heading", ("### With transformers' Trainer", "### With anndist"))
def test_the_migration_jobs_run(clone, heading):
    script = clone / f"job-{'hf' if 'transformers' in heading else 'anndist'}.py"
    script.write_text(_python_blocks("docs/migration.md", heading))
    code, output = _shell(f"python {script.name}", clone)
    assert code == 0, output[-3000:]
    assert re.search(r"'(eval|val)_loss': [\d.]+", output), output[-2000:]
