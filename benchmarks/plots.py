"""The figures of the README and the model cards, drawn from committed JSON.

    pip install ".[docs]"                          # matplotlib
    python benchmarks/plots.py                     # docs/img/*.png from benchmarks/results/
    python benchmarks/plots.py --collect-history   # first re-read every shipped model file from git

Inputs, all committed, so the figures come back in seconds without a model run:

- `benchmarks/results/history.json`: every version of each file in `weights/` that git holds
  (steps, parameters, the figures measured on it, how it was grown), written by
  `--collect-history` from the files' own metadata (`psal models --json` shows the newest);
- `benchmarks/results/ablation-x4.json`: `psal eval upscale` of the ×4 network trained with and
  without its PSAL block, per set and for the images that stand out (commands inside);
- `benchmarks/results/speed-*.json`: `python benchmarks/speed.py` (time and peak memory per
  command and size); a figure per file, none when there is none;
- `weights/inpaint.safetensors`: the BSD100 figures of psal and its baselines per mask family;
- `examples/*.png`: the before/after rows.
"""

from __future__ import annotations

import argparse
import json
import re
import struct
import subprocess
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display needed
import matplotlib.pyplot as plt  # noqa: E402
from PIL import Image  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
OUT = ROOT / "docs" / "img"
MODELS = ["upscale-x2", "upscale-x3", "upscale-x4", "inpaint", "colorize"]
FAMILIES = ["thin", "thick", "box"]

# Set5 and Set14 by content, to read the ablation by the kind of picture PSAL should help
# (repeated structure) or not (smooth surfaces); BSD100 photos are mixed and stay one group.
CATEGORIES = {
    "repeated structure, text": ["butterfly", "monarch", "ppt3", "comic", "zebra", "barbara"],
    "natural texture": ["bird", "baboon", "bridge", "coastguard", "flowers", "man"],
    "faces, smooth surfaces": ["baby", "head", "woman", "face", "lenna", "pepper", "foreman"],
}


# ----------------------------------------------------------------------------- history


def _header(commit: str, path: str) -> dict:
    """The JSON header of a safetensors file as git holds it at `commit` (weights never loaded)."""
    blob = subprocess.run(["git", "-C", str(ROOT), "show", f"{commit}:{path}"],
                          capture_output=True, check=True).stdout
    size = struct.unpack("<Q", blob[:8])[0]
    return json.loads(blob[8:8 + size])


def _figures(metrics: dict) -> dict:
    """The comparable figures of one file's metrics, whatever key layout its version used."""
    out = {}
    flat = {**metrics, **{k: v for k, v in metrics.get("val", {}).items() if not isinstance(v, dict)}}
    for key in ("val_crops_psnr", "val_psnr"):  # psal train's validation crops (renamed later)
        if key in metrics:
            out["val_crops_psnr"] = metrics[key]
            out["val_crops_bicubic_psnr"] = metrics[key.replace("psnr", "bicubic_psnr")]
    for name in ("set5", "set14", "val"):
        if isinstance(metrics.get(name), dict) and "psnr" in metrics[name]:
            out[name] = {k: metrics[name][k] for k in ("psnr", "ssim", "bicubic_psnr", "ensemble_psnr")
                         if k in metrics[name]}
    for family in FAMILIES:
        got = metrics.get("val", {}).get(family)
        if isinstance(got, dict):
            out[family] = {who: {k: res[k] for k in ("psnr", "ssim", "mae", "sharpness_rel")}
                           for who, res in (("psal", got), ("telea", got["telea"]), ("mean", got["mean"]))}
    colour = {k[len("bsd100_320_"):]: v for k, v in flat.items() if k.startswith("bsd100_320_")}
    if colour:
        out["colorize"] = colour
    return out


