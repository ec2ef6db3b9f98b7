"""The dualcoop command's messages: a user error is one line (its traceback under DUALCOOP_DEBUG=1), a
bug in the package shows its traceback and says it is one, running out of memory says what to change."""

import pytest
import torch

from dualcoop_kernels import cli
from dualcoop_kernels.errors import UsageError, UsageTypeError
from dualcoop_kernels.version import __version__


def test_a_user_error_is_one_line_and_exit_code_2(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("DUALCOOP_DEBUG", raising=False)
    assert cli.main(["eval", str(tmp_path / "no-run")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("dualcoop eval: error: cannot read the run's configuration") and "no-run" in error
    assert len(error.strip().splitlines()) == 1 and "Traceback" not in error


def test_dualcoop_debug_adds_the_traceback_of_a_user_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DUALCOOP_DEBUG", "1")
    assert cli.main(["eval", str(tmp_path / "no-run")]) == 2
    error = capsys.readouterr().err
    assert "Traceback" in error and "UsageError" in error
    assert error.strip().splitlines()[-1].startswith("dualcoop eval: error: cannot read the run's configuration")


def test_a_bug_in_the_package_shows_its_traceback_and_says_so(tmp_path, capsys, monkeypatch):
    def broken(args):
        return {}["a key the package forgot"]

    monkeypatch.setattr(cli, "_eval", broken)
    assert cli.main(["eval", str(tmp_path)]) == 1
    error = capsys.readouterr().err
    assert "Traceback" in error and "KeyError: 'a key the package forgot'" in error
    assert f"dualcoop eval: this is a bug in dualcoop_kernels {__version__}, not in what you asked" in error


def test_a_value_error_the_package_did_not_mean_is_a_bug(tmp_path, capsys, monkeypatch):
    """Only UsageError (and files, and unavailable weights) are the user's: a ValueError from deep inside
    is shown as the bug it is, not as a one-line complaint about the input."""

    def broken(args):
        raise ValueError("math domain error")

    monkeypatch.setattr(cli, "_eval", broken)
    assert cli.main(["eval", str(tmp_path)]) == 1
    assert "this is a bug in dualcoop_kernels" in capsys.readouterr().err


def test_running_out_of_memory_says_what_to_change(tmp_path, capsys, monkeypatch):
    def too_big(args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(cli, "_eval", too_big)
    assert cli.main(["eval", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert error.strip() == (
        "dualcoop eval: error: OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 GiB: "
        "try a smaller --batch-size"
    )


def test_usage_errors_are_the_errors_python_users_catch():
    """Code that catches ValueError (or TypeError, for a wrong type) keeps working."""
    assert issubclass(UsageError, ValueError) and issubclass(UsageTypeError, TypeError)
    with pytest.raises(UsageError, match=r"features must be a torch\.Tensor"):
        from dualcoop_kernels import dualcoop_head

        dualcoop_head([[1.0]], *[torch.zeros(2, 1)] * 3, torch.zeros(()))
