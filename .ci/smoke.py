"""Each edit once through the installed `psal` on the bundled examples; checks each output.

Usage: python smoke.py EXAMPLES_DIR (run from a folder outside the checkout).
"""

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

examples = Path(sys.argv[1])
psal = shutil.which("psal")
assert psal, "no psal on PATH"
runs = {
    "upscale": (["upscale", "chelsea.png", "--scale", "2"], "chelsea.png", 2),
    "colorize": (["colorize", "motorcycle_gray.png", "--reference", "motorcycle_reference.png"],
                 "motorcycle_gray.png", 1),
    "inpaint": (["inpaint", "coffee.png", "--mask", "coffee_mask.png"], "coffee.png", 1),
}
for name, (args, source, scale) in runs.items():
    out = Path(f"smoke_{name}.png")
    command = [psal, *[str(examples / a) if a.endswith(".png") else a for a in args], "-o", str(out),
               "--overwrite"]
    subprocess.run(command, check=True)
    before, after = Image.open(examples / source), Image.open(out)
    want = (before.width * scale, before.height * scale)
    mode = "RGB" if name == "colorize" else before.mode
    assert after.size == want, f"{name}: size {after.size}, expected {want}"
    assert after.mode == mode, f"{name}: mode {after.mode}, expected {mode}"
    if scale == 1:
        a = np.asarray(before.convert(mode), dtype=np.int16)
        b = np.asarray(after, dtype=np.int16)
        assert (a != b).any(), f"{name}: the output equals the input"
    print(f"{name}: {out} {after.size} {after.mode} ok")
