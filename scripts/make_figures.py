"""Make the README's two pictures from the project's synthetic data (no Cityscapes image):

    docs/predictions.png   validation photos | true masks | predicted masks of a trained run
    docs/dashboard.png     the report page of that run (`unet-ray report`), in headless Chromium

    python scripts/make_figures.py [--run RUN_DIR] [--out docs]

Without --run it first trains the README's main job (`unet-ray train`: built-in synthetic pairs,
10 epochs, about 1.5 min on 2 cores) into a temporary folder. The screenshot needs Debian's
Chromium at /usr/bin/chromium and the `playwright` package (never `playwright install`).
Both PNGs are reduced to a 256-colour palette to stay small (about 100 KB each).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CHROMIUM = "/usr/bin/chromium"
SAMPLES = 3
TILE = 192  # pixels per image in predictions.png (the model's 128 px, enlarged)
PAGE_WIDTH, SHOT_WIDTH, SHOT_MAX_HEIGHT = 1280, 1000, 1500


def train_run(folder: Path) -> Path:
    cmd = [sys.executable, "-m", "unet_ray.cli", "train", "--storage-path", str(folder), "--name", "figures"]
    subprocess.run(cmd, check=True)
    return folder / "figures"


def predictions_figure(run: Path, out: Path) -> None:
    from unet_ray.checkpoint import resolve
    from unet_ray.dashboard.predictions import predict_samples

    rows, label_set, size, epoch = predict_samples(resolve(str(run)), run / "prepared", SAMPLES)
    header = 28
    sheet = Image.new("RGB", (3 * TILE + 4 * 8, header + len(rows) * (TILE + 8) + 8), "white")
    draw = ImageDraw.Draw(sheet)
    for col, title in enumerate(("photo", "true mask", "predicted mask")):
        draw.text((8 + col * (TILE + 8), 8), title, fill="black")
    for i, row in enumerate(rows):
        for col, key in enumerate(("photo", "truth", "prediction")):
            tile = Image.fromarray(np.ascontiguousarray(row[key])).resize((TILE, TILE), Image.NEAREST)
            sheet.paste(tile, (8 + col * (TILE + 8), header + i * (TILE + 8)))
    save_small(sheet, out)
    print(f"wrote {out} ({out.stat().st_size // 1024} KB): {len(rows)} validation pairs, {label_set}, epoch {epoch}")


def dashboard_figure(run: Path, out: Path) -> None:
    from playwright.sync_api import sync_playwright

    report = run / "report.html"
    if not report.is_file():
        from unet_ray.dashboard.report import write_report

        write_report(run, report)
    with sync_playwright() as p, tempfile.TemporaryDirectory() as tmp:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--headless", "--no-sandbox", "--disable-gpu"])
        page = browser.new_context(viewport={"width": PAGE_WIDTH, "height": 900}, offline=True).new_page()
        page.goto(report.as_uri())
        page.wait_for_selector("#chart-val_metrics .main-svg", timeout=30_000)
        page.wait_for_selector("#predictions img", timeout=30_000)
        shot = Path(tmp) / "page.png"
        page.screenshot(path=str(shot), full_page=True)
        browser.close()
        image = Image.open(shot).convert("RGB")
    image = image.resize((SHOT_WIDTH, round(image.height * SHOT_WIDTH / image.width)), Image.LANCZOS)
    save_small(image.crop((0, 0, SHOT_WIDTH, min(image.height, SHOT_MAX_HEIGHT))), out)
    print(f"wrote {out} ({out.stat().st_size // 1024} KB)")


def save_small(image: Image.Image, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    image.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(out, optimize=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, help="a finished `unet-ray train` run folder (default: train one now)")
    parser.add_argument("--out", type=Path, default=Path("docs"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run = args.run or train_run(Path(tmp))
        predictions_figure(run, args.out / "predictions.png")
        dashboard_figure(run, args.out / "dashboard.png")


if __name__ == "__main__":
    main()
