import json
import os

import pytest
import torch
from PIL import Image

import geosample as gs
from geosample import cli
from geosample.commands import sample as cmd


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny problems: one thread avoids OpenMP overhead on busy 2-core CI machines."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_steps_for_nfe_follows_gs_nfe():
    for solver in ("euler", "ipndm", "dpmpp", "unipc", "deis", "heun", "dpm2"):
        for nfe in range(2, 11):
            for afs in (False, True):
                try:
                    steps = gs.solvers.steps_for_nfe(solver, nfe, afs)
                except ValueError:
                    assert gs.SOLVERS[solver].evals_per_step == 2
                    continue
                assert gs.nfe(solver, steps, afs=afs) == nfe
    assert gs.solvers.steps_for_nfe("heun", 6) == 3 and gs.solvers.steps_for_nfe("heun", 5, afs=True) == 3
    with pytest.raises(ValueError, match="valid NFEs"):
        gs.solvers.steps_for_nfe("heun", 5)


def test_make_schedule_families_and_files(tmp_path):
    sig, found = cmd.make_schedule("polynomial", "ipndm", 6)
    assert found is None and torch.equal(sig, gs.schedules.polynomial(6))
    assert torch.equal(cmd.make_schedule("logsnr", "heun", 8)[0], gs.schedules.logsnr(4))
    (tmp_path / "a.json").write_text(json.dumps([80.0, 1.0, 0.002]))
    (tmp_path / "b.json").write_text(json.dumps({"sigmas": [80.0, 5.0, 0.1, 0.0]}))
    (tmp_path / "c.json").write_text(json.dumps({"sigmas": [1.0, 2.0]}))
    assert cmd.make_schedule(str(tmp_path / "a.json"), "ipndm", 2)[0].tolist() == [80.0, 1.0, 0.002]
    assert cmd.make_schedule(str(tmp_path / "b.json"), "ipndm", 3)[0].tolist()[-1] == 0.0
    with pytest.raises(ValueError, match="decreasing"):
        cmd.make_schedule(str(tmp_path / "c.json"), "ipndm", 1)
    with pytest.raises(ValueError, match="unknown schedule"):
        cmd.make_schedule("cosine", "ipndm", 6)


def test_no_arguments_runs_sample_with_defaults(monkeypatch):
    seen = {}
    monkeypatch.setattr(cmd, "run", lambda args: seen.update(vars(args)) or 0)
    assert cli.main([]) == 0
    assert seen["command"] == "sample" and seen["data"] is None and seen["model"] is None and seen["solver"] == "ipndm"
    assert seen["nfe"] == 6 and seen["schedule"] == "gits" and seen["out"] == "geosample-out"
    assert seen["gamma"] == list(gs.gits.GAMMAS) and seen["refine"] and seen["num_warmup"] is None


