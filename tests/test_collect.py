"""softmoe.collect (and softmoe.harness.sweeps, its library) on sweep directories laid out as Hydra multirun writes
them, and on the offline W&B run
files of a real sweep."""

import io
import json
import logging
import math
import os
import shutil
import subprocess
import sys

import pytest
import yaml
from omegaconf import OmegaConf

from conftest import ROOT, train_killed_after
from processes import run_forked
from softmoe import collect
from softmoe.harness import sweep_console, sweeps
from softmoe.harness.errors import NoRunsError


def write_run(root, job, overrides, accuracies, test=None):
    """A run directory as the trainer leaves it: ``val/acc`` per epoch, then the test split once at the end
    (``test`` = (final model, best-on-validation checkpoint))."""
    run = root / str(job)
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    with open(run / "metrics.jsonl", "w") as f:
        for step, acc in enumerate(accuracies):
            f.write(json.dumps({"step": step, "train/loss": 1.0 / (step + 1)}) + "\n")
            f.write(json.dumps({"step": step, "val/acc": acc}) + "\n")
        if test is not None:
            f.write(json.dumps({"step": len(accuracies), "test/acc": test[0], "test/acc_at_best_val": test[1]}) + "\n")
        f.write('{"step": 99, "val/acc": 0.')  # a torn last line from a killed run is skipped


@pytest.fixture
def sweep(tmp_path):
    job = 0
    for experts, base in (("4", 0.80), ("8", 0.90)):
        for seed in (0, 1, 2):
            write_run(tmp_path, job, [f"moe.num_experts={experts}", f"seed={seed}", "logger=none"],
                      [base - 0.1, base + 0.01 * seed, base - 0.05], test=(base - 0.02 * seed, base + 0.01))
            job += 1
    return tmp_path


