"""``python -m anndist.consolidate CHECKPOINT OUT.pt``: a sharded (DCP) checkpoint folder as one file.

OUT.pt is the model's whole ``state_dict`` (parameter name -> full tensor), written with ``torch.save``
atomically, for inference: ``model.load_state_dict(torch.load("OUT.pt"))``. It runs in one process,
with no process group, whatever the number of ranks that wrote the checkpoint.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from .checkpoint.file import atomic_write
from .checkpoint.folder import resolve
from .checkpoint.integrity import checked_reader, failure
from .checkpoint.sharded import is_dcp_failure, read_run_file


def consolidate(checkpoint: str | Path, out: str | Path) -> Path:
    """Write the model state of the sharded ``checkpoint`` (a folder of them: its latest) to ``out``."""
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict
    path = resolve(str(checkpoint), None)
    _, index = read_run_file(path)  # a complete DCP folder, or an error naming what is missing or damaged
    everything: dict = {}  # what torch's dcp_to_torch_save reads, through the reader that checks every item
    try:
        _load_state_dict(everything, storage_reader=checked_reader(path, index), planner=_EmptyStateDictLoadPlanner(),
                         no_dist=True)
    except BaseException as exc:
        if not is_dcp_failure(exc):
            raise
        raise failure(exc, path, "reading") from exc
    model = everything["model"]
    return atomic_write(out, lambda file: torch.save(model, file))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m anndist.consolidate", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a sharded checkpoint folder, or a folder of checkpoints (its latest)")
    parser.add_argument("out", help="the .pt file to write: the model's full state_dict")
    args = parser.parse_args(argv)
    written = consolidate(args.checkpoint, args.out)
    print(f"wrote {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
