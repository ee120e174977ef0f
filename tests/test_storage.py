"""Images in object storage: a real S3 server (moto's) on localhost, s3fs talking to it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from conftest import make_image, psal_command, psal_env
from psal_cli.cli import app

pytestmark = pytest.mark.usefixtures("isolated")
runner = CliRunner()


@pytest.fixture(scope="module")
def server() -> Iterator[object]:
    """The S3 server, with this process's and its `psal` subprocesses' s3fs pointed at it."""
    pytest.importorskip("s3fs", reason='needs s3fs (pip install "psal-cli[s3]")')
    pytest.importorskip("moto.moto_server.werkzeug_app", reason='needs moto\'s server (pip install "moto[server]")')
    import fsspec.config
    import s3fs

    from s3_server import S3Server

    s3 = S3Server()
    s3.start()
    saved_env = {k: os.environ.get(k) for k in s3.env()}
    saved_conf = fsspec.config.conf.get("s3")
    os.environ.update(s3.env())
    fsspec.config.conf["s3"] = {"endpoint_url": s3.url}  # fsspec read its environment at import
    s3fs.S3FileSystem.clear_instance_cache()
    yield s3
    s3.stop()
    for k, v in saved_env.items():
        os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    fsspec.config.conf.pop("s3") if saved_conf is None else fsspec.config.conf.__setitem__("s3", saved_conf)
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture
def bucket(server: object) -> str:
    """A new empty bucket (its name) for each test."""
    import fsspec

    name = f"psal-{uuid.uuid4().hex[:12]}"
    fsspec.filesystem("s3").mkdir(name)
    return name


def s3() -> object:
    import fsspec

    fs = fsspec.filesystem("s3")
    fs.invalidate_cache()
    return fs


def psal(*args: str, code: int = 0):
    result = runner.invoke(app, list(args))
    assert "Traceback" not in result.stderr, result.stderr
    assert result.exit_code == code, f"exit {result.exit_code}: {result.stderr}{result.exception!r}"
    return result


def upload(local: str, url: str) -> None:
    s3().put(local, url, recursive=True)


def same_files(bucket_prefix: str, folder: str) -> None:
    """The objects under the prefix are the files of the folder, byte for byte."""
    fs = s3()
    objects = {k.removeprefix(bucket_prefix + "/"): fs.cat_file(k) for k in fs.find(bucket_prefix)}
    files = {str(p.relative_to(folder)): p.read_bytes() for p in Path(folder).rglob("*") if p.is_file()}
    assert objects.keys() == files.keys()
    for name in files:
        assert objects[name] == files[name], name


def test_upscale_bucket_to_bucket_as_locally(bucket: str) -> None:
    """A folder (recursive) and a glob in a bucket give what the same local run gives."""
    make_image("in/a.png", size=(24, 16), seed=1)
    make_image("in/sub/b.jpg", size=(20, 12), seed=2)
    make_image("in/c.tif", mode="LA", size=(16, 16), seed=3)
    upload("in", f"s3://{bucket}/in")
    result = psal("upscale", f"s3://{bucket}/in", "-r", "--scale", "2", "-o", f"s3://{bucket}/out", "--json")
    summary = json.loads(result.stdout)
    assert summary["done"] == 3 and summary["failed"] == 0
    assert {r["output"] for r in summary["results"]} == {
        f"s3://{bucket}/out/a.png", f"s3://{bucket}/out/sub/b.jpg", f"s3://{bucket}/out/c.tif"}
    psal("upscale", "in", "-r", "--scale", "2", "-o", "out")
    same_files(f"{bucket}/out", "out")  # no temporary key left either
    psal("upscale", f"s3://{bucket}/in/*.png", "--scale", "2", "-o", f"s3://{bucket}/glob/")
    assert s3().cat_file(f"{bucket}/glob/a.png") == Path("out/a.png").read_bytes()
    # One file from the bucket to a local file, and a local one to a bucket's object.
    psal("upscale", f"s3://{bucket}/in/a.png", "--scale", "2", "-o", "one.png")
    assert Path("one.png").read_bytes() == Path("out/a.png").read_bytes()
    psal("upscale", "in/a.png", "--scale", "2", "-o", f"s3://{bucket}/single/a_x2.png")
    assert s3().cat_file(f"{bucket}/single/a_x2.png") == Path("out/a.png").read_bytes()


def test_existing_outputs_by_one_listing(bucket: str, server: object) -> None:
    """Existing objects are refused, skipped (learnt from a listing: no request per object)
    or replaced, as local files are."""
    for k in range(6):
        make_image(f"in/{k}.png", seed=k)
    upload("in", f"s3://{bucket}/in")
    args = ("upscale", f"s3://{bucket}/in", "--scale", "2", "-o", f"s3://{bucket}/out")
    psal(*args)
    s3().pipe_file(f"{bucket}/out/0.png", b"keep me")
    refused = json.loads(psal(*args, "--json", code=1).stdout)
    assert refused["failed"] == 6 and "already exists" in refused["results"][0]["error"]
    assert s3().cat_file(f"{bucket}/out/0.png") == b"keep me"
    server.requests = []
    skipped = json.loads(psal(*args, "--skip-existing", "--json").stdout)
    assert skipped["skipped"] == 6
    heads = [r for r in server.requests if r[0] == "HEAD" and "/out/" in r[1]]
    assert heads == [], heads
    psal(*args, "--overwrite")
    assert Image.open(s3().open(f"{bucket}/out/0.png")).size == (40, 24)


def test_masks_and_references_in_a_bucket(bucket: str) -> None:
    make_image("in/a.png", size=(32, 24), seed=1)
    make_image("in/b.png", size=(32, 24), seed=2)
    Path("masks").mkdir()
    for name, right in (("a", 12), ("b", 16)):
        mask = Image.new("L", (32, 24), 0)
        mask.paste(255, (4, 4, right, 12))
        mask.save(f"masks/{name}.png")
    upload("in", f"s3://{bucket}/in")
    upload("masks", f"s3://{bucket}/masks")
    psal("inpaint", f"s3://{bucket}/in", "--mask", f"s3://{bucket}/masks", "-o", f"s3://{bucket}/filled")
    psal("inpaint", "in", "--mask", "masks", "-o", "filled")
    same_files(f"{bucket}/filled", "filled")
    make_image("ref.png", size=(24, 24), seed=9)
    upload("ref.png", f"s3://{bucket}/ref.png")
    psal("colorize", f"s3://{bucket}/in", "--reference", f"s3://{bucket}/ref.png", "-o", f"s3://{bucket}/col")
    psal("colorize", "in", "--reference", "ref.png", "-o", "col")
    same_files(f"{bucket}/col", "col")
    missing = psal("inpaint", f"s3://{bucket}/in", "--mask", f"s3://{bucket}/nomasks", "-o", "x", code=2)
    assert "no such file or folder" in missing.stderr


def test_missing_bucket_and_object_are_one_line(bucket: str) -> None:
    make_image("a.png")
    result = psal("upscale", "a.png", "--scale", "2", "-o", f"s3://no-such-{bucket}/out/", code=2)
    assert result.stderr.strip().splitlines() == [
        f"error: cannot write in s3://no-such-{bucket}: no such bucket"]
    result = psal("upscale", f"s3://{bucket}/nothing.png", "--scale", "2", "-o", "x.png", code=2)
    assert result.stderr.strip() == f"error: s3://{bucket}/nothing.png: no such file or folder"


def test_file_urls_are_local_paths() -> None:
    make_image("in/a.png")
    psal("upscale", f"file://{Path('in').resolve()}", "--scale", "2", "-o", f"file://{Path('out').resolve()}/")
    assert Image.open("out/a.png").size == (40, 24)


@pytest.mark.parametrize("blocked", ["fsspec", "s3fs"])
def test_a_url_without_the_extra_names_it(blocked: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without fsspec (or s3fs for s3://) a URL is one line naming the extra to install."""
    monkeypatch.setitem(sys.modules, blocked, None)  # what `import` finds for a missing package
    if blocked == "s3fs" and "fsspec.registry" in sys.modules:  # fsspec keeps the classes it has imported
        monkeypatch.delitem(sys.modules["fsspec.registry"]._registry, "s3", raising=False)
    make_image("a.png")
    result = runner.invoke(app, ["upscale", "a.png", "-o", "s3://bucket/a.png"])
    assert result.exit_code == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert 'pip install "psal-cli[s3]"' in result.stderr


