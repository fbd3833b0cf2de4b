"""softmoe.collect on sweep directories laid out as Hydra multirun writes them."""

import json

import pytest
import yaml

from softmoe import collect


def write_run(root, job, overrides, accuracies):
    run = root / str(job)
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    with open(run / "metrics.jsonl", "w") as f:
        for step, acc in enumerate(accuracies):
            f.write(json.dumps({"step": step, "train/loss": 1.0 / (step + 1)}) + "\n")
            f.write(json.dumps({"step": step, "val/acc": acc}) + "\n")
        f.write('{"step": 99, "val/acc": 0.')  # a torn last line from a killed run is skipped


@pytest.fixture
def sweep(tmp_path):
    job = 0
    for experts, base in (("4", 0.80), ("8", 0.90)):
        for seed in (0, 1, 2):
            write_run(tmp_path, job, [f"moe.num_experts={experts}", f"seed={seed}", "logger=none"],
                      [base - 0.1, base + 0.01 * seed, base - 0.05])
            job += 1
    return tmp_path


def test_groups_by_swept_keys_and_reports_mean_and_std_over_seeds(sweep, capsys):
    assert collect.main([str(sweep)]) == 0
    table = (sweep / "results.md").read_text()
    lines = table.splitlines()
    assert lines[0] == "| moe.num_experts | runs | final val/acc | best val/acc |"
    assert lines[2] == "| 4 | 3 | 0.7500 ± 0.0000 | 0.8100 ± 0.0100 |"
    assert lines[3] == "| 8 | 3 | 0.8500 ± 0.0000 | 0.9100 ± 0.0100 |"
    assert (sweep / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "wrote" in capsys.readouterr().out


def test_explicit_grouping_and_output_dir(sweep, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    collect.main([str(sweep), "--by", "moe.num_experts,seed", "--metric", "train/loss", "--out", str(out)])
    lines = (out / "results.md").read_text().splitlines()
    assert len(lines) == 2 + 6 and lines[0].startswith("| moe.num_experts | seed | runs | final train/loss")


def test_parse_overrides():
    assert collect.parse_overrides(["a.b=1", "+c=x=y", "~d", "e=[1,2]"]) == {"a.b": "1", "c": "x=y", "e": "[1,2]"}


def test_empty_or_missing_sweeps_say_so(tmp_path):
    with pytest.raises(SystemExit, match="no run directories"):
        collect.main([str(tmp_path)])
    with pytest.raises(SystemExit):
        collect.main([str(tmp_path / "missing")])