def collect_history() -> dict:
    """Every committed version of each shipped model file: one entry per step count (the
    latest commit at that count, so re-measurements replace the first figures)."""
    history = {}
    for name in MODELS:
        path = f"weights/{name}.safetensors"
        log = subprocess.run(["git", "-C", str(ROOT), "log", "--reverse", "--format=%H %cs", "--", path],
                             capture_output=True, text=True, check=True).stdout.split("\n")
        versions: dict[int, dict] = {}
        training: dict = {}
        for line in filter(None, log):
            commit, date = line.split()
            header = _header(commit, path)
            meta = header.pop("__metadata__", {})
            training = json.loads(meta.get("training", "{}"))
            parameters = 0
            for tensor in header.values():
                count = 1
                for side in tensor["shape"]:
                    count *= side
                parameters += count
            steps = int(training.get("steps", 0))
            versions[steps] = {"steps": steps, "commit": commit[:10], "date": date, "parameters": parameters,
                               **_figures(json.loads(meta.get("metrics", "{}")))}
        history[name] = {"versions": [versions[s] for s in sorted(versions)], "events": _events(training)}
    return history


def _events(training: dict) -> list[dict]:
    """Where the newest file's recorded history says the network was grown or its recipe changed."""
    events = []
    for grown in training.get("grown", []):
        found = re.match(r"(.*) at step (\d+)", grown)
        if found:
            events.append({"step": int(found[2]), "what": found[1]})
    firsts = {}  # the first run with each change from the initial recipe (L1, CPU, plain crops)
    for run in training.get("runs", []):
        start = int(str(run["steps"]).split("-")[0])
        if run.get("loss", "l1") == "l2":
            firsts.setdefault("L2 loss", start)
        if run.get("device", "cpu") != "cpu":
            firsts.setdefault(f"GPU, batch {run['batch']}", start)
    for line in training.get("augmented", []):
        found = re.search(r"from step (\d+)", line)
        if found:
            firsts.setdefault("rescaled, colour-permuted crops", int(found[1]))
    events += [{"step": step, "what": what} for what, step in firsts.items()]
    merged: dict[int, list[str]] = {}
    for event in events:
        merged.setdefault(event["step"], []).append(event["what"])
    return [{"step": step, "what": "; ".join(whats)} for step, whats in sorted(merged.items())]


# ----------------------------------------------------------------------------- figures


