"""Optional dependencies are named with the extra that installs them, before any work is done."""

import sys

import pytest

import mixda_fast
from mixda_fast.training.data import load_texts
from mixda_fast.training.trainer import training_arguments


def test_import_needs_no_extra():
    import subprocess

    code = ("import sys\nfor m in ('datasets', 'accelerate', 'peft', 'matplotlib'): sys.modules[m] = None\n"
            "import mixda_fast, mixda_fast.cli, mixda_fast.training\nprint('ok')")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr


@pytest.mark.parametrize("module, call", [
    ("datasets", lambda tmp: load_texts(tmp / "t.txt")),
    ("accelerate", lambda tmp: training_arguments(str(tmp / "out"))),
])
def test_a_missing_extra_is_named(module, call, tmp_path, monkeypatch):
    (tmp_path / "t.txt").write_text("one line\n")
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(ImportError, match=rf"needs the package '{module}', which is not installed: "
                                          r"pip install 'mixda-fast\[train\]'"):
        call(tmp_path)
    assert not (tmp_path / "out").exists()
    assert mixda_fast.__version__
