"""A missing optional package is one line naming the pip command, wherever it is needed (in-process).

``sys.modules[name] = None`` makes ``import name`` fail as a missing package does. The same under
torchrun, with an entry script: tests/e2e/test_examples.py.
"""
import sys

import pytest

from anndist import ProgressBarCallback, TensorBoardCallback
from anndist.optional import MissingDependencyError, install_hint, require


def _block(monkeypatch, *modules):
    for name in modules:
        monkeypatch.setitem(sys.modules, name, None)


def test_callbacks_name_the_extra_that_installs_their_package(monkeypatch, tmp_path):
    _block(monkeypatch, "tensorboard", "tqdm")
    with pytest.raises(MissingDependencyError) as tb:
        TensorBoardCallback(tmp_path)
    with pytest.raises(MissingDependencyError) as bar:
        ProgressBarCallback()
    assert str(tb.value) == ("TensorBoardCallback needs tensorboard, which is not installed: pip install "
                             "'anndist[tensorboard]' (or 'anndist[examples]' for everything the digits examples use)")
    assert "needs tqdm, which is not installed: pip install 'anndist[progress]'" in str(bar.value)
    assert isinstance(tb.value, ImportError) and "\n" not in str(tb.value) + str(bar.value)


def test_a_package_that_fails_to_import_is_told_apart_from_a_missing_one(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(MissingDependencyError, match="which is not installed"):
        require("matplotlib", "plotting")
    (tmp_path / "tqdm.py").write_text("raise ImportError('numpy.core.multiarray failed to import\\n(details)')\n")
    monkeypatch.delitem(sys.modules, "tqdm", raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))  # an installed tqdm that is broken
    with pytest.raises(MissingDependencyError) as broken:
        require("tqdm", "the progress bar")
    assert str(broken.value).startswith("the progress bar needs tqdm, which fails to import "
                                        "(ImportError: numpy.core.multiarray failed to import (details)): pip install")
    with pytest.raises(ValueError, match="not one of anndist's optional packages"):
        install_hint("numpyy")


def test_plot_command_without_matplotlib_prints_one_line(monkeypatch, capsys, tmp_path):
    from anndist import plot
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"kind": "step", "step": 1, "loss": 1.0}\n')
    _block(monkeypatch, "matplotlib")
    with pytest.raises(SystemExit) as exit_info:
        plot.main([str(metrics)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1
    assert err == ("python -m anndist.plot: error: plotting needs matplotlib, which is not installed: "
                   "pip install 'anndist[plot]' (or 'anndist[examples]' for everything the digits examples use)\n")


def test_entry_script_reports_a_missing_package_in_one_line_and_exits_1(monkeypatch, capsys, tmp_path):
    from train_digits import main
    _block(monkeypatch, "sklearn", "sklearn.datasets", "sklearn.model_selection")
    with pytest.raises(SystemExit) as exit_info:
        main(["--max-steps", "1", "--log-dir", str(tmp_path)])
    assert exit_info.value.code == 1
    assert capsys.readouterr().err == ("error: the digits data needs scikit-learn, which is not installed: "
                                       "pip install 'anndist[examples]'\n")
