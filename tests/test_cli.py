import pytest

from selagg_fast.cli import main


def test_user_errors_print_one_line_and_exit_2(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("SELAGG_TRACEBACK", raising=False)
    plot = ["plot", str(tmp_path / "missing_run"), "--output", str(tmp_path / "a.png")]
    assert main(plot) == 2
    err = capsys.readouterr().err
    assert "selagg-fast plot: error:" in err and "no stats.json" in err and "Traceback" not in err

    probe = ["probe", "--model", "vit_tiny_patch16_224", "--data", "synthetic", "--output-dir", str(tmp_path / "p")]
    assert main(probe) == 2
    assert "--checkpoint" in capsys.readouterr().err

    monkeypatch.setenv("SELAGG_TRACEBACK", "1")  # for a bug report: the exception itself
    with pytest.raises(FileNotFoundError, match="stats.json"):
        main(plot)
