"""Model files: round trip, metadata, and one clear message for every kind of bad file."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import stray_files
from psal_cli.modelfile import (UPSCALE_FAMILIES, ModelFileError, default_model_path, load_model, read_info,
                                read_metadata, save_model, write_metrics)
from tiny_networks import TinyInpaint, TinyUpscale


def _rewrite_metadata(src: Path, dst: Path, **changes: str) -> Path:
    """Copy a model file with some metadata values changed (weights untouched)."""
    return _rewrite_header(src, dst, lambda header: header["__metadata__"].update(changes))


def _rewrite_header(src: Path, dst: Path, change: Callable[[dict], object]) -> Path:
    """Copy a model file with its JSON header changed in place by `change` (weights untouched)."""
    data = src.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    change(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    dst.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])
    return dst


@pytest.fixture
def saved(tmp_path: Path) -> tuple[TinyUpscale, Path]:
    model = TinyUpscale(TinyUpscale.Config(scale=3))
    return model, save_model(model, tmp_path / "m.safetensors", training={"steps": 7},
                             metrics={"psnr": 31.5})


def test_round_trip(saved: tuple[TinyUpscale, Path]) -> None:
    model, path = saved
    loaded, info = load_model(path, task="upscale")
    assert isinstance(loaded, TinyUpscale) and not loaded.training
    assert loaded.config == model.config
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)
    assert (info.architecture, info.task, info.scale) == ("test-tiny-upscale", "upscale", 3)
    assert info.training == {"steps": 7} and info.metrics == {"psnr": 31.5}
    assert info.parameters == sum(p.numel() for p in model.parameters())
    meta = read_metadata(path)
    assert meta["format"] == "psal-model" and meta["format_version"] == "1"
    assert json.loads(meta["config"]) == {"scale": 3}
    assert not stray_files(path.parent)


def test_write_metrics_keeps_the_weights(saved: tuple[TinyUpscale, Path]) -> None:
    model, path = saved
    write_metrics(path, {"set5_psnr": 30.25})
    loaded, info = load_model(path)
    assert info.metrics == {"set5_psnr": 30.25} and info.training == {"steps": 7}
    assert torch.equal(loaded.body.conv.weight, model.body.conv.weight)
    assert not stray_files(path.parent)


def test_failed_write_is_a_model_file_error(tmp_path: Path, saved: tuple[TinyUpscale, Path]) -> None:
    with pytest.raises(ModelFileError, match=r"nope/m.safetensors: cannot write \(No such file or directory\)"):
        save_model(saved[0], tmp_path / "nope" / "m.safetensors")


def test_half_storage_loads_as_float32(tmp_path: Path, saved: tuple[TinyUpscale, Path]) -> None:
    model, full = saved
    half = save_model(model, tmp_path / "h.safetensors", half=True)
    assert half.stat().st_size < full.stat().st_size
    loaded, _ = load_model(half)
    assert loaded.body.conv.weight.dtype == torch.float32
    assert torch.allclose(loaded.body.conv.weight, model.body.conv.weight, atol=1e-3)


def test_default_paths_follow_psal_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PSAL_WEIGHTS", str(tmp_path))
    assert default_model_path("upscale", 4) == tmp_path / "upscale-x4.safetensors"
    assert default_model_path("inpaint") == tmp_path / "inpaint.safetensors"
    with pytest.raises(ValueError):
        default_model_path("sharpen")


def _truncated(p: Path, d: Path) -> Path:
    (d / "t.safetensors").write_bytes(p.read_bytes()[:-5])
    return d / "t.safetensors"


def _header_cut(p: Path, d: Path) -> Path:
    (d / "h.safetensors").write_bytes(p.read_bytes()[:40])
    return d / "h.safetensors"


def _junk(p: Path, d: Path) -> Path:
    (d / "j.safetensors").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 100)
    return d / "j.safetensors"


def _empty(p: Path, d: Path) -> Path:
    (d / "e.safetensors").write_bytes(b"")
    return d / "e.safetensors"


def _foreign(p: Path, d: Path) -> Path:
    save_file({"w": torch.zeros(2)}, d / "f.safetensors")
    return d / "f.safetensors"


def _unknown_arch(p: Path, d: Path) -> Path:
    return _rewrite_metadata(p, d / "u.safetensors", architecture="psal-teleport")


def _mismatch(p: Path, d: Path) -> Path:
    return _rewrite_metadata(p, d / "x.safetensors", config=json.dumps({"scale": 2}))


def _bad_config(p: Path, d: Path) -> Path:
    return _rewrite_metadata(p, d / "c.safetensors", config=json.dumps({"depth": 9}))


def _constructor_fails(p: Path, d: Path) -> Path:  # nn.Conv2d raises RuntimeError on -3 channels
    return _rewrite_metadata(p, d / "k.safetensors", architecture="psal-upscale",
                             config=json.dumps({"scale": 3, "channels": -3}))


def _metadata_list(p: Path, d: Path) -> Path:
    return _rewrite_header(p, d / "ml.safetensors", lambda h: h.update(__metadata__=["psal-model"]))


def _metadata_not_strings(p: Path, d: Path) -> Path:  # config as a JSON object, not a JSON string
    return _rewrite_header(p, d / "ms.safetensors", lambda h: h["__metadata__"].update(config={"scale": 3}))


def _tensor_entry(**changes: object) -> Callable[[Path, Path], Path]:
    def make(p: Path, d: Path) -> Path:
        def change(header: dict) -> None:
            entry = header["body.conv.weight"]  # (27, 3, 3, 3)
            entry.update({k: v(entry[k]) for k, v in changes.items()})
        return _rewrite_header(p, d / "o.safetensors", change)
    return make


def _future(p: Path, d: Path) -> Path:
    return _rewrite_metadata(p, d / "v.safetensors", format_version="99")


def _nan(p: Path, d: Path) -> Path:
    model = TinyUpscale(TinyUpscale.Config(scale=3))
    with torch.no_grad():
        model.body.conv.bias[0] = float("nan")
    return save_model(model, d / "n.safetensors")


@pytest.mark.parametrize("make, problem", [
    (_truncated, "truncated: its .* bytes do not match the tensors its header lists"),
    (_header_cut, "truncated: the file ends inside its header"),
    (_junk, "not a safetensors model file"),
    (_empty, r"not a safetensors model file \(only 0 bytes\)"),
    (_foreign, "not a psal model"),
    (_unknown_arch, "unknown architecture 'psal-teleport'"),
    (_mismatch, "weights do not match architecture 'test-tiny-upscale'"),
    (_bad_config, "config does not fit architecture"),
    (_constructor_fails, "config does not fit architecture 'psal-upscale'"),
    (_metadata_list, "damaged: invalid JSON in header"),
    (_metadata_not_strings, "damaged: invalid JSON in header"),
    (_tensor_entry(data_offsets=lambda o: [str(o[0]), str(o[1])]), "damaged: invalid JSON in header"),
    (_tensor_entry(data_offsets=lambda o: [o[1], o[0]]), "damaged: invalid"),
    (_tensor_entry(data_offsets=lambda o: [o[0], o[1], 0]), "damaged: invalid JSON in header"),
    (_tensor_entry(shape=lambda s: [-d for d in s]), "damaged: invalid JSON in header"),  # 4 dims: same size
    (_tensor_entry(shape=lambda s: [float(d) for d in s]), "damaged: invalid JSON in header"),
    (_tensor_entry(shape=lambda s: [s[0] + 1, *s[1:]]), "damaged: invalid shape, data type, or offset"),
    (_future, "format version '99' is not supported"),
    (_nan, "NaN"),
])
def test_bad_files_name_the_file_and_problem(tmp_path: Path, saved: tuple[TinyUpscale, Path],
                                             make, problem: str) -> None:
    bad = make(saved[1], tmp_path)
    with pytest.raises(ModelFileError, match=problem) as err:
        load_model(bad)
    assert str(err.value).startswith(f"{bad}: ")


def test_every_safetensors_dtype_is_read(tmp_path: Path, saved: tuple[TinyUpscale, Path]) -> None:
    """A valid file with tensors of any type safetensors defines (8-bit floats, unsigned
    integers) is read, not called damaged: safetensors parses the header."""
    dtypes = [getattr(torch, name) for name in ("float8_e4m3fn", "float8_e5m2", "uint16", "uint32", "uint64")
              if hasattr(torch, name)]
    tensors = {f"t{i}": torch.zeros(2, 3).to(dtype) for i, dtype in enumerate(dtypes)}
    path = tmp_path / "dtypes.safetensors"
    save_file(tensors, path, metadata=read_metadata(saved[1]))
    info = read_info(path)
    assert len(dtypes) >= 3 and info.parameters == 6 * len(dtypes) and info.task == "upscale"
    with pytest.raises(ModelFileError, match="weights do not match architecture"):  # read, then found foreign
        load_model(path)


def test_wrong_task_and_missing_file(tmp_path: Path, saved: tuple[TinyUpscale, Path]) -> None:
    with pytest.raises(ModelFileError, match="is a model for upscale, not for inpaint"):
        load_model(saved[1], task="inpaint")
    with pytest.raises(ModelFileError, match="no such file"):
        read_info(tmp_path / "nope.safetensors")


def test_save_refuses_unregistered_modules(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="not a registered psal network"):
        save_model(torch.nn.Linear(2, 2), tmp_path / "l.safetensors")
    assert TinyInpaint.architecture == "test-tiny-inpaint"


SHIPPED = sorted((Path(__file__).resolve().parent.parent / "weights").glob("*.safetensors"))


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_models_still_load(path: Path) -> None:
    """A change to a network must not strand the weights in weights/."""
    model, info = load_model(path)
    assert info.task in path.name
    if info.task == "upscale":
        families = {default_model_path("upscale", info.scale, family).name: family for family in UPSCALE_FAMILIES}
        assert path.name in families
        # a real-photo network says so in its record; a clean one has no degradation or bicubic
        assert info.training.get("degradation", {}).get("name", "bicubic") == families[path.name]
