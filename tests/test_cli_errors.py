"""What a new user hits first: every user error is one line (`geosample: error: ...`, exit 2), Ctrl-C
is one line (exit 130), and a run that fails early leaves no output folder behind."""
import pytest
import torch

import geosample as gs
from geosample import cli
from geosample.commands import sample as sample_cmd
from geosample.gits import cache

TINY = ["--batch", "2", "--num-warmup", "2", "--no-cache"]


def one_line_error(capsys, argv, match, tmp_path=None):
    rc = cli.main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("geosample: error: ") and "\n" not in err and "Traceback" not in err, err
    assert match in err, err
    return err


@pytest.mark.parametrize("device, match", [("banana", "unknown device 'banana'"), ("tpu", "unknown device 'tpu'"),
                                           ("cuda", "device 'cuda' is not available")])
def test_bad_devices(capsys, tmp_path, device, match):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out = tmp_path / "out"
    one_line_error(capsys, ["sample", "--device", device, "--out", str(out), *TINY], match)
    one_line_error(capsys, ["gits", "--device", device, "--out", str(out / "s.json"), "--num-warmup", "2"], match)
    assert not out.exists()


def test_a_file_that_is_no_dataset(capsys, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# hello\n")
    out = tmp_path / "out"
    one_line_error(capsys, ["sample", "--data", str(readme), "--out", str(out), *TINY], "is not a dataset")
    assert not out.exists() and not (tmp_path / "geosample-out").exists()


def test_early_failure_leaves_no_output_folder(capsys, tmp_path, monkeypatch):
    """A failure after the --out check (here: the model) left an empty ./geosample-out."""
    monkeypatch.chdir(tmp_path)
    one_line_error(capsys, ["sample", "--model", "no-such-model", *TINY], "unknown model")
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_is_one_line_and_exit_130(capsys, tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(sample_cmd, "reference_error", interrupted, raising=False)
    monkeypatch.setattr(gs.metrics, "reference_solve", interrupted)
    out = tmp_path / "out"
    rc = cli.main(["sample", "--out", str(out), "--schedule", "polynomial", "--batch", "2"])
    err = capsys.readouterr().err.strip()
    assert rc == 130 and err == "geosample: interrupted"
    assert not out.exists()


def test_gamma_with_a_decimal_comma_is_refused(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["gits", "--gamma", "1,15", "--num-warmup", "2"])
    assert e.value.code == 2
    assert "reads as the list [1.0, 15.0]: write a decimal with a point (1.15)" in capsys.readouterr().err
    from geosample.commands.gits import gammas
    assert gammas("0.9,1.0") == [0.9, 1.0] and gammas("1.15") == 1.15 and gammas("1, 1.2") == [1.0, 1.2]


def test_huge_gamma_is_a_value_error(capsys, tmp_path):
    """gamma = 1e300 raised OverflowError in dp.path_cost."""
    with pytest.raises(ValueError, match="gamma=1e.300 makes gamma.k overflow"):
        gs.gits.search(lambda x, s: x * 0, (2,), 2, gamma=1e300, num_warmup=2, use_cache=False)
    one_line_error(capsys, ["gits", "--gamma", "1e300", "--num-warmup", "2", "--no-cache",
                            "--out", str(tmp_path / "s.json")], "overflow")
    assert gs.gits.path_cost(torch.ones(4, 4), [0, 1, 2, 3], 1e300)[0] == float("inf")


def test_a_denoiser_returning_numpy_is_a_clear_error():
    with pytest.raises(ValueError, match="denoiser returned ndarray, expected a tensor of shape"):
        gs.gits.search(lambda x, s: x.numpy(), (2,), 2, num_warmup=2, use_cache=False)


@pytest.mark.parametrize("odd", ["cache_is_a_file", "entry_is_a_folder"])
def test_an_unwritable_cache_is_skipped_with_a_warning(tmp_path, monkeypatch, odd):
    """GEOSAMPLE_CACHE pointing at a file, or an entry's path being a folder: a traceback after the work."""
    root = tmp_path / "cache"
    if odd == "cache_is_a_file":
        root.write_text("not a folder")
    monkeypatch.setenv("GEOSAMPLE_CACHE", str(root))
    kde = gs.KDEDenoiser(torch.randn(16, 2, generator=torch.Generator().manual_seed(0)))
    want = gs.gits.search(kde, (2,), 2, num_warmup=2, teacher_steps=6, use_cache=False)
    if odd == "entry_is_a_folder":
        gs.gits.search(kde, (2,), 2, num_warmup=2, teacher_steps=6)  # writes the entries; each becomes a folder
        for entry in cache.cache_dir().iterdir():
            entry.unlink()
            entry.mkdir()
    with pytest.warns(cache.CacheWarning):
        got = gs.gits.search(kde, (2,), 2, num_warmup=2, teacher_steps=6)
    assert got.indices == want.indices
