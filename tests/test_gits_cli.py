"""`geosample gits` end to end on the bundled digits (tiny teacher so it stays fast)."""
import json

import pytest

import geosample as gs

from geosample.cli import main


def run_gits(tmp_path, capsys, *extra):
    """`geosample gits` on digits with a tiny teacher: (printed JSON, saved schedule)."""
    out = tmp_path / "s.json"
    rc = main(["gits", "--data", "digits", "--steps", "2", "--solver", "ipndm", "--num-warmup", "2",
               "--batch-size", "2", "--no-cache", "--out", str(out), *extra])
    assert rc == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1]), gs.gits.load(out)


def test_cli_gits_prints_and_saves(tmp_path, capsys):
    printed, sched = run_gits(tmp_path, capsys, "--teacher-steps", "4", "--gamma", "1.15", "--no-refine")
    assert printed["indices"] == sched.indices and len(sched.indices) == 3
    assert sched.params["num_warmup"] == 2 and sched.grid["teacher_steps"] == 4
    assert sched.indices[0] == 0 and sched.indices[-1] == 4
    assert printed["calls"] == sched.params["calls"] and printed["selected"] == "dp"


def test_cli_gits_defaults_are_the_main_jobs(tmp_path, capsys):
    """One set of defaults: the recommended search, NFE 6 of iPNDM, warm-up seed --seed + 1, like `sample`."""
    out = tmp_path / "s.json"
    assert main(["gits", "--limit", "60", "--num-warmup", "4", "--batch-size", "4", "--teacher-steps", "8",
                 "--no-cache", "--out", str(out)]) == 0
    sched = gs.gits.load(out)
    assert sched.params["refine"] and sched.params["gamma"] == list(gs.gits.GAMMAS) and sched.params["seed"] == 1
    assert sched.params["solver"] == "ipndm" and sched.params["nfe"] == 6 and sched.params["selected"]


def test_cli_gits_rejects_bad_metric():
    with pytest.raises(SystemExit):
        main(["gits", "--data", "digits", "--metric", "l3"])


def test_cli_gits_gamma_sweep(tmp_path, capsys):
    printed, sched = run_gits(tmp_path, capsys, "--teacher-steps", "6", "--gamma", "0.9,1.15", "--no-refine")
    assert sched.params["gamma"] == [0.9, 1.15] and printed["gamma"] == sched.params["selected_gamma"]
    assert [r["gamma"] for r in sched.params["selection"]] == [0.9, 1.15]


def test_cli_gits_refine(tmp_path, capsys):
    printed, sched = run_gits(tmp_path, capsys, "--teacher-steps", "8", "--refine")
    assert sched.params["refine"] and all(r["error"] <= r["error_from"] for r in sched.params["refinement"])
    assert printed["indices"] == sched.indices and sched.params["selected"] in {c["name"] for c in sched.params["check"]}


def test_cli_gits_rejects_bad_gamma():
    with pytest.raises(SystemExit):
        main(["gits", "--data", "digits", "--gamma", "a,b"])
