"""Sharded (DCP) checkpoints in one process: a folder alias (best.ckpt) is hard links that outlive their
source. The runs on 2 ranks: tests/multiprocess/test_fsdp_checkpoint.py."""
from __future__ import annotations

import shutil


def test_a_folder_alias_is_hard_links_that_outlive_the_source(tmp_path):
    from anndist.checkpoint.sharded import link_folder
    first, second = tmp_path / "step-1.ckpt", tmp_path / "step-2.ckpt"
    for folder, text in ((first, "one"), (second, "two")):
        folder.mkdir()
        (folder / ".metadata").write_text(text)
        (folder / "__0_0.distcp").write_text(text)
    alias = tmp_path / "best.ckpt"
    link_folder(first, alias)
    assert not alias.is_symlink() and (alias / ".metadata").stat().st_ino == (first / ".metadata").stat().st_ino
    link_folder(second, alias)  # a new best replaces the old one
    assert (alias / "__0_0.distcp").read_text() == "two"
    shutil.rmtree(second)  # pruned, as keep_last does
    assert sorted(p.name for p in alias.iterdir()) == [".metadata", "__0_0.distcp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.ckpt", "step-1.ckpt"]  # no temporary left