def test_another_store_without_its_back_end_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """gs:// without gcsfs: one line naming the back-end fsspec asks for (the s3 extra does not bring it)."""
    pytest.importorskip("fsspec", reason='needs fsspec (pip install "psal-cli[s3]")')
    monkeypatch.setitem(sys.modules, "gcsfs", None)
    monkeypatch.delitem(sys.modules["fsspec.registry"]._registry, "gs", raising=False)
    make_image("a.png")
    result = runner.invoke(app, ["upscale", "a.png", "-o", "gs://bucket/a.png"])
    assert result.exit_code == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "gs:// needs its fsspec back-end" in result.stderr and "gcsfs" in result.stderr


def test_store_gone_mid_run(bucket: str, server: object) -> None:
    """The server stops while a batch writes to it: a clear error, exit 1, and every object
    under an output name is complete (the same bytes a local run writes)."""
    for k in range(12):
        make_image(f"in/{k:02}.png", size=(24, 16), seed=k)
    server.put_delay = 0.25
    run = subprocess.Popen(
        psal_command("upscale", "in", "--scale", "2", "-o", f"s3://{bucket}/out", "--json"),
        env={**psal_env(), "AWS_MAX_ATTEMPTS": "1"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not [k for k in s3().find(f"{bucket}/out") if k.endswith(".png")]:
            assert time.monotonic() < deadline and run.poll() is None, "the run never wrote"
            time.sleep(0.05)
        server.stop()
        out, err = run.communicate(timeout=120)
    finally:
        run.kill()
        server.put_delay = 0
        server.start()
    assert run.returncode == 1, err
    assert "storage unreachable" in err and "Traceback" not in err
    summary = json.loads(out)
    assert "storage unreachable" in summary["error"] and summary["done"] < 12
    written = sorted(k.removeprefix(f"{bucket}/out/") for k in s3().find(f"{bucket}/out")
                     if not k.endswith(".psal-tmp"))
    assert written and len(written) < 12
    psal("upscale", "in", "--scale", "2", "-o", "local")
    for name in written:
        assert s3().cat_file(f"{bucket}/out/{name}") == Path(f"local/{name}").read_bytes(), name
    # Resuming finishes the batch.
    psal("upscale", "in", "--scale", "2", "-o", f"s3://{bucket}/out", "--skip-existing")
    assert len([k for k in s3().find(f"{bucket}/out") if not k.endswith(".psal-tmp")]) == 12


def test_local_runs_need_no_fsspec(monkeypatch: pytest.MonkeyPatch) -> None:
    """fsspec is imported for URLs only: a local batch runs without it."""
    monkeypatch.setitem(sys.modules, "fsspec", None)
    make_image("in/a.png")
    psal("upscale", "in", "--scale", "2", "-o", "out", "--skip-existing")
    assert Image.open("out/a.png").size == (40, 24)
