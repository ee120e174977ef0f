"""Batches on Ray (`--ray`, psal_cli.ray): one local Ray cluster with 2 CPUs for the module."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from conftest import TESTS, make_image, stray_files
from psal_cli.cli import app
from psal_cli.modelfile import load_model

pytestmark = pytest.mark.usefixtures("isolated")
runner = CliRunner()


def psal(*args: str, code: int = 0):
    result = runner.invoke(app, list(args))
    assert "Traceback" not in result.stderr, result.stderr
    assert result.exit_code == code, f"exit {result.exit_code}: {result.stderr}{result.exception!r}"
    return result


@pytest.fixture(scope="module")
def cluster() -> Iterator[object]:
    """A local Ray cluster (2 CPUs) this process drives; its workers can import the tests' tiny networks."""
    ray = pytest.importorskip("ray", reason='needs Ray (pip install "psal-cli[ray]")')
    pytest.importorskip("ray.data", reason='needs Ray Data (pip install "psal-cli[ray]")')
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(TESTS.parent), saved or ""])
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield ray
    ray.shutdown()
    if saved is None:
        os.environ.pop("PYTHONPATH")
    else:
        os.environ["PYTHONPATH"] = saved


def workers() -> list[int]:
    """The pids of the Ray Data actors' processes."""
    import psutil

    return [p.pid for p in psutil.process_iter(["cmdline"])
            if any("MapWorker" in part for part in p.info["cmdline"] or [])]


def test_killed_worker_unreadable_image_and_resume(cluster: object) -> None:
    """A worker killed mid-batch: the batch finishes, every output complete (the bytes of a
    run without Ray); an unreadable image is reported (exit 1); a re-run does no work."""
    names = [f"{k:02}.png" for k in range(24)]
    for k, name in enumerate(names):
        make_image(f"in/{name}", size=(160, 120), seed=k)
    Path("in/bad.png").write_bytes(b"not an image")
    psal("upscale", "in", "--scale", "2", "-o", "local", code=1)

    done: dict[str, object] = {}
    run = threading.Thread(target=lambda: done.update(result=runner.invoke(
        app, ["upscale", "in", "--scale", "2", "-o", "out", "--ray", "--workers", "2", "--json"])))
    run.start()
    deadline = time.monotonic() + 240
    while not (Path("out").is_dir() and any(Path("out").glob("*.png"))):
        assert run.is_alive() and time.monotonic() < deadline, "the batch wrote nothing"
        time.sleep(0.02)
    killed = workers()
    assert killed, "no Ray worker process found"
    os.kill(killed[0], signal.SIGKILL)
    written_at_kill = len(list(Path("out").glob("*.png")))
    run.join(timeout=300)
    result = done["result"]
    assert result.exit_code == 1, result.stderr
    summary = json.loads(result.stdout)
    assert (summary["done"], summary["failed"], summary["skipped"]) == (24, 1, 0)
    assert summary["results"][-1]["input"] == "in/bad.png"  # input order, as without --ray
    assert "not an image file" in summary["results"][-1]["error"]
    assert [r["input"] for r in summary["results"]] == [f"in/{n}" for n in names] + ["in/bad.png"]
    assert written_at_kill < 24, "the worker was killed after the batch"
    assert sorted(p.name for p in Path("out").iterdir() if not p.name.startswith(".")) == names
    for name in names:  # complete, and what a run without Ray writes
        assert Path(f"out/{name}").read_bytes() == Path(f"local/{name}").read_bytes(), name

    again = psal("upscale", "in", "--scale", "2", "-o", "out", "--ray", "--skip-existing", "--json", code=1)
    summary = json.loads(again.stdout)
    assert (summary["done"], summary["skipped"], summary["failed"]) == (0, 24, 1)
    refused = json.loads(psal("upscale", "in/00.png", "--scale", "2", "-o", "out/", "--ray", "--json",
                              code=1).stdout)
    assert "already exists" in refused["results"][0]["error"]


def test_masks_references_and_options_as_without_ray(cluster: object) -> None:
    for k in range(3):
        make_image(f"in/{k}.png", size=(32, 24), seed=k)
        mask = Image.new("L", (32, 24), 0)
        mask.paste(255, (4, 4, 10 + 4 * k, 12))
        Path("masks").mkdir(exist_ok=True)
        mask.save(f"masks/{k}.png")
    make_image("ref.png", size=(24, 24), seed=7)
    for command, own in (("inpaint", ["--mask", "masks", "--dilate", "1"]),
                         ("colorize", ["--reference", "ref.png"])):
        psal(command, "in", *own, "-o", f"{command}-ray", "--ray", "--workers", "1", "--ext", "jpg",
             "--quality", "80")
        psal(command, "in", *own, "-o", command, "--ext", "jpg", "--quality", "80")
        for k in range(3):
            assert Path(f"{command}-ray/{k}.jpg").read_bytes() == Path(f"{command}/{k}.jpg").read_bytes()


def test_public_actors_in_a_pipeline(cluster: object, weights: Path) -> None:
    """psal_cli.ray.Upscale in a Ray Data pipeline of one's own."""
    import ray

    import psal_cli.ray

    rows = []
    for k in range(4):
        make_image(f"in/{k}.png", size=(20, 16), seed=k)
        rows.append({"input": f"{Path.cwd()}/in/{k}.png", "output": f"{Path.cwd()}/out/{k}.png"})
    rows.append({"input": f"{Path.cwd()}/in/missing.png", "output": f"{Path.cwd()}/out/missing.png"})
    # A loaded network (a model file's path works alike, where the workers know its architecture:
    # this one is the tests' own).
    model = load_model(weights / "upscale-x2.safetensors")[0]
    ds = ray.data.from_items(rows).map_batches(
        psal_cli.ray.Upscale, fn_constructor_kwargs={"model": model}, concurrency=1, batch_size=2)
    statuses = {Path(r["input"]).name: (r["status"], r["error"]) for r in ds.iter_rows()}
    assert statuses["missing.png"][0] == "failed" and "no such file" in statuses["missing.png"][1]
    assert all(statuses[f"{k}.png"] == ("done", None) for k in range(4))
    psal("upscale", "in", "--scale", "2", "-o", "local")
    for k in range(4):
        assert Path(f"out/{k}.png").read_bytes() == Path(f"local/{k}.png").read_bytes()
    assert not stray_files(".")


def test_usage_errors_without_a_cluster(monkeypatch: pytest.MonkeyPatch) -> None:
    make_image("a.png")
    assert "give --ray too" in psal("upscale", "a.png", "-o", "x.png", "--workers", "2", code=2).stderr
    assert "standard input or output" in psal("upscale", "a.png", "-o", "-", "--ray", code=2).stderr
    monkeypatch.setitem(sys.modules, "ray", None)  # what `import ray` finds when Ray is not installed
    result = psal("upscale", "a.png", "-o", "x.png", "--ray", code=2)
    assert result.stderr.strip() == 'error: --ray needs Ray: pip install "psal-cli[ray]"'
