"""Memory: an image that would not fit is refused with one line, under a limit the test sets.

Each run is a real `psal` process whose address space the test limits (RLIMIT_AS) after
torch is loaded, so the limit is what remains for the work, not the machine's memory.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from conftest import psal_env, stray_files
from psal_cli import engine

pytestmark = [pytest.mark.usefixtures("isolated"),
              pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc and sets RLIMIT_AS")]

LIMITED = """
import resource, sys, torch, tiny_networks
from psal_cli.cli import main
with open("/proc/self/status") as f:
    size = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
resource.setrlimit(resource.RLIMIT_AS, (size + int(sys.argv.pop(1)), resource.RLIM_INFINITY))
sys.argv[0] = "psal"
main()
"""

HEADROOM = 1 << 30


def limited_psal(*args: str, headroom: int = HEADROOM) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", LIMITED, str(headroom), *args], capture_output=True,
                          text=True, env=psal_env(), timeout=300)


def test_available_memory_honours_an_address_space_limit() -> None:
    code = ("import resource; from psal_cli.engine import available_memory\n"
            "resource.setrlimit(resource.RLIMIT_AS, (1 << 36, resource.RLIM_INFINITY))\n"
            "print(available_memory())")
    free = engine.available_memory()
    assert free is not None and free > 0
    limited = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                 env=psal_env(), check=True).stdout)
    assert 0 < limited <= 1 << 36


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """in/big.png (3000×3000: GBs by every network's estimate), in/small.png, mask.png, ref.png."""
    root = tmp_path_factory.mktemp("memory")
    (root / "in").mkdir()
    Image.new("RGB", (3000, 3000), (90, 120, 150)).save(root / "in" / "big.png", compress_level=1)
    Image.new("RGB", (48, 32), (200, 40, 10)).save(root / "in" / "small.png")
    mask = Image.new("L", (48, 32), 0)
    mask.paste(255, (10, 10, 20, 20))
    mask.save(root / "mask.png")  # resized (nearest) for the big input
    Image.new("RGB", (48, 32), (10, 200, 40)).save(root / "ref.png")
    return root


@pytest.mark.parametrize("command", [["upscale", "--scale", "4"], ["inpaint", "--mask", "mask.png"],
                                     ["colorize", "--reference", "ref.png"]])
def test_too_large_an_image_is_refused_and_the_batch_goes_on(command: list[str], inputs: Path) -> None:
    args = [str(inputs / a) if a.endswith(".png") else a for a in command[1:]]
    r = limited_psal(command[0], str(inputs / "in"), *args, "-o", "out", "--json")
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr
    summary = {Path(x["input"]).name: x for x in json.loads(r.stdout)["results"]}
    big, small = summary["big.png"], summary["small.png"]
    assert small["status"] == "done", small
    assert big["status"] == "failed" and "needs about" in big["error"] and "available" in big["error"]
    assert "\n" not in big["error"]
    assert sorted(p.name for p in Path("out").iterdir()) == ["small.png"]
    assert not stray_files(".")


def test_an_image_the_estimate_admits_runs_within_the_limit() -> None:
    # The estimate is an upper bound: what it lets through must not die of the limit.
    Image.new("RGB", (900, 600), (90, 120, 150)).save("mid.png")
    r = limited_psal("upscale", "mid.png", "--scale", "2", "-o", "mid_x2.png", headroom=800 << 20)
    assert r.returncode == 0, r.stderr
    assert Image.open("mid_x2.png").size == (1800, 1200)