def test_reports_selection_on_val_and_the_test_split_of_the_final_and_best_val_models(sweep, capsys):
    assert collect.main([str(sweep)]) == 0
    table = (sweep / "results.md").read_text()
    lines = table.splitlines()
    assert lines[0] == (
        "| moe.num_experts | runs | best val/acc | test/acc (final model) | test/acc (best-val checkpoint) |"
    )
    assert lines[2] == "| 4 | 3 | 81.00% ± 1.00 | 78.00% ± 2.00 | 81.00% ± 0.00 |"  # percent, as the trainer prints
    assert lines[3] == "| 8 | 3 | 91.00% ± 1.00 | 88.00% ± 2.00 | 91.00% ± 0.00 |"
    assert (sweep / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "wrote" in capsys.readouterr().out


def test_help_says_the_spread_is_the_sample_standard_deviation_over_seeds(capsys):
    """The seeds 0.80, 0.81, 0.82 of the sweep fixture are shown as ± 1.00 points: n - 1, not n (0.82)."""
    with pytest.raises(SystemExit):
        collect.main(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "Each cell is the mean ± the sample standard deviation (n - 1) over a group's seeds; n/a for one seed." \
        in help_text


def test_a_single_run_has_no_std_and_a_test_metric_is_never_reduced_to_its_best(tmp_path, capsys):
    write_run(tmp_path, 0, ["moe.num_experts=4"], [0.5, 0.7, 0.6], test=(0.65, 0.72))
    write_run(tmp_path, 1, ["moe.num_experts=8"], [0.5, 0.8], test=(0.75, 0.8))
    write_run(tmp_path, 2, ["moe.num_experts=8"], [0.5, 0.9])  # still running: no test yet, so left out
    collect.main([str(tmp_path), "--metric", "test/acc,train/loss"])
    lines = (tmp_path / "results.md").read_text().splitlines()
    assert lines[0].endswith("| test/acc (best-val checkpoint) | final train/loss |")  # no "best test/acc"
    assert lines[2] == "| 4 | 1 | 70.00% ± n/a | 65.00% ± n/a | 72.00% ± n/a | 0.3333 ± n/a |"
    assert lines[3] == "| 8 | 1 | 80.00% ± n/a | 75.00% ± n/a | 80.00% ± n/a | 0.5000 ± n/a |"
    output = capsys.readouterr()
    assert output.err == f"warning: left out of the table 1 unfinished run (no test/acc logged yet): {tmp_path / '2'}\n"
    assert output.out.endswith("(2 runs)\n")


def test_the_selection_metric_is_reduced_to_its_best_and_the_test_metrics_to_their_final_value():
    """A run resumed from before its final test logs the test split again: the table reads the last value of each
    test column, never the best of them (which would select on the test split)."""
    history = {"val/acc": [0.5, 0.9, 0.7], "test/acc": [0.8, 0.6], "test/acc_at_best_val": [0.75, 0.65]}
    runs = [sweeps.RunResult("0", {"seed": "0"}, history)]
    lines = sweeps.markdown_table(sweeps.summarize(runs, [], []), [], []).splitlines()
    assert lines[2] == "| 1 | 90.00% ± n/a | 60.00% ± n/a | 65.00% ± n/a |"


def test_a_cell_over_fewer_runs_than_its_row_says_how_many():
    """A further metric that one seed did not log (a dense run has no routing statistics) is not shown as if it
    were the mean over the row's runs."""
    runs = [sweeps.RunResult(str(seed), {"seed": str(seed)}, {"val/acc": [0.5], "test/acc": [0.6]}) for seed in (0, 1)]
    runs[0].history["routing/block1/dispatch_entropy"] = [0.9]
    by, metrics = [], ["routing/block1/dispatch_entropy"]
    lines = sweeps.markdown_table(sweeps.summarize(runs, by, metrics), by, metrics).splitlines()
    assert lines[2] == "| 2 | 50.00% ± 0.00 | 60.00% ± 0.00 | 0.9000 ± n/a (n=1) |"


def test_an_accuracy_never_measured_is_left_out_of_its_cell_and_a_diverged_loss_is_not():
    """Seed 1's best.pt was damaged before its test (``test/acc_at_best_val`` NaN): the cell pools seed 0's alone and
    says so (was: a NaN mean for the whole group). A NaN loss is a diverged run's, and its cell shows it."""
    runs = [sweeps.RunResult(str(seed), {"seed": str(seed)}, {"val/acc": [0.5], "test/acc": [0.6],
                                                              "test/acc_at_best_val": [acc], "train/loss": [loss]})
            for seed, acc, loss in ((0, 0.7, 1.0), (1, math.nan, math.nan))]
    by, metrics = [], ["train/loss"]
    lines = sweeps.markdown_table(sweeps.summarize(runs, by, metrics), by, metrics).splitlines()
    assert lines[2] == "| 2 | 50.00% ± 0.00 | 60.00% ± 0.00 | 70.00% ± n/a (n=1) | nan ± nan |"


def test_a_cell_is_the_mean_and_the_n_minus_1_std_of_uneven_seeds_computed_by_hand(tmp_path):
    """Seeds whose test accuracies are uneven (0.70, 0.71, 0.75): their mean (0.72) is not their median (0.71), and
    the sample std divides by n - 1 = 2, not n = 3."""
    accuracies = (0.70, 0.71, 0.75)
    for seed, accuracy in enumerate(accuracies):
        write_run(tmp_path, seed, ["moe.num_experts=4", f"seed={seed}"], [0.5, 0.6], test=(accuracy, accuracy))
    mean = sum(accuracies) / 3
    std = math.sqrt(sum((accuracy - mean) ** 2 for accuracy in accuracies) / (3 - 1))
    (summary,) = sweeps.summarize(sweeps.load_sweep(tmp_path), [])
    cell = summary.cells["test/acc (final model)"]
    assert (cell.mean, cell.std, cell.runs) == (pytest.approx(0.72), pytest.approx(std), 3)
    assert str(cell) == f"{100 * mean:.2f}% ± {100 * std:.2f}" == "72.00% ± 2.65"


@pytest.mark.slow
def test_unfinished_runs_of_a_real_sweep_are_named_and_left_out_and_the_run_count_is_what_the_table_pools(
        offline_sweep, tmp_path, capsys):
    """A run cut mid-run (the first half of its metrics.jsonl) or one that logged nothing would add a partial best
    val/acc to its group's mean while missing from the test columns."""
    import shutil

    sweep = tmp_path / "sweep"
    shutil.copytree(offline_sweep, sweep, ignore=shutil.ignore_patterns("wandb", "*.pt"))
    shutil.copytree(sweep / "0", sweep / "2")  # moe.num_experts=4 again, cut short
    logged = (sweep / "0" / "metrics.jsonl").read_bytes()
    (sweep / "2" / "metrics.jsonl").write_bytes(logged[:len(logged) // 2])
    shutil.copytree(sweep / "1" / ".hydra", sweep / "3" / ".hydra")  # moe.num_experts=8 again, nothing logged
    (sweep / "3" / "metrics.jsonl").write_text("")
    assert collect.main([str(sweep)]) == 0
    output = capsys.readouterr()
    assert output.err == (f"warning: left out of the table 2 unfinished runs (no test/acc logged yet): {sweep / '2'}, "
                          f"{sweep / '3'}\n")
    assert output.out.endswith("(2 runs)\n")
    for line, job in zip((sweep / "results.md").read_text().splitlines()[2:], (0, 1)):
        logged = sweeps.read_metrics(sweep / str(job) / "metrics.jsonl")
        expected = [max(logged["val/acc"]), logged["test/acc"][-1], logged["test/acc_at_best_val"][-1]]
        assert line.split(" | ")[1:] == ["1", *(f"{100 * value:.2f}% ± n/a" for value in expected[:2]),
                                         f"{100 * expected[2]:.2f}% ± n/a |"]


def test_a_sweep_whose_runs_have_not_finished_says_so_in_one_message(tmp_path, capsys):
    # was two messages: the command's "no run has finished (logged test/acc) yet: <run dirs>", the notebooks'
    # (summarize) "no run has finished (logged test/acc): <run names>", neither naming the folder searched
    write_run(tmp_path, 0, ["seed=0"], [0.5, 0.8])
    write_run(tmp_path, 1, ["seed=1"], [0.5])
    message = (f"no run has finished: none of the run directories below {tmp_path} logged test/acc (the trainer logs "
               "it when training ends): 0, 1")
    assert collect.main([str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"error: {message}\n"
    assert not (tmp_path / "results.md").exists()
    runs = sweeps.load_sweep(tmp_path)
    with pytest.raises(NoRunsError) as raised:  # what the notebooks see
        sweeps.summarize(runs, sweeps.swept_keys(runs))
    assert str(raised.value) == message
    # a single run's own directory (was: "...when training ends): .")
    assert collect.main([str(tmp_path / "1")]) == 2
    assert capsys.readouterr().err.endswith("(the trainer logs it when training ends): the directory itself\n")


@pytest.mark.slow
def test_offline_wandb_runs_none_of_which_finished_name_the_folder_searched(compose_run, tmp_path, monkeypatch, capsys):
    run = ["trainer.batch_size=256", "trainer.log_every=1", "trainer.max_steps=4", "model.depth=2",
           "logger.mode=offline", "trainer.progress_bar=false"]
    train_killed_after(2, compose_run(*run), tmp_path / "run", monkeypatch)  # steps 1-2 logged, no test/acc
    (killed,) = sweeps.load_wandb_offline(tmp_path)
    assert collect.main(["--wandb-dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err == (f"error: no run has finished: none of the offline W&B runs below {tmp_path} "
                                       f"logged test/acc (the trainer logs it when training ends): {killed.name}\n")


def test_an_out_that_is_a_file_is_refused_in_one_line(sweep, capsys):
    out = sweep / "0" / "metrics.jsonl"
    assert collect.main([str(sweep), "--out", str(out)]) == 2
    assert capsys.readouterr().err == (f"error: --out {out} cannot be a directory (File exists: {out}); --out names "
                                       "the directory results.md and results.png go to\n")
    assert collect.main([str(sweep), "--out", str(out / "results")]) == 2
    assert capsys.readouterr().err.startswith(f"error: --out {out / 'results'} cannot be a directory (Not a directory")
    assert not (sweep / "results.md").exists()


def test_explicit_grouping_and_output_dir(sweep, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    collect.main([str(sweep), "--by", "moe.num_experts,seed", "--metric", "train/loss", "--out", str(out)])
    lines = (out / "results.md").read_text().splitlines()
    assert len(lines) == 2 + 6 and lines[0].startswith("| moe.num_experts | seed | runs | best val/acc |")
    assert lines[0].endswith("| final train/loss |")


def test_grouping_by_a_key_no_run_overrides_is_refused_not_pooled(sweep, capsys, tmp_path):
    """A typo in --by would put every run in one group: different configs averaged as if they were seeds."""
    assert collect.main([str(sweep), "--by", "moe.num_expert"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: no run overrides 'moe.num_expert', so grouping by it would pool every run; "
                            "did you mean moe.num_experts? (the runs override: ")
    with pytest.raises(NoRunsError, match="no run overrides 'moe.num_expert'"):  # the notebooks' summarize too
        sweeps.summarize(sweeps.load_sweep(sweep), ["moe.num_expert"])
    assert collect.main([str(sweep), "--by", " moe.num_experts ,", "--out", str(tmp_path)]) == 0  # spaces dropped
    assert capsys.readouterr().out.startswith("| moe.num_experts | runs |")
    for empty in (",", ""):  # was: "no run overrides ''" (",") or the swept keys, silently ("")
        assert collect.main([str(sweep), "--by", empty]) == 2
        assert capsys.readouterr().err == (f"error: --by {empty!r}: names no override key; give them comma-separated "
                                           "(--by moe.num_experts,moe.slots_per_expert), or leave --by out to group "
                                           "by the swept keys\n")


def test_keys_that_do_not_change_an_experiment_and_unfinished_runs_make_no_column(tmp_path, capsys):
    """A basic and a joblib sweep of the same settings, pooled, were split into `basic` and `joblib` rows; an
    unfinished run without a launcher override added a `launcher` column reading `basic` in every row."""
    for job, (launcher, experts, seed) in enumerate((("basic", 4, 0), ("basic", 8, 0), ("joblib", 4, 1),
                                                      ("joblib", 8, 1))):
        write_run(tmp_path / "pooled", job, [f"moe.num_experts={experts}", f"seed={seed}", f"launcher={launcher}",
                                             "trainer.device=cpu"], [0.5], test=(0.5 + seed / 10, 0.5))
    write_run(tmp_path / "pooled", 4, ["moe.num_experts=4", "optimizer.lr=0.01"], [0.5])  # still training
    assert collect.main([str(tmp_path / "pooled")]) == 0
    header, _, *rows = (tmp_path / "pooled" / "results.md").read_text().splitlines()
    assert header.startswith("| moe.num_experts | runs | best val/acc |")
    assert rows == ["| 4 | 2 | 50.00% ± 0.00 | 55.00% ± 7.07 | 50.00% ± 0.00 |",
                    "| 8 | 2 | 50.00% ± 0.00 | 55.00% ± 7.07 | 50.00% ± 0.00 |"]
    assert collect.main([str(tmp_path / "pooled"), "--by", "launcher"]) == 0  # an explicit --by still wins
    rows = (tmp_path / "pooled" / "results.md").read_text().splitlines()
    assert rows[0].startswith("| launcher | runs |")
    assert [row.split(" | ")[:3] for row in rows[2:]] == [["| basic", "2", "50.00% ± 0.00"],
                                                          ["| joblib", "2", "50.00% ± 0.00"]]
    assert sweeps.non_identity_keys() >= {"launcher", "logger", "trainer.device", "trainer.num_workers"}


def test_groups_sort_in_natural_order(tmp_path):
    for job, (shape, dropped) in enumerate((("16x1", 0.3), ("4x4", 0.1), ("32x1", 0.2), ("8x2", 0.4))):
        run = tmp_path / str(job)
        (run / ".hydra").mkdir(parents=True)
        (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"experts_slots={shape}"]))
        events = [{"step": 1, "routing/block3/dropped_fraction": dropped + 0.5},
                  {"step": 2, "routing/block3/dropped_fraction": dropped}, {"step": 2, "test/acc": 0.5}]
        (run / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    collect.main([str(tmp_path), "--metric", "routing/block3/dropped_fraction"])
    lines = (tmp_path / "results.md").read_text().splitlines()
    assert lines[0] == "| experts_slots | runs | test/acc (final model) | final routing/block3/dropped_fraction |"
    rows = [line.split(" | ") for line in lines[2:]]
    assert [row[0] for row in rows] == ["| 4x4", "| 8x2", "| 16x1", "| 32x1"]
    assert [row[3] for row in rows] == ["0.1000 ± n/a |", "0.4000 ± n/a |", "0.3000 ± n/a |", "0.2000 ± n/a |"]


def test_parse_overrides():
    assert sweeps.parse_overrides(["a.b=1", "+c=x=y", "~d", "e=[1,2]"]) == {"a.b": "1", "c": "x=y", "e": "[1,2]"}


def test_empty_or_missing_sweeps_say_so(tmp_path, capsys):
    assert collect.main([str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"error: no run directories (with metrics.jsonl) below {tmp_path}\n"
    with pytest.raises(NoRunsError, match="no run directories"):  # what the notebooks see: no SystemExit
        sweeps.load_sweep(tmp_path)
    for argv, message in (([str(tmp_path / "missing")], f"{tmp_path / 'missing'} (no such directory)"),
                          ([], "name the runs to tabulate: a sweep (or run) directory, --wandb-dir DIR or --wandb "
                               "ENTITY/PROJECT")):  # was: "sweep_dir must be an existing directory, got None"
        with pytest.raises(SystemExit):
            collect.main(argv)
        assert message in capsys.readouterr().err


def test_the_wandb_api_out_of_reach_is_one_line_naming_the_offline_files(tmp_path):
    """Here no API key is configured (a fresh HOME): W&B's UsageError was a 20-line traceback, exit status 1."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("WANDB_")}
    env.update(HOME=str(tmp_path), WANDB_CONFIG_DIR=str(tmp_path), WANDB_DIR=str(tmp_path), PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, "-m", "softmoe.collect", "--wandb", "me/proj", "--group", "sweep"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert (result.returncode, result.stderr.count("\n")) == (2, 1), result.stderr[-2000:]
    assert result.stderr.startswith("error: W&B project 'me/proj': the W&B API could not be read (")
    assert result.stderr.endswith("); log in with `wandb login` where W&B is reachable, or read the runs' offline "
                                  "files (python -m softmoe.collect --wandb-dir SWEEP_DIR)\n")


def test_a_metric_no_run_logged_writes_nothing(tmp_path, capsys):
    # was: the one-line error, after results.md had been written without the column
    for job, seed in enumerate((0, 1)):
        write_run(tmp_path / "sweep", job, [f"seed={seed}"], [0.5, 0.8], test=(0.7, 0.75))
    out = tmp_path / "out"
    metric = "routing/block2/dispatch_entropy"
    assert collect.main([str(tmp_path / "sweep"), "--metric", metric, "--out", str(out)]) == 2
    assert capsys.readouterr().err == ("error: --metric routing/block2/dispatch_entropy: no finished run logged it "
                                       "(the runs logged: step, test/acc, test/acc_at_best_val, train/loss, val/acc)\n")
    assert not out.exists() and not (tmp_path / "sweep" / "results.md").exists()


def test_a_metric_of_a_block_without_moe_names_the_logged_one_and_plot_takes_a_metrics_name(tmp_path, monkeypatch,
                                                                                           capsys):
    """Were: "no run logged the column 'final routing/block2/dispatch_entropy'" (block 3 is the only MoE block), and
    "no run logged the column 'test/acc'" for --plot test/acc (its column is "test/acc (final model)")."""
    for job, seed in enumerate((0, 1)):
        write_run(tmp_path, job, [f"seed={seed}"], [0.5, 0.8], test=(0.7, 0.75))
        with open(tmp_path / str(job) / "metrics.jsonl", "a") as f:
            f.write('\n{"step": 2, "routing/block3/dispatch_entropy": 0.9}\n')
    assert collect.main([str(tmp_path), "--metric", "routing/block2/dispatch_entropy"]) == 2
    assert capsys.readouterr().err == ("error: --metric routing/block2/dispatch_entropy: no finished run logged it; "
                                       "did you mean routing/block3/dispatch_entropy?\n")
    plotted = []
    monkeypatch.setattr(collect, "plot", lambda summaries, by, column, path: (plotted.append(column), path.touch()))
    for name, column in (("test/acc", "test/acc (final model)"), ("val/acc", "best val/acc"),
                         ("test/acc (best-val checkpoint)", "test/acc (best-val checkpoint)")):
        assert collect.main([str(tmp_path), "--plot", name]) == 0 and plotted.pop() == column
    columns = "(its columns: best val/acc, test/acc (final model), test/acc (best-val checkpoint))"
    for name, hint in (("train/loss", "; add --metric train/loss to report and plot it"),
                       ("test/acc_best", "; did you mean test/acc_at_best_val?"), ("loss", "")):
        assert collect.main([str(tmp_path), "--plot", name]) == 2
        assert capsys.readouterr().err == f"error: --plot {name}: not a column of the table{hint} {columns}\n"


def test_config_overrides_are_the_differing_keys_written_as_hydra_overrides():
    configs = [
        {"_wandb": {"cli_version": "0.31.0"}, "seed": 0, "paths": {"output_dir": "outputs/0"},
         "moe": {"num_experts": 8, "router": "soft", "layers": [2, 3]}, "optimizer": {"lr": 0.001},
         "trainer": {"compile": False, "resume": None}},
        {"_wandb": {"cli_version": "0.31.1"}, "seed": 1, "paths": {"output_dir": "outputs/1"},
         "moe": {"num_experts": 16, "router": "soft", "layers": None}, "optimizer": {"lr": 0.0003},
         "trainer": {"compile": True, "resume": None}},
    ]
    first, second = sweeps.config_overrides(configs)
    assert first == {
        "seed": "0", "paths.output_dir": "outputs/0", "moe.num_experts": "8", "moe.layers": "[2,3]",
        "optimizer.lr": "0.001", "trainer.compile": "false",
    }
    assert second == {
        "seed": "1", "paths.output_dir": "outputs/1", "moe.num_experts": "16", "moe.layers": "null",
        "optimizer.lr": "0.0003", "trainer.compile": "true",
    }
    # what the same runs' overrides.yaml would hold
    typed = ["moe.num_experts=8", "moe.layers=[2,3]", "optimizer.lr=0.001", "trainer.compile=false"]
    assert {k: v for k, v in first.items() if k in sweeps.parse_overrides(typed)} == sweeps.parse_overrides(typed)
    runs = [sweeps.RunResult(str(i), overrides) for i, overrides in enumerate((first, second))]
    assert sweeps.swept_keys(runs) == ["moe.layers", "moe.num_experts", "optimizer.lr", "trainer.compile"]


def test_a_key_that_holds_each_runs_seed_is_no_column():
    # the upcycling studies: model.upcycle_from=.../seed${seed}/last.pt, resolved in W&B's configs (collect
    # --wandb-dir made every seed a group of its own); a swept key beside the seeds stays a column
    configs = [{"seed": seed, "moe": {"layers": layers}, "model": {"upcycle_from": f"dense/seed{seed}/last.pt"}}
               for layers in ("last_half", "none") for seed in (0, 1, 2)]
    runs = [sweeps.RunResult(str(i), overrides) for i, overrides in enumerate(sweeps.config_overrides(configs))]
    assert runs[4].overrides["model.upcycle_from"] == "dense/seed1/last.pt"  # kept in the run's overrides
    assert sweeps.swept_keys(runs) == ["moe.layers"]
    # two dense checkpoints per seed: the key no longer follows the seed alone, so it is a column
    for run, source in zip(runs, ["a"] * 3 + ["b"] * 3):
        run.overrides["model.upcycle_from"] = f"{source}/seed{run.overrides['seed']}/last.pt"
    assert sweeps.swept_keys(runs) == ["model.upcycle_from", "moe.layers"]


@pytest.mark.parametrize("key,values,seeds", [
    ("optimizer.lr", ["0.001", "0.0001"], ["0", "1"]),  # "0" is in 0.001 and "1" in 0.0001: pooled as seeds
    ("moe.num_experts", ["16", "32"], ["1", "2"]),
    ("data.root", ["/data/v0/train", "/data/v1/test"], ["0", "1"]),  # each holds its seed, but not alone
])
def test_a_value_that_merely_holds_its_runs_seed_is_still_a_column(key, values, seeds):
    finished = {"val/acc": [0.5], "test/acc": [0.5], "test/acc_at_best_val": [0.5]}
    runs = [sweeps.RunResult(str(i), {key: value, "seed": seed}, finished)
            for i, (value, seed) in enumerate(zip(values, seeds))]
    assert sweeps.swept_keys(runs) == [key]
    assert len(sweeps.summarize(runs, sweeps.swept_keys(runs))) == 2


@pytest.mark.slow
def test_runs_are_grouped_by_the_values_they_used_not_as_typed(tmp_path):
    """A run that left moe.num_experts at its default 16 and one that typed 16 are one group (were two, one of them
    shown as None), and a group option a run left at its default shows as that option. One real sweep; the run that
    typed nothing is a copy of its (last_half, 16) job whose overrides.yaml says so: Hydra writes the same
    config.yaml and hydra.yaml for both."""
    sweep = tmp_path / "sweep"
    result = run_forked("softmoe.train", ["-m", "moe=last_half,dense", "moe.num_experts=16,8", "trainer.max_steps=2",
                                          "trainer.eval_batches=1", "model.depth=2", "logger=none",
                                          "trainer.progress_bar=false", f"hydra.sweep.dir={sweep}"], ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    typed = next(job for job in sweep.iterdir() if (job / ".hydra").is_dir() and {"moe=last_half", "moe.num_experts=16"}
                 <= set(yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())))
    shutil.copytree(typed, sweep / "defaults")
    (sweep / "defaults" / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(["trainer.max_steps=2"]))
    runs = sweeps.finished_runs(sweeps.load_sweep(sweep))
    assert sweeps.swept_keys(runs) == ["moe", "moe.num_experts"]
    groups = {tuple(summary.values): summary.runs for summary in sweeps.summarize(runs, sweeps.swept_keys(runs))}
    assert groups == {("dense", "16"): 1, ("dense", "8"): 1, ("last_half", "16"): 2, ("last_half", "8"): 1}


def test_a_wandb_dir_without_offline_runs_is_named(sweep, capsys):
    assert collect.main(["--wandb-dir", str(sweep)]) == 2
    assert capsys.readouterr().err == f"error: no offline W&B runs (offline-run-*/run-*.wandb) below {sweep}\n"


def test_plot_bars_carry_std_error_bars_the_seed_count_and_an_axis_from_zero(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    routings = ["soft", "uniform_dispatch_soft_combine", "soft_dispatch_uniform_combine", "identity_dispatch"]
    column = "test/acc (final model)"
    summaries = [
        sweeps.GroupSummary((routing, str(slots)), 3, {column: sweeps.Cell(0.95 - 0.001 * slots, 0.004, 3, True)})
        for routing in routings for slots in (1, 2, 4, 8, 16, 32)
    ]
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    sweeps.plot(summaries, ["moe.router", "moe.slots_per_expert"], column, tmp_path / "results.png")
    (figure,) = figures
    axes = figure.axes[0]
    assert [(label.get_rotation(), label.get_ha()) for label in axes.get_xticklabels()] == [(30.0, "right")] * 4
    from matplotlib.container import BarContainer

    bars = [container for container in axes.containers if isinstance(container, BarContainer)]
    assert len(axes.patches) == 24 and len(bars) == 6  # a bar per group, six series
    assert all(container.errorbar is not None for container in bars)
    assert "3 seeds" in axes.get_title() and axes.get_ylabel() == f"{column} (%, mean ± std)" and axes.get_xlabel()
    assert axes.get_ylim() == (0.0, 100.0)  # 3 points between the bars is not drawn as a cliff
    assert axes.texts[0].get_text() == "94.90"  # each bar says its value: 94.90 is not lost against 94.80
    renderer = figure.canvas.get_renderer()
    legend = axes.get_legend()
    assert len(legend.get_texts()) == 6 and legend.get_window_extent(renderer).x0 > axes.get_window_extent(renderer).x1
    plt.close(figure)


def run_sweep_job(sweep_dir, job, log_lines):
    """A sweep job as the basic launcher runs it, in this process: Hydra's fresh console handler and the run
    directory's train.log, the console tagged as softmoe.train tags it, then ``log_lines()``. Returns what the
    console and train.log got."""
    console, train_log = io.StringIO(), sweep_dir / str(job) / "train.log"
    train_log.parent.mkdir(parents=True)
    root, handlers = logging.getLogger(), [logging.StreamHandler(console), logging.FileHandler(train_log)]
    saved_handlers, saved_level = root.handlers[:], root.level
    root.handlers[:] = handlers
    root.setLevel(logging.INFO)  # not `root.level = ...`: setLevel clears the loggers' cached isEnabledFor answers
    try:
        sweep_console.tag_console(f"[job {job}] ", sweep_dir)
        log_lines()
    finally:
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
        logging.captureWarnings(False)
        for handler in handlers:
            handler.close()
    return console.getvalue(), train_log.read_text()


def test_a_warning_every_job_of_a_sweep_logs_is_shown_once_but_errors_and_train_logs_keep_every_one(tmp_path):
    log = logging.getLogger("softmoe.harness.loop")
    note = " (shown once for the sweep; each job's train.log keeps its own)"

    def log_lines():
        log.info("model: vit_micro")
        log.warning("data.val_size=0: no validation split")
        log.error("W&B could not start")

    first, second = (run_sweep_job(tmp_path, job, log_lines) for job in (0, 1))
    assert first[0] == f"[job 0] model: vit_micro\n[job 0] data.val_size=0: no validation split{note}\n" \
                       "[job 0] W&B could not start\n"
    assert second[0] == "[job 1] model: vit_micro\n[job 1] W&B could not start\n"
    for _, train_log in (first, second):
        assert train_log == "model: vit_micro\ndata.val_size=0: no validation split\nW&B could not start\n"
    # rerunning the sweep (to resume it) starts a new multirun, which shows the warning again, once
    hydra_config = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}})
    sweep_console.FreshConsoleWarnings().on_multirun_start(hydra_config)
    third, _ = run_sweep_job(tmp_path, 2, log_lines)
    assert third == first[0].replace("[job 0]", "[job 2]")


@pytest.mark.slow
def test_offline_wandb_files_give_the_sweep_directorys_table(offline_sweep, tmp_path):
    out = tmp_path / "results"
    from_dirs, from_wandb = out / "dirs", out / "wandb"
    collect.main([str(offline_sweep), "--metric", "train/loss", "--out", str(from_dirs)])
    wandb_dir = ["--wandb-dir", str(offline_sweep), "--group", str(offline_sweep)]
    collect.main([*wandb_dir, "--metric", "train/loss", "--out", str(from_wandb)])
    table = (from_dirs / "results.md").read_text()
    assert (from_wandb / "results.md").read_text() == table
    lines = table.splitlines()
    assert lines[0] == (
        "| moe.num_experts | runs | best val/acc | test/acc (final model) | test/acc (best-val checkpoint) "
        "| final train/loss |"
    )
    assert [line.split(" | ")[:2] for line in lines[2:]] == [["| 4", "1"], ["| 8", "1"]]
    for line, job in zip(lines[2:], (0, 1)):  # the numbers are those the run logged
        logged = sweeps.read_metrics(offline_sweep / str(job) / "metrics.jsonl")
        cells = line.rstrip(" |").split(" | ")[2:]
        finals = [logged[key][-1] for key in ("test/acc", "test/acc_at_best_val", "train/loss")]
        expected = [max(logged["val/acc"]), *finals]
        assert cells == [f"{100 * value:.2f}% ± n/a" for value in expected[:3]] + [f"{expected[3]:.4f} ± n/a"]


@pytest.mark.slow
def test_offline_wandb_runs_hold_the_overrides_and_every_value_of_metrics_jsonl(offline_sweep):
    from_dirs = sweeps.load_sweep(offline_sweep)
    from_wandb = sweeps.load_wandb_offline(offline_sweep, group=str(offline_sweep))
    assert [run.overrides for run in from_wandb] == [{"moe.num_experts": "4"}, {"moe.num_experts": "8"}]
    name = "model.depth=2,moe.num_experts={},trainer.batch_size=256,trainer.log_every=1,trainer.max_steps=3"
    assert [run.name for run in from_wandb] == [name.format(4), name.format(8)]
    for directory, wandb in zip(from_dirs, from_wandb):
        assert directory.overrides["moe.num_experts"] == wandb.overrides["moe.num_experts"]
        assert {"train/loss", "train/acc", "routing/block1/dispatch_entropy", "val/acc"} <= set(wandb.history)
        # W&B has histograms where metrics.jsonl has their min/max/entropy
        assert set(wandb.history) <= set(directory.history)
        # W&B keeps one row per step, so step 3's train and val events share one epoch
        for key in set(wandb.history) - {"epoch"}:
            assert wandb.history[key] == directory.history[key], key
        assert len(wandb.history["train/loss"]) == 3 and len(wandb.history["val/acc"]) == 1


@pytest.mark.slow
def test_a_resumed_runs_files_are_read_as_one_run_in_step_order(compose_run, tmp_path, monkeypatch):
    from softmoe.harness.loop import train
    from softmoe.harness.runs import read_events

    run = ["trainer.batch_size=256", "trainer.log_every=1", "trainer.max_steps=4", "trainer.checkpoint_every=2",
           "model.depth=2", "logger.mode=offline", "trainer.progress_bar=false"]
    train_killed_after(3, compose_run(*run), tmp_path, monkeypatch)  # last.pt at step 2, step 3 logged
    train(compose_run(*run), tmp_path)  # resumes the same W&B run: a second file
    assert len(list(tmp_path.glob("wandb/offline-run-*/run-*.wandb"))) == 2
    (whole,) = sweeps.load_wandb_offline(tmp_path)
    # steps 1-2 from the first file, 3-4 from the second: the losses metrics.jsonl holds, in its order
    assert whole.history["train/loss"] == [e["train/loss"] for e in read_events(tmp_path) if "train/loss" in e]
    assert len(whole.history["train/loss"]) == 4


@pytest.mark.slow
def test_a_group_with_no_offline_runs_names_the_groups_found(offline_sweep, capsys):
    assert collect.main(["--wandb-dir", str(offline_sweep), "--group", "sweep-2"]) == 2
    assert capsys.readouterr().err == (
        f"error: no offline W&B run below {offline_sweep} is in group 'sweep-2'; groups found: {str(offline_sweep)!r}\n"
    )


def test_a_one_seed_chart_draws_no_error_caps_and_says_1_seed(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    column = "test/acc (final model)"
    summaries = [sweeps.GroupSummary((str(n),), 1, {column: sweeps.Cell(mean, None, 1, percent=True)})
                 for n, mean in ((4, 0.73), (8, 0.74))]
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    sweeps.plot(summaries, ["moe.num_experts"], column, tmp_path / "results.png")
    (figure,) = figures
    axes = figure.axes[0]
    assert all(container.errorbar is None for container in axes.containers if hasattr(container, "errorbar"))
    assert axes.get_title() == f"{column}: 1 seed per bar, so no spread to show" and "seeds" not in axes.get_title()
    assert [text.get_text() for text in axes.texts] == ["73.00", "74.00"] and axes.get_ylim() == (0.0, 100.0)
    assert axes.get_ylabel() == f"{column} (%)"
    plt.close(figure)


@pytest.mark.parametrize("damage", ["bytes", "folder"])
def test_a_metrics_file_that_is_not_text_is_named_in_one_line(sweep, capsys, damage):
    metrics = sweep / "1" / "metrics.jsonl"
    if damage == "bytes":  # a damaged disk block: not a torn line, which is skipped, but bytes that are no text
        metrics.write_bytes(b"\x92\xff" * 50)
    else:
        metrics.unlink()
        metrics.mkdir()
    assert collect.main([str(sweep)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {metrics}: ") and err.count("\n") == 1
    assert "move its run directory out of the folder" in err
    assert not (sweep / "results.md").exists()


def test_an_out_that_takes_no_files_is_one_line_and_leaves_no_table_without_its_plot(sweep, capsys, monkeypatch,
                                                                                    tmp_path_factory):
    if os.path.isdir("/proc") and os.geteuid() == 0:  # takes no new files, though root passes every access check
        assert collect.main([str(sweep), "--out", "/proc"]) == 2
        assert capsys.readouterr().err == ("error: --out /proc: /proc/results.md could not be written (No such file "
                                           "or directory); name a directory you can write to\n")
    out = tmp_path_factory.mktemp("out")

    def disk_full(summaries, by, column, path):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(collect, "plot", disk_full)
    assert collect.main([str(sweep), "--out", str(out)]) == 2
    assert capsys.readouterr().err == (f"error: --out {out}: {out / 'results.png'} could not be written (No space "
                                       "left on device); name a directory you can write to\n")
    assert list(out.iterdir()) == []
    (out / "results.md").write_text("the previous table")  # a pair from an earlier collect stays as it was
    (out / "results.png").write_bytes(b"the previous plot")
    assert collect.main([str(sweep), "--out", str(out)]) == 2
    assert (out / "results.md").read_text() == "the previous table"
    assert (out / "results.png").read_bytes() == b"the previous plot" and len(list(out.iterdir())) == 2


@pytest.mark.parametrize("text", ["- seed=1\n- x: [1,\n", "seed: 1\n"], ids=["not_yaml", "not_a_list"])
def test_a_damaged_overrides_file_is_named_in_one_line(sweep, capsys, text):
    overrides = sweep / "2" / ".hydra" / "overrides.yaml"  # was: a YAML ParserError traceback
    overrides.write_text(text)
    assert collect.main([str(sweep)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {overrides}: damaged (") and err.count("\n") == 1
    assert err.endswith("; restore it, or move its run directory out of the folder to tabulate the others\n")


@pytest.mark.parametrize("content", [b"\x9a\xa8\xe0\x9a" * 25,  # a record of 10 bytes that are no protobuf:
                                     b":W&B\x00\x00\x00" + b"\x00\x00\x00\x00\x0a\x00\x01" + b"\xff" * 10],
                         ids=["not_a_run_file", "damaged_record"])
def test_a_damaged_offline_wandb_file_is_named_in_one_line(tmp_path, capsys, content):
    run_file = tmp_path / "offline-run-20260101_000000-abc" / "run-abc.wandb"  # was: a ValueError/DecodeError traceback
    run_file.parent.mkdir()
    run_file.write_bytes(content)
    assert collect.main(["--wandb-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {run_file}: damaged (") and err.count("\n") == 1