def test_main_job_end_to_end_small(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GEOSAMPLE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    assert cli.main(["sample", "--limit", "100", "--batch", "4", "--num-warmup", "16", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert [r["schedule"] for r in report["rows"]] == ["gits", "polynomial"]
    assert all(r["nfe"] == 6 and r["solver"] == "ipndm" and r["rmse"] > 0 for r in report["rows"])
    assert report["rows"][1]["sigmas"] == gs.schedules.polynomial(6).tolist()
    sched = gs.gits.load(out / "schedule.json")
    assert sched.sigmas.tolist() == report["rows"][0]["sigmas"] and len(sched.sigmas) == 7
    # the default is the recommended search for the job's solver; --gamma 1.15 --no-refine is the reference's
    assert sched.params["gamma"] == list(gs.gits.GAMMAS) and sched.params["refine"]
    assert report["gits"]["selected"] == sched.params["selected"] and report["gits"]["check"] == sched.params["check"]
    # ... on warm-up noise (seed 1) that is not the scored noise (seed 0)
    assert sched.params["seed"] == 1 and report["seed"] == 0 and report["gits"]["seed"] == 1
    assert cli.main(["sample", "--limit", "100", "--batch", "4", "--num-warmup", "16", "--gamma", "1.15",
                     "--no-refine", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["gits"]["selected"] is None and report["gits"]["refinement"] is None
    assert gs.gits.load(out / "schedule.json").config == gs.gits.GITSConfig(num_warmup=16, seed=1)  # the reference's
    img = Image.open(out / "samples.png")
    assert img.width > 2.5 * img.height   # three panels side by side: gits, polynomial, reference
    table = capsys.readouterr().out
    assert "gits" in table and "polynomial" in table and "RMSE" in table
    # `geosample gits` with the same flags searches the same schedule: a cache hit
    assert cli.main(["gits", "--limit", "100", "--num-warmup", "16", "--gamma", "1.15", "--no-refine",
                     "--out", str(tmp_path / "s.json")]) == 0
    assert gs.gits.load(tmp_path / "s.json").sigmas.tolist() == report["rows"][0]["sigmas"]


def test_model_with_data_is_refused(capsys):
    """--model ignored --data and --limit silently."""
    assert cli.main(["sample", "--model", "cifar10-tiny", "--data", "cifar10"]) == 2
    assert "--data and --limit do not apply" in capsys.readouterr().err


def test_main_job_heun_polynomial_only(tmp_path):
    out = tmp_path / "out"
    torch.set_num_threads(2)   # --threads 0 must drop to one thread for 64-value samples
    assert cli.main(["sample", "--limit", "50", "--batch", "2", "--solver", "heun", "--nfe", "8",
                     "--schedule", "polynomial", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert len(report["rows"]) == 1 and report["rows"][0]["nfe"] == 8
    assert report["versions"]["torch_threads"] == 1
    assert json.loads((out / "schedule.json").read_text())["sigmas"] == gs.schedules.polynomial(4).tolist()
    assert cli.main(["sample", "--limit", "50", "--solver", "heun", "--nfe", "7", "--out", str(out)]) == 2
    with pytest.raises(ValueError, match="valid NFEs"):
        cli.main(["sample", "--debug", "--limit", "50", "--solver", "heun", "--nfe", "7", "--out", str(out)])


def test_main_job_afs_keeps_nfe(tmp_path):
    out = tmp_path / "out"
    assert cli.main(["sample", "--limit", "50", "--batch", "2", "--nfe", "5", "--afs",
                     "--schedule", "logsnr", "--out", str(out)]) == 0
    rows = json.loads((out / "report.json").read_text())["rows"]
    assert [(r["schedule"], r["nfe"], len(r["sigmas"])) for r in rows] == [("logsnr", 5, 7), ("polynomial", 5, 7)]


def test_python_dash_m_lists_every_command():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "geosample", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0
    assert all(name in out.stdout for name in ("sample", "gits", "analyze"))


@pytest.mark.parametrize("argv, message", [
    (["--solver", "foo"], "unknown solver 'foo'"),
    (["--data", "no/such/folder"], "no dataset named 'no/such/folder'"),
    (["--solver", "heun", "--nfe", "7"], "cannot use exactly 7 denoiser calls"),
    (["--schedule", "cosine"], "unknown schedule 'cosine'"),
    (["--batch", "0"], "--batch must be >= 1"),
])
def test_user_errors_print_one_line_and_exit_2(tmp_path, capsys, argv, message):
    """They printed a full Python traceback."""
    assert cli.main([*argv, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("geosample: error: ") and message in err[-1]
    assert not any("Traceback" in line for line in err)


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(ValueError, match="unknown solver"):
        cli.main(["--debug", "--solver", "foo", "--out", str(tmp_path)])


@pytest.mark.parametrize("make_out", [
    lambda p: (p / "file").write_text("x") and p / "file",                    # a file
    lambda p: (p / "file").write_text("x") and p / "file" / "sub",            # under a file
])
def test_bad_out_fails_before_the_work(tmp_path, capsys, monkeypatch, make_out):
    """An unusable --out failed only after the whole job had run."""
    out = make_out(tmp_path)
    monkeypatch.setattr("geosample.data.load_dataset", lambda *a, **k: pytest.fail("the job started"))
    assert cli.main(["sample", "--out", str(out)]) == 2
    assert "geosample: error:" in capsys.readouterr().err
    assert cli.main(["analyze", "--out", str(out)]) == 2
    assert cli.main(["gits", "--data", "digits", "--out", str(tmp_path)]) == 2   # a folder, not a file


def test_outputs_are_published_as_one_run(tmp_path, monkeypatch):
    """A run killed between its writes left report.json of one run next to samples.png of another."""
    from geosample import _io

    out = tmp_path / "out"
    argv = ["sample", "--limit", "30", "--batch", "2", "--schedule", "logsnr", "--out", str(out)]
    assert cli.main(argv) == 0
    first = _io.read_run(out)
    assert set(first["files"]) == {"samples.png", "schedule.json", "report.json"}
    assert json.loads((out / "report.json").read_text())["run"] == first["run"]

    real, calls = os.replace, []

    def killed_after_one(src, dst):                 # the second run dies while publishing
        calls.append(dst)
        if len(calls) == 2:
            raise OSError("killed")
        real(src, dst)
    monkeypatch.setattr(os, "replace", killed_after_one)
    assert cli.main([*argv[:-2], "--seed", "1", "--out", str(out)]) == 2
    with pytest.raises(ValueError, match="no complete run"):
        _io.read_run(out)                           # no manifest vouches for the mixed folder
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]

    monkeypatch.setattr(os, "replace", real)
    assert cli.main(argv) == 0
    second = _io.read_run(out)
    assert second["run"] != first["run"]
    monkeypatch.setattr(cmd, "png_bytes", lambda image: (_ for _ in ()).throw(OSError("killed")))
    assert cli.main(argv) == 2                      # dies before publishing: the last set stays whole
    assert _io.read_run(out) == second


def test_console_command_error_has_no_traceback():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "geosample", "--solver", "foo"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("geosample: error: unknown solver 'foo'")


@pytest.mark.parametrize("content, message", [
    ({"format_version": 1}, "not a valid GITS schedule file"),
    ({"format_version": 1, "sigmas": [1.0, 2.0], "indices": [0, 1], "grid": {}, "cost": 0, "step_costs": [],
      "params": {}, "fingerprint": "x", "cost_matrix": [[None]]}, "strictly decreasing"),
    ([["x"]], "sigmas must be a 1-D tensor"),
    ({"sigmas": "80,1"}, "sigmas must be a 1-D tensor"),
])
def test_bad_schedule_files_are_user_errors(tmp_path, capsys, content, message):
    """A GITS file missing a key raised a bare KeyError; a bad one was used without its sigmas checked."""
    path = tmp_path / "s.json"
    path.write_text(json.dumps(content))
    assert cli.main(["--schedule", str(path), "--out", str(tmp_path / "out")]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("geosample: error: ") and message in last


def test_single_process_runs_do_not_go_through_distributed(tmp_path, monkeypatch):
    """Without torchrun the commands call the library (gs.sample, gits.search, KDEDenoiser), not the
    data-parallel wrappers of geosample.distributed."""
    import geosample.distributed as gd

    for name in ("sample", "gits_search", "closed_form_denoiser", "is_main", "world_size"):
        monkeypatch.setattr(gd, name, lambda *a, **k: pytest.fail("went through geosample.distributed"))
    monkeypatch.setenv("GEOSAMPLE_CACHE", str(tmp_path / "cache"))
    assert cli.main(["sample", "--limit", "40", "--batch", "2", "--nfe", "4", "--num-warmup", "4",
                     "--gamma", "1.15", "--out", str(tmp_path / "out")]) == 0
    assert cli.main(["gits", "--data", "digits", "--steps", "3", "--teacher-steps", "8", "--num-warmup", "4",
                     "--out", str(tmp_path / "g.json")]) == 0
