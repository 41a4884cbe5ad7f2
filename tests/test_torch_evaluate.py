"""``mpsd evaluate`` and ``mpsd supplement``: budgets, the protocol, reports, the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("mpsd.integrations.torch")  # before torch: sets its OpenMP wait policy
torch = pytest.importorskip("torch")

import mpsd  # noqa: E402
from mpsd.data import sample_path  # noqa: E402
from mpsd.errors import OptionError  # noqa: E402
from mpsd.evaluate import (  # noqa: E402
    Budget,
    Dataset,
    EvalConfig,
    compress_to_budget,
    load_dataset,
    markdown_table,
    parse_fractions,
    parse_methods,
    run_evaluation,
    write_report,
)

pytestmark = pytest.mark.torch

FAST = {"max_epochs": 2, "patience": 0, "batch_size": 32}


@pytest.fixture(scope="module")
def fm() -> Dataset:
    """300 Fashion-MNIST training and 100 test images (shipped sample)."""
    return load_dataset("sample:fashion-mnist", n_train=300, n_test=100, seed=0)


def test_parsers() -> None:
    assert parse_fractions("0.1, 20%", what="--budget") == (0.1, 0.2)
    assert parse_fractions(None, what="--budget") == ()
    with pytest.raises(OptionError, match="in \\(0, 1\\]"):
        parse_fractions("1.5", what="--budget")
    with pytest.raises(OptionError, match="fractions"):
        parse_fractions("a", what="--budget")
    assert parse_methods("all")[0] == "original" and "webp" in parse_methods("all")
    assert parse_methods("mpsd, svd,mpsd") == ("mpsd", "svd")
    with pytest.raises(OptionError, match="unknown method"):
        parse_methods("mpsd,zip")
    with pytest.raises(OptionError, match="need --budget"):
        EvalConfig(methods=("mpsd",), budgets=())


def test_load_dataset_subsets_are_stratified(fm: Dataset) -> None:
    assert fm.x_train.shape == (300, 28, 28, 1) and fm.x_test.shape == (100, 28, 28, 1)
    with np.load(sample_path("fashion-mnist")) as d:
        share = np.bincount(d["y_train"], minlength=10) * 300 / d["y_train"].size
    counts = np.bincount(fm.y_train, minlength=10)
    assert (np.abs(counts - share) < 1).all()  # stratified: every class in proportion
    assert fm.num_classes == 10


def test_compress_to_budget_meets_byte_and_ratio_budgets(fm: Dataset, tmp_path: Path) -> None:
    x, y = fm.x_train, fm.y_train
    budget = Budget("bytes", 0.3, int(x.nbytes))
    archive, settings = compress_to_budget(x, tmp_path / "a.zarr", budget, labels=y)
    assert archive.bytes_on_disk <= budget.nbytes
    assert archive.bytes_on_disk >= 0.9 * budget.nbytes  # close to the budget, not far below
    assert mpsd.open(tmp_path / "a.zarr").labels.tolist() == y.tolist()
    assert 0 < settings["ratio"] < 1
    ratio_archive, _ = compress_to_budget(x, tmp_path / "b.zarr", Budget("ratio", 0.4, int(x.nbytes)))
    assert ratio_archive.stats().param_ratio <= 0.4 + 1e-9
    with pytest.raises(OptionError, match="cannot fit"):
        compress_to_budget(x, tmp_path / "c.zarr", Budget("bytes", 0.01, int(x.nbytes)), labels=y)


def test_run_evaluation_every_arm_meets_its_budget(fm: Dataset, tmp_path: Path) -> None:
    config = EvalConfig(
        methods=("original", "mpsd", "svd", "random", "jpeg"),
        budgets=(0.3,),
        param_ratios=(0.4,),
        recipe_overrides=FAST,
        repeats=2,
        device="cpu",
        workdir=tmp_path / "work",
        keep_stores=True,
    )
    events: list[str] = []
    partials: list = []
    report = run_evaluation(fm, config, progress=lambda e, _i: events.append(e), checkpoint=partials.append)
    runs = report.runs
    # a partial report after every finished run (and after the arm that could not be built)
    assert report.complete and not any(p.complete for p in partials)
    counts = [len(p.runs) for p in partials]
    assert counts == sorted(counts) and counts[-1] == len(runs)
    assert sum(b > a for a, b in zip([0, *counts], counts, strict=False)) == len(runs)
    assert len(partials) == len(runs) + len(report.failures)
    assert partials[-1].runs == runs
    assert markdown_table(partials[0].to_dict()).startswith("**Partial results: ")
    assert not markdown_table(report.to_dict()).startswith("**Partial")
    assert report.environment["dataset"]["n_train"] == 270 and report.environment["dataset"]["n_val"] == 30
    for run in runs:
        assert run["meets_budget"], run["method"]
        budget = run["budget"]
        if budget is None:
            assert run["method"] == "original"
        elif budget["kind"] == "bytes":
            assert run["bytes_on_disk"] <= budget["budget_bytes"]
        elif run["param_ratio"] is not None:
            assert run["param_ratio"] <= budget["fraction"] + 1e-9
        assert 0 <= run["test_acc"] <= 1
    # a method that cannot meet a budget is reported, not silently dropped
    assert {f["method"] for f in report.failures} <= {"jpeg"}
    methods = {(r["method"], r["budget"]["label"] if r["budget"] else "—", r["protocol"]) for r in runs}
    assert ("mpsd", "30% bytes", "equal-epochs") in methods
    assert ("random", "30% bytes", "equal-steps") in methods
    assert ("mpsd", "equal-steps") not in {(m, p) for m, _, p in methods}
    # equal steps: the coreset gets as many steps per epoch as the full training part
    full = next(r for r in runs if r["method"] == "original")
    coreset = next(r for r in runs if r["method"] == "random" and r["protocol"] == "equal-steps")
    subset = next(r for r in runs if r["method"] == "random" and r["protocol"] == "equal-epochs")
    assert coreset["steps_per_epoch"] == full["steps_per_epoch"] > subset["steps_per_epoch"]
    # repeats: two seeds per arm, aggregated as mean ± std
    row = next(r for r in report.summary if r["method"] == "mpsd" and r["budget"] == "30% bytes")
    assert row["repeats"] == 2 and len(row["accs"]) == 2
    assert row["acc_mean"] == pytest.approx(np.mean(row["accs"]))
    assert {r["seed"] for r in runs} == {0, 1}
    assert "plan" in events and "run" in events
    assert list((tmp_path / "work").glob("mpsd-*.zarr"))  # kept on request
    # reports
    json_path, md_path = write_report(report.to_dict(), tmp_path / "out")
    loaded = json.loads(json_path.read_text())
    assert len(loaded["runs"]) == len(runs)
    table = md_path.read_text()
    assert table == markdown_table(report.to_dict())
    assert table.count("\n| ") == len(report.summary) + 1  # header + one row per arm
    assert " ± " in table


def test_mpsd_kd_arm_fits_the_budget_with_its_supplement(fm: Dataset, tmp_path: Path) -> None:
    config = EvalConfig(
        methods=("mpsd-kd",), budgets=(0.3,), param_ratios=(0.3,), recipe_overrides=FAST, device="cpu",
        kd_options={"bond": "1", "epochs": 1},
    )  # fmt: skip
    report = run_evaluation(fm, config)
    assert not report.failures
    assert [r["method"] for r in report.runs] == ["mpsd-kd", "mpsd-kd"]
    by_kind = {r["budget"]["kind"]: r for r in report.runs}
    assert by_kind["bytes"]["bytes_on_disk"] <= by_kind["bytes"]["budget"]["budget_bytes"]
    assert by_kind["ratio"]["param_ratio"] <= 0.3 + 1e-9
    for run in report.runs:
        assert run["settings"]["supplement_bytes"] > 0
        kd = run["settings"]["kd"]
        assert kd["final_loss"] < kd["initial_loss"]


def test_mpsd_kd_arm_says_when_the_supplement_alone_is_over_the_budget(fm: Dataset, tmp_path: Path) -> None:
    # bond 2 on the 2,4,7,7,2 sites is 80 parameters per 784-pixel image: more than 10 % of the bytes,
    # while mpsd alone fits (bond 1 is about 8 %)
    config = EvalConfig(
        methods=("mpsd-kd",), budgets=(0.1,), recipe_overrides=FAST, device="cpu", kd_options={"bond": "2", "epochs": 1},
    )  # fmt: skip
    report = run_evaluation(fm, config)
    assert not report.runs
    (failure,) = report.failures
    assert "supplement alone" in failure["reason"] and "no room" in failure["reason"]


def test_store_arm_trains_from_a_store_through_store_dataset(fm: Dataset, tmp_path: Path) -> None:
    path = tmp_path / "user.zarr"
    mpsd.compress(fm.x_train[:50], path, ratio=0.3, labels=fm.y_train[:50])
    report = run_evaluation(fm, EvalConfig(methods=(), budgets=(), store=path, recipe_overrides=FAST, device="cpu"))
    (run,) = report.runs
    assert run["method"] == "store" and run["n_images"] == 50


@pytest.mark.parametrize("command", ["evaluate", "supplement"])
def test_missing_torch_names_the_extra(command: str, tmp_path: Path) -> None:
    # a fresh interpreter in which torch cannot be imported
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from mpsd.cli import main\n"
        f"main({[command, 'sample:fashion-mnist'] if command == 'evaluate' else [command, str(tmp_path), '--original', 'x.npz']!r})\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert f"mpsd {command} needs torch" in proc.stderr
    assert "pip install 'mpsd[torch]'" in proc.stderr
    assert "Traceback" not in proc.stderr


def _npz(tmp_path: Path, n_train: int = 200) -> Path:
    with np.load(sample_path("fashion-mnist")) as d:
        path = tmp_path / "fm.npz"
        np.savez(path, x_train=d["x_train"][:n_train], y_train=d["y_train"][:n_train], x_test=d["x_test"][:60], y_test=d["y_test"][:60], classes=d["classes"])
    return path


def test_cli_evaluate_prints_and_writes_the_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from mpsd.cli import main

    data = _npz(tmp_path, 300)
    out = tmp_path / "res"
    with pytest.raises(SystemExit) as exc:
        main(["evaluate", str(data), "--methods", "original,mpsd,random", "--budget", "0.3",
              "--max-epochs", "1", "--out", str(out), "--device", "cpu", "--quiet"])  # fmt: skip
    assert exc.value.code in (0, None)
    captured = capsys.readouterr()
    assert "| Method | Budget |" in captured.out
    assert "| mpsd | 30% bytes |" in captured.out
    assert (out / "results.json").is_file() and (out / "results.md").is_file()
    result = json.loads((out / "results.json").read_text())
    assert all(r["meets_budget"] for r in result["runs"])
    assert result["complete"] is True and not (out / "results.md").read_text().startswith("**Partial")


def test_cli_evaluate_stopped_keeps_the_finished_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from mpsd.cli import main
    from mpsd.evaluate import runner
    from mpsd.integrations.torch import train

    real_fit, calls = train.fit, []

    def fit_then_stop(*args, **kwargs):  # the second model is interrupted (Ctrl-C)
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(train, "fit", fit_then_stop)
    out = tmp_path / "res"
    with pytest.raises(SystemExit) as exc:
        main(["evaluate", str(_npz(tmp_path)), "--methods", "original,random", "--budget", "0.3",
              "--max-epochs", "1", "--out", str(out), "--device", "cpu", "--quiet"])  # fmt: skip
    assert exc.value.code == 130
    result = json.loads((out / "results.json").read_text())
    assert result["complete"] is False
    assert [r["method"] for r in result["runs"]] == ["original"]
    assert (out / "results.md").read_text().startswith("**Partial results: 1 run(s) finished so far**")
    assert not list(out.glob(".*tmp"))  # no temporary files left behind
    err = capsys.readouterr().err
    assert "1 finished run(s) are in" in err and "Traceback" not in err

    # --resume with other settings is refused, in one line, and changes nothing
    with pytest.raises(SystemExit) as exc:
        main(["evaluate", str(_npz(tmp_path)), "--methods", "original,random", "--budget", "0.4",
              "--max-epochs", "1", "--out", str(out), "--device", "cpu", "--quiet", "--resume"])  # fmt: skip
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "cannot resume: the earlier run had other settings (budgets was [0.3], now [0.4])" in err
    assert json.loads((out / "results.json").read_text()) == result

    # --resume with the same settings trains only the missing runs and keeps the finished one
    calls.clear()
    monkeypatch.setattr(train, "fit", lambda *a, **k: (calls.append(1), real_fit(*a, **k))[1])
    real_build, built = runner.build_arm, []
    monkeypatch.setattr(runner, "build_arm", lambda method, *a, **k: (built.append(method), real_build(method, *a, **k))[1])
    with pytest.raises(SystemExit) as exc:
        main(["evaluate", str(_npz(tmp_path)), "--methods", "original,random", "--budget", "0.3",
              "--max-epochs", "1", "--out", str(out), "--device", "cpu", "--quiet", "--resume"])  # fmt: skip
    assert exc.value.code in (0, None)
    resumed = json.loads((out / "results.json").read_text())
    assert resumed["complete"] is True
    assert len(calls) == 2  # random, equal epochs and equal steps; not the original arm again
    assert built == ["random"]  # the finished arm is not even rebuilt
    assert resumed["runs"][0] == result["runs"][0]
    assert [(r["method"], r["protocol"]) for r in resumed["runs"]] == [
        ("original", "equal-epochs"), ("random", "equal-epochs"), ("random", "equal-steps")]
    assert resumed["seconds"] > result["seconds"]


def test_resume_mismatch_names_what_changed(fm: Dataset) -> None:
    from mpsd.evaluate import resume_mismatch

    config = EvalConfig(methods=("original", "mpsd"), budgets=(0.2,), recipe_overrides=FAST)
    env = {"dataset": {"name": "x", "n_train": 10}, "model": "small_cnn", "recipe": {"name": "cpu"}, "store_format": 2}
    previous = json.loads(json.dumps({"config": config.to_dict(), "environment": env, "runs": []}))
    assert resume_mismatch(previous, config, env) is None
    # more repeats, another device or thread count: still the same evaluation
    assert resume_mismatch(previous, EvalConfig(methods=("original", "mpsd"), budgets=(0.2,), recipe_overrides=FAST, repeats=3, threads=1), env) is None
    other = EvalConfig(methods=("original", "mpsd"), budgets=(0.2,), recipe_overrides={**FAST, "max_epochs": 5})
    assert "recipe_overrides" in (resume_mismatch(previous, other, env) or "")
    assert "another dataset" in (resume_mismatch(previous, config, {**env, "dataset": {"name": "y", "n_train": 10}}) or "")
    assert resume_mismatch({"runs": []}, config, env) == "not an mpsd evaluate report"
    # a report from before store format 2 (no "store_format") had larger mpsd stores at each budget
    before = {**previous, "environment": {k: v for k, v in previous["environment"].items() if k != "store_format"}}
    assert "format 1" in (resume_mismatch(before, config, env) or "")


def test_cli_evaluate_refuses_an_output_it_cannot_write_before_training(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from mpsd.cli import main

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(SystemExit) as exc:
        main(["evaluate", "sample:fashion-mnist", "--out", str(blocker / "res"), "--quiet"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"--out {blocker / 'res'}: cannot write the results there" in err and "Traceback" not in err
    assert blocker.read_text() == "not a folder"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--budget", "1.5"], "--budget values must be in (0, 1]"),
        (["--methods", "zip"], "unknown method"),
        (["--model", "alexnet"], "unknown model"),
    ],
)
def test_cli_evaluate_user_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str) -> None:
    from mpsd.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["evaluate", "sample:fashion-mnist", *args])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_cli_supplement(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from mpsd.cli import main

    data = _npz(tmp_path, 120)
    store = tmp_path / "s.zarr"
    with np.load(data) as d:
        mpsd.compress(d["x_train"], store, ratio=0.2, labels=d["y_train"])
    teacher = tmp_path / "teacher.pt"
    with pytest.raises(SystemExit) as exc:
        main(["supplement", str(store), "--original", str(data), "--max-epochs", "2", "--epochs", "2",
              "--save-teacher", str(teacher), "--dry-run", "--json", "--device", "cpu"])  # fmt: skip
    assert exc.value.code in (0, None)
    report = json.loads(capsys.readouterr().out)
    assert report["loss_stored"] is None and report["loss_dense"] < report["loss_at_zero"]
    assert report["teacher"]["kind"] == "trained" and teacher.is_file()
    # the saved teacher is reusable
    with pytest.raises(SystemExit) as exc:
        main(["supplement", str(store), "--original", str(data), "--teacher", str(teacher), "--epochs", "1", "--dry-run", "-q"])
    assert exc.value.code in (0, None)
    assert "KD loss at S̃ = 0" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        main(["supplement", str(store), "--original", str(data), "--teacher", "nomodule", "--dry-run"])
    assert exc.value.code == 2
    assert mpsd.open(store).stats().supplement_bytes == 0
    # for real: the bias lands in the store and stats counts its bytes
    with pytest.raises(SystemExit) as exc:
        main(["supplement", str(store), "--original", str(data), "--teacher", str(teacher), "--epochs", "1",
              "--bond", "2", "--json"])  # fmt: skip
    assert exc.value.code in (0, None)
    report = json.loads(capsys.readouterr().out)
    stats = mpsd.open(store).stats()
    assert stats.supplement_bytes == report["supplement_bytes"] > 0
    assert report["bytes_after"] > report["bytes_before"]


def test_resumed_evaluation_loads_the_kept_teacher(fm: Dataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An evaluation stopped after its original arm resumes its mpsd-kd arms with the same teacher,
    loaded from ``teacher_dir``, not trained again."""
    import torch

    from mpsd.evaluate import runner
    from mpsd.integrations.torch import train

    config = EvalConfig(methods=("original", "mpsd-kd"), budgets=(0.3,), recipe_overrides=FAST, device="cpu",
                        threads=1, kd_options={"bond": 1, "epochs": 1})  # fmt: skip
    real_fit, real_build = train.fit, runner.build_kd_arm
    fits: list[int] = []
    teachers: list[dict[str, torch.Tensor]] = []

    def build_recording(x, y, budget, teacher, **kwargs):  # type: ignore[no-untyped-def]
        teachers.append({k: v.detach().clone() for k, v in teacher.state_dict().items()})
        return real_build(x, y, budget, teacher, **kwargs)

    def fit_then_stop(*args, **kwargs):  # type: ignore[no-untyped-def]
        fits.append(1)
        if len(fits) == 2:  # the student of the mpsd-kd arm
            raise KeyboardInterrupt
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(runner, "build_kd_arm", build_recording)
    monkeypatch.setattr(train, "fit", fit_then_stop)
    partials: list = []
    with pytest.raises(KeyboardInterrupt):
        run_evaluation(fm, config, checkpoint=partials.append, teacher_dir=tmp_path)
    assert (tmp_path / "teacher-seed0.pt").is_file()

    fits.clear()
    monkeypatch.setattr(train, "fit", lambda *a, **k: (fits.append(1), real_fit(*a, **k))[1])
    report = run_evaluation(fm, config, resume_from=partials[-1], teacher_dir=tmp_path)
    assert len(fits) == 1  # the student only; the teacher was loaded
    assert [r["method"] for r in report.runs] == ["original", "mpsd-kd"]
    assert len(teachers) == 2 and teachers[0].keys() == teachers[1].keys()
    assert all(torch.equal(teachers[0][k], teachers[1][k]) for k in teachers[0])

    # a kept teacher made another way is not used
    saved = torch.load(tmp_path / "teacher-seed0.pt", weights_only=True)
    from mpsd.integrations.torch.models import build_model

    model = build_model("small_cnn", 1, 10, (28, 28), mean=[0.5], std=[0.5])
    assert runner._load_teacher(model, tmp_path, 0, saved["key"]) is True
    assert runner._load_teacher(model, tmp_path, 0, saved["key"].replace("small_cnn", "vgg16")) is False
    assert runner._load_teacher(model, tmp_path, 1, saved["key"]) is False  # no file for seed 1
