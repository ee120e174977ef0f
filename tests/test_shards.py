"""`--shard auto`: the slice comes from a SLURM job array or a Kubernetes Indexed Job."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import make_image
from psal_cli.batch import Item, UsageError, scheduler_slice, shard
from psal_cli.cli import app

SCHEDULER_VARIABLES = ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN",
                       "SLURM_ARRAY_TASK_MAX", "SLURM_ARRAY_TASK_STEP", "JOB_COMPLETION_INDEX",
                       "PSAL_SHARD_COUNT")


@pytest.fixture(autouse=True)
def no_scheduler(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests run outside any job array, even when the suite itself runs in one."""
    for name in SCHEDULER_VARIABLES:
        monkeypatch.delenv(name, raising=False)


def slurm_array(ids: range) -> list[dict[str, str]]:
    """The environments SLURM gives the tasks of `--array=<ids>`."""
    common = {"SLURM_ARRAY_TASK_COUNT": str(len(ids)), "SLURM_ARRAY_TASK_MIN": str(ids[0]),
              "SLURM_ARRAY_TASK_MAX": str(ids[-1]), "SLURM_ARRAY_TASK_STEP": str(ids.step)}
    return [{**common, "SLURM_ARRAY_TASK_ID": str(i)} for i in ids]


@pytest.mark.parametrize("ids", [range(0, 4), range(1, 8), range(5, 30, 7), range(3, 4)])
def test_slurm_array_tasks_partition_the_inputs(ids: range) -> None:
    items = [Item(Path(f"{k}.png"), Path(f"{k}.png")) for k in range(23)]
    slices = [shard(items, "auto", env) for env in slurm_array(ids)]
    names = [item.rel for part in slices for item in part]
    assert sorted(names) == sorted(item.rel for item in items)  # every input once
    assert max(map(len, slices)) - min(map(len, slices)) <= 1  # balanced
    # The same slices as the hand-wired --shard I/N.
    assert slices == [shard(items, f"{i}/{len(ids)}") for i in range(1, len(ids) + 1)]


def test_slurm_count_or_range_alone() -> None:
    only_range = {"SLURM_ARRAY_TASK_ID": "12", "SLURM_ARRAY_TASK_MIN": "10", "SLURM_ARRAY_TASK_MAX": "19"}
    assert scheduler_slice("auto", only_range) == (3, 10)
    only_count = {"SLURM_ARRAY_TASK_ID": "12", "SLURM_ARRAY_TASK_MIN": "10", "SLURM_ARRAY_TASK_COUNT": "10"}
    assert scheduler_slice("auto", only_count) == (3, 10)
    assert scheduler_slice("auto/10", only_count) == (3, 10)


def test_kubernetes_indexed_job() -> None:
    assert scheduler_slice("auto/8", {"JOB_COMPLETION_INDEX": "0"}) == (1, 8)
    assert scheduler_slice("auto", {"JOB_COMPLETION_INDEX": "7", "PSAL_SHARD_COUNT": "8"}) == (8, 8)


@pytest.mark.parametrize("spec, env, says", [
    ("auto", {}, "no job array found"),
    ("auto", {"JOB_COMPLETION_INDEX": "2"}, "PSAL_SHARD_COUNT"),
    ("auto/2", {"JOB_COMPLETION_INDEX": "2"}, "outside"),
    ("auto/0", {"JOB_COMPLETION_INDEX": "0"}, "positive"),
    ("auto/x", {"JOB_COMPLETION_INDEX": "0"}, "positive"),
    ("auto", {"JOB_COMPLETION_INDEX": "one", "PSAL_SHARD_COUNT": "4"}, "not a number"),
    ("auto/5", slurm_array(range(4))[0], "has 4 tasks"),
    # --array=1,2,7: three tasks that are not one evenly spaced range.
    ("auto", {"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_MAX": "7",
              "SLURM_ARRAY_TASK_COUNT": "3"}, "evenly spaced"),
    ("auto", {"SLURM_ARRAY_TASK_ID": "7"}, "SLURM_ARRAY_TASK_MIN"),
])
def test_bad_or_missing_scheduler_variables(spec: str, env: dict[str, str], says: str) -> None:
    with pytest.raises(UsageError, match=says):
        scheduler_slice(spec, env)


@pytest.mark.usefixtures("isolated")
def test_cli_in_a_job_array(monkeypatch: pytest.MonkeyPatch) -> None:
    """Three array tasks write every output once; outside an array, one usage line (exit 2)."""
    runner = CliRunner()
    for k in range(7):
        make_image(f"in/{k}.png")
    done = []
    for env in slurm_array(range(1, 4)):
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        result = runner.invoke(app, ["upscale", "in", "-o", "out", "--scale", "2", "--shard", "auto", "--json"])
        assert result.exit_code == 0, result.stderr
        done += [r["input"] for r in json.loads(result.stdout)["results"]]
    assert sorted(done) == sorted(str(p) for p in Path("in").iterdir())
    assert sorted(p.name for p in Path("out").iterdir()) == sorted(p.name for p in Path("in").iterdir())
    for name in SCHEDULER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    result = runner.invoke(app, ["upscale", "in", "-o", "out2", "--scale", "2", "--shard", "auto"])
    assert result.exit_code == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "error: --shard auto: no job array found (neither SLURM_ARRAY_TASK_ID nor JOB_COMPLETION_INDEX is set); "
        "give --shard I/N"]
    assert not Path("out2").exists()