def _save(fig, name: str) -> Path:
    path = OUT / name
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def learning_curves(history: dict) -> Path:
    """Validation PSNR over bicubic against steps for each upscaler; inpainting's hole error
    against Telea's per mask family."""
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    for ax, name in zip(axes.flat, ["upscale-x2", "upscale-x3", "upscale-x4"]):
        points = [v for v in history[name]["versions"] if "val_crops_psnr" in v]
        steps = [v["steps"] / 1000 for v in points]
        gain = [v["val_crops_psnr"] - v["val_crops_bicubic_psnr"] for v in points]
        ax.plot(steps, gain, "o-", color="C0", label="validation crops (psal train)")
        full = [v for v in history[name]["versions"] if "val" in v]
        if full:
            ax.plot([v["steps"] / 1000 for v in full], [v["val"]["psnr"] - v["val"]["bicubic_psnr"] for v in full],
                    "s-", color="C1", label="BSD100, whole photos (psal eval)")
        notes = []
        for k, event in enumerate(history[name]["events"], 1):
            ax.axvline(event["step"] / 1000, color="0.6", linestyle=":", linewidth=1)
            ax.annotate(str(k), (event["step"] / 1000, 1.0), xycoords=("data", "axes fraction"), fontsize=8,
                        color="0.3", ha="center", va="bottom")
            notes.append(f"{k}: {event['what']} (step {event['step']})")
        if notes:
            ax.text(0.02, 0.97, "\n".join(notes), transform=ax.transAxes, fontsize=7, va="top", color="0.3")
        ax.set_title(f"{name}: {points[-1]['parameters'] / 1000:.0f} k parameters shipped", pad=14)
        ax.set_xlabel("training steps (thousands)")
        ax.set_ylabel("Y PSNR over bicubic (dB)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    ax = axes.flat[3]
    points = [v for v in history["inpaint"]["versions"] if "thin" in v]
    first, later = points[0], points[1:]  # the first version had a softer detail stage (the card says how)
    for colour, family in zip(("C0", "C1", "C2"), FAMILIES):
        ax.plot([v["steps"] / 1000 for v in later],
                [v[family]["psal"]["mae"] - v[family]["telea"]["mae"] for v in later], "o-", color=colour, label=family)
        ax.plot(first["steps"] / 1000, first[family]["psal"]["mae"] - first[family]["telea"]["mae"], "o",
                mfc="none", color=colour)
    ax.axhline(0, color="k", linewidth=0.8)
    ax.annotate("OpenCV Telea", (0.99, 0), xycoords=("axes fraction", "data"), fontsize=8, va="bottom", ha="right")
    ax.annotate("hollow: first version,\nsofter detail stage", (first["steps"] / 1000 + 0.15, -0.55), fontsize=7,
                color="0.35")
    ax.set_title("inpaint: BSD100 hole error against Telea's (lower is better)")
    ax.set_xlabel("training steps (thousands)")
    ax.set_ylabel("hole MAE minus Telea's (0-255)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, title="masks", title_fontsize=8)
    fig.tight_layout()
    return _save(fig, "learning-curves.png")


def ablation(path: Path) -> Path:
    """What the PSAL block adds to the ×4 network: per evaluation set, and per named image by content."""
    report = json.loads(path.read_text())
    fig, axes = plt.subplots(1, 2, figsize=(14, 4.6), sharey=True)
    for ax, run in zip(axes, report["runs"]):
        sets = run["sets"]
        bars = ax.bar(range(len(sets)), [v["difference"] for v in sets.values()], color="0.75", width=0.6)
        for bar, value in zip(bars, sets.values()):
            ahead = f"\n{value['ahead']}" if "ahead" in value else ""
            ax.annotate(f"{value['difference']:+.2f}{ahead}", (bar.get_x() + bar.get_width() / 2, 0),
                        xytext=(0, -22 if value["difference"] >= 0 else 6), textcoords="offset points",
                        ha="center", fontsize=8)
        x0 = len(sets) + 0.5
        groups = {**CATEGORIES, "BSD100 photos": []}
        for k, (title, names) in enumerate(groups.items()):
            named = sorted(((n, d) for n, d in run["images"].items()
                            if n in names or (not names and not any(n in v for v in CATEGORIES.values()))),
                           key=lambda item: -item[1])
            ax.scatter([x0 + 1.6 * k] * len(named), [d for _, d in named], color=f"C{k}" if names else "0.3", s=30)
            while named:  # one label for the images within 0.02 dB of each other
                near = [(n, d) for n, d in named if named[0][1] - d <= 0.02]
                named = named[len(near):]
                ax.annotate(", ".join(f"{n} {d:+.2f}" if d else f"{n} ±0.01" for n, d in near), (x0 + 1.6 * k, near[0][1]), xytext=(6, -3),
                            textcoords="offset points", fontsize=7)
        ax.axhline(0, color="0.4", linewidth=0.8)
        ax.axvline(len(sets) - 0.2, color="0.8", linewidth=0.8)
        ax.set_xticks(list(range(len(sets))) + [x0 + 1.6 * k for k in range(len(groups))],
                      [*sets, *(t.replace(" ", "\n", 1) for t in groups)], fontsize=8)
        ax.set_xlim(-0.6, x0 + 1.6 * len(groups))
        ax.set_title(run["crops"], fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("Y PSNR with PSAL minus without (dB)")
    fig.suptitle("×4, 2500 steps from scratch: mean per evaluation set (bars, images ahead below) and the images that stand out, by content", fontsize=10)
    fig.tight_layout()
    return _save(fig, "ablation-x4.png")


def inpaint_tradeoff(history: dict) -> Path:
    """Hole error against sharpness per mask family: psal (shipped and its first version) and Telea."""
    versions = [v for v in history["inpaint"]["versions"] if "thin" in v]
    first, shipped = versions[0], versions[-1]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8), sharey=False)
    for ax, family in zip(axes, FAMILIES):
        for label, got, style in ((f"psal (shipped, {shipped['steps']} steps)", shipped[family]["psal"], ("o", "C0")),
                                  (f"psal, first version ({first['steps']} steps)", first[family]["psal"], ("o", "C9")),
                                  ("OpenCV Telea", shipped[family]["telea"], ("s", "C3"))):
            ax.scatter(100 * got["sharpness_rel"], got["mae"], marker=style[0], color=style[1], s=60, label=label)
            ax.annotate(f"{got['mae']:.2f}", (100 * got["sharpness_rel"], got["mae"]), fontsize=7,
                        xytext=(6, 4), textcoords="offset points")
        mean = shipped[family]["mean"]  # far above the others: named, not drawn
        ax.text(0.02, 0.03, f"known-mean fill (off the chart): MAE {mean['mae']:.1f}, sharpness 0 %",
                transform=ax.transAxes, fontsize=7, color="0.35")
        ax.axvline(100, color="0.6", linestyle=":", linewidth=1)
        ax.annotate("the photo's own", (100, 0.97), xycoords=("data", "axes fraction"), fontsize=7, ha="right",
                    va="top", rotation=90, color="0.35")
        low, high = ax.get_ylim()
        ax.set_ylim(low - 0.35 * (high - low), high + 0.2 * (high - low))
        ax.set_title(f"{family} masks (BSD100, 100 photos)")
        ax.set_xlabel("sharpness in the hole (% of the photo's)")
        ax.set_ylabel("hole MAE (0-255, lower is better)")
        ax.set_xlim(-5, 125)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="upper center")
    fig.tight_layout()
    return _save(fig, "inpaint-sharpness.png")


def speed(path: Path) -> Path:
    """Seconds and peak memory against megapixels, a line per command and precision."""
    report = json.loads(path.read_text())
    series: dict[str, list[dict]] = {}
    for row in report["rows"]:
        series.setdefault(f"{row['command']} ({row['precision']})", []).append(row)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for k, (label, rows) in enumerate(sorted(series.items())):
        rows.sort(key=lambda r: r["megapixels"])
        mp = [r["megapixels"] for r in rows]
        axes[0].plot(mp, [r["seconds"] for r in rows], "o-", color=f"C{k}", label=label)
        measured = [r for r in rows if r.get("peak_mb") is not None]  # a row may time without memory
        axes[1].plot([r["megapixels"] for r in measured], [r["peak_mb"] / 1024 for r in measured], "o-",
                     color=f"C{k}", label=label)
    threads = report.get("threads")
    where = f"{report.get('machine') or report.get('device')}" + (f", {threads} threads" if threads else "")
    for ax, what in zip(axes, ("seconds", "peak memory (GB)")):
        ax.set_xlabel("input megapixels")
        ax.set_ylabel(what)
        ax.grid(alpha=0.3)
        ax.set_title(f"{what} per image: {where}", fontsize=9)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, f"{path.stem}.png")


def example_rows() -> list[Path]:
    """Before and after for inpaint and colorize, from the pictures in examples/."""
    rows = {
        "examples-inpaint.png": [("photo", "coffee.png"), ("mask (white = hole)", "coffee_mask.png"),
                                 ("psal inpaint", "coffee_inpainted.png")],
        "examples-colorize.png": [("gray photo", "motorcycle_gray.png"), ("colour reference", "motorcycle_reference.png"),
                                  ("psal colorize", "motorcycle_colorized.png")],
    }
    written = []
    for name, panels in rows.items():
        fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 2.5))
        for ax, (title, file) in zip(axes, panels):
            image = Image.open(ROOT / "examples" / file)
            ax.imshow(image, cmap="gray" if image.mode == "L" else None, vmin=0, vmax=255)
            ax.set_title(title, fontsize=10)
            ax.axis("off")
        fig.tight_layout()
        written.append(_save(fig, name))
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--collect-history", action="store_true",
                        help="re-read every committed version of weights/*.safetensors into history.json first")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    if args.collect_history:
        (RESULTS / "history.json").write_text(json.dumps(collect_history(), indent=1) + "\n")
    history = json.loads((RESULTS / "history.json").read_text())
    written = [learning_curves(history), inpaint_tradeoff(history), *example_rows()]
    written.append(ablation(RESULTS / "ablation-x4.json"))
    written += [speed(path) for path in sorted(RESULTS.glob("speed-*.json"))]
    for path in written:
        print(path.relative_to(ROOT))


if __name__ == "__main__":
    main()
