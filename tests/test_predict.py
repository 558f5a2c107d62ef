"""`unet-ray predict`: listing and reading inputs (no Ray), then real runs through Ray Data.

The checkpoint is trained for a few seconds without Ray, enough for a road IoU well above 0.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap

import cv2
import numpy as np
import pytest
import torch
from helpers import in_process_ray
from PIL import Image

from unet_ray import checkpoint as ckpt_io
from unet_ray import engine, evaluate, pairs, palette, predict, raysession
from unet_ray.cli import main
from unet_ray.config import TrainConfig
from unet_ray.metrics import ConfusionMatrix
from unet_ray.model import build_model
from unet_ray.prepared_format import DataError

from conftest import encode, jpeg_claiming_a_huge_size


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(checkpoint folder, pairs folder): a 64px road model trained 5 short epochs in-process."""
    tmp = tmp_path_factory.mktemp("predict")
    root = pairs.write_synthetic(tmp / "pairs", 16, 8, seed=0)
    cfg = TrainConfig.from_dict(
        {"data": {"image_size": 64}, "model": {"depth": 3, "base_channels": 8}, "optim": {"lr": 1e-2}}
    ).validate()
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.num_classes)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.optim.lr)
    for _ in range(5):
        engine.train_one_epoch(model, evaluate.iter_split(root, "train", "road", 64, batch_size=4), optimizer, torch.device("cpu"))
    folder = tmp / "ckpt"
    ckpt_io.save_state(
        folder,
        {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 5, "config": cfg.to_dict(), "metrics": {}},
    )
    return folder, root


@pytest.fixture(scope="module")
def city_checkpoint(tmp_path_factory):
    """A 64px cityscapes19 checkpoint, untrained but with a head scaled up so that its predictions
    on a random photo hold many classes (a fresh head predicts one class everywhere)."""
    cfg = TrainConfig.from_dict(
        {"data": {"image_size": 64, "classes": "cityscapes19"},
         "model": {"depth": 2, "base_channels": 4, "block": "plain", "upsample": "transpose"}}
    ).validate()
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.num_classes)
    with torch.no_grad():
        model.head.weight.normal_(0, 1)
        model.head.bias.zero_()
    folder = tmp_path_factory.mktemp("predict_city") / "ckpt"
    ckpt_io.save_state(folder, {"model": model.state_dict(), "epoch": 1, "config": cfg.to_dict(), "metrics": {}})
    return folder


@pytest.fixture(scope="module")
def ray_session():
    with in_process_ray():
        yield


def _photo(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# --- no Ray ------------------------------------------------------------------------------------


def test_list_inputs_names_never_collide(tmp_path, make_pairs_folder):
    root = make_pairs_folder(2, 2)
    photos = tmp_path / "photos"
    (photos / "sub").mkdir(parents=True)
    for rel in ("a.jpg", "a.png", "sub/b.jpg", "notes.txt"):
        (photos / rel).write_bytes(b"x")
    (photos / "out").mkdir()
    (photos / "out" / "old_mask.png").write_bytes(b"x")  # an earlier run's output inside the input

    items, collisions = predict.list_inputs([str(root)])
    assert [i["name"] for i in items] == ["train_1", "train_2", "val_1", "val_2"] and collisions == {}
    items, collisions = predict.list_inputs([str(photos)], out=photos / "out")
    assert [i["name"] for i in items] == ["a", "a-2", "sub_b"]
    assert all(i["kind"] == "auto" and i["split"] == "" for i in items)
    # both names of a collision are traced back to their files (summary.json's name_collisions)
    assert collisions == {"a": str(photos / "a.jpg"), "a-2": str(photos / "a.png")}

    # a file really named like a de-duplicated one, given after it: every name maps to its own file
    (photos / "a-2.jpg").write_bytes(b"x")
    items, collisions = predict.list_inputs([str(photos / n) for n in ("a.jpg", "a.png", "a-2.jpg")])
    assert [i["name"] for i in items] == ["a", "a-2", "a-2-2"]
    assert collisions == {n: i["path"] for n, i in zip(("a", "a-2", "a-2-2"), items)}
    assert collisions["a-2"] == str(photos / "a.png")

    # two folders given: each one's name keeps val/1.jpg and train/1.jpg apart
    both, collisions = predict.list_inputs([str(root / "val"), str(root / "train")])
    assert [i["name"] for i in both] == ["val_1", "val_2", "train_1", "train_2"] and collisions == {}
    with pytest.raises(DataError, match="does not exist"):
        predict.list_inputs([str(tmp_path / "nothing")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no image files"):
        predict.list_inputs([str(tmp_path / "empty")])


def test_read_input_tells_pairs_from_photos(tmp_path, pairs_folder):
    pair_file = pairs_folder / "val" / "1.jpg"
    photo, ids = predict.read_input(str(pair_file))
    expected = pairs.read_pair(pair_file)
    assert np.array_equal(photo, expected.photo) and np.array_equal(ids, expected.train_ids)

    wide = tmp_path / "wide.jpg"  # pair-sized, but its right half is no colour mask: a photo
    wide.write_bytes(encode(_photo(256, 512)))
    photo, ids = predict.read_input(str(wide))
    assert photo.shape == (256, 512, 3) and ids is None
    with pytest.raises(predict.BadInputError, match="colour mask"):
        predict.read_input(str(wide), "pair")
    photo, ids = predict.read_input(str(pair_file), "photo")
    assert photo.shape == (256, 512, 3) and ids is None

    gray = tmp_path / "gray.png"
    gray.write_bytes(encode(_photo(9, 7)[..., 0], "PNG"))
    assert predict.read_input(str(gray))[0].shape == (9, 7, 3)
    for name, data, reason in (
        ("empty.jpg", b"", "empty file"),
        ("text.jpg", b"not an image", "not a readable image"),
        ("cut.jpg", encode(_photo(64, 64))[:300], "not a readable image"),
        ("huge.jpg", jpeg_claiming_a_huge_size(), "not a readable image .*decompression bomb"),
    ):
        (tmp_path / name).write_bytes(data)
        for kind in ("auto", "photo", "pair"):
            with pytest.raises(predict.BadInputError, match=reason) as info:
                predict.read_input(str(tmp_path / name), kind)
            assert str(info.value).startswith(str(tmp_path / name))


def test_confusion_counts_match_confusion_matrix():
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 19, (32, 32)).astype(np.uint8)
    truth[:4] = 255
    pred = rng.integers(0, 19, (32, 32)).astype(np.uint8)
    reference = ConfusionMatrix(19)
    reference.update(torch.from_numpy(truth), torch.from_numpy(pred))
    assert np.array_equal(predict.confusion_counts(truth, pred, 19), reference.mat.flatten().numpy())


def test_overlay_blends_only_coloured_pixels():
    photo = np.full((2, 2, 3), 100, np.uint8)
    color = np.zeros((2, 2, 3), np.uint8)
    color[0, 0] = (200, 0, 50)
    blended = predict.overlay_image(photo, color)
    assert blended[0, 0].tolist() == [150, 50, 75]
    assert (blended[1] == 100).all()


def test_actor_resources_fit_small_machines():
    resources, actors, threads = predict.actor_resources(2, False, {"CPU": 2.0})
    assert resources == {"num_cpus": 0.75} and actors == 2 and threads == 1
    assert predict.actor_resources(2, False, {"CPU": 16.0})[2] == 8
    # --gpu: every actor runs, the GPUs shared evenly (fractions that pack: 3 actors on 2 GPUs ask
    # for half a GPU each, not 2/3, which two could not share)
    assert predict.actor_resources(4, True, {"CPU": 8.0, "GPU": 2.0})[:2] == ({"num_gpus": 0.5, "num_cpus": 1}, 4)
    assert predict.actor_resources(3, True, {"CPU": 8.0, "GPU": 2.0})[:2] == ({"num_gpus": 0.5, "num_cpus": 1}, 3)
    assert predict.actor_resources(1, True, {"CPU": 8.0, "GPU": 2.0})[:2] == ({"num_gpus": 1.0, "num_cpus": 1}, 1)
    assert predict.actor_resources(4, True, {"CPU": 8.0, "GPU": 1.0})[:2] == ({"num_gpus": 0.25, "num_cpus": 1}, 4)
    with pytest.raises(DataError, match="no GPUs"):
        predict.actor_resources(1, True, {"CPU": 8.0})


def test_predictor_masks_have_each_photos_size(trained, tmp_path):
    """The actor class called directly (no Ray): odd sizes in, masks of the same sizes out."""
    checkpoint, _ = trained
    paths = []
    for i, (h, w) in enumerate([(300, 517), (517, 300), (31, 45)]):
        paths.append(tmp_path / f"p{i}.jpg")
        paths[-1].write_bytes(encode(_photo(h, w, i)))
    worker = predict.Predictor(str(checkpoint / "state.pt"), str(tmp_path), False, False, "cpu", 1)
    n = len(paths)
    rows = worker({
        "path": np.array([str(p) for p in paths], dtype=object),
        "name": np.array([p.stem for p in paths], dtype=object),
        "kind": np.array(["auto"] * n, dtype=object),
        "split": np.array([""] * n, dtype=object),
    })
    assert rows["status"].tolist() == ["ok"] * n and not rows["has_truth"].any()
    for p, size in zip(paths, [(300, 517), (517, 300), (31, 45)]):
        assert np.asarray(Image.open(tmp_path / f"{p.stem}_mask.png")).shape == size
        assert np.asarray(Image.open(tmp_path / f"{p.stem}_color.png")).shape == (*size, 3)


def test_predictor_masks_are_the_logits_upsampled_to_the_photo(city_checkpoint, tmp_path):
    """19 classes, a 300x517 photo: the mask written is the argmax of the 64x64 logits upsampled
    bilinearly to the photo's size (as `evaluate` scores a data folder at each image's own size,
    and Cityscapes' own evaluation compares), and the colour PNG is the palette of that mask."""
    photo = _photo(300, 517)
    (tmp_path / "odd.png").write_bytes(encode(photo, "PNG"))  # lossless: the actor reads these pixels
    model, _, _ = ckpt_io.load_model(city_checkpoint)
    small = cv2.resize(photo, (64, 64), interpolation=cv2.INTER_AREA)
    with torch.no_grad():
        logits = model(engine.to_model_input(torch.from_numpy(small[None]), torch.device("cpu")))
    expected_small = logits.argmax(dim=1)[0].numpy().astype(np.uint8)
    assert len(np.unique(expected_small)) >= 5  # enough classes that a wrong resize shows
    upsampled = torch.nn.functional.interpolate(logits, size=(300, 517), mode="bilinear", align_corners=False)
    expected = upsampled.argmax(dim=1)[0].numpy().astype(np.uint8)
    # enlarging the 64x64 classes instead (nearest neighbour) gives another mask: this test tells them apart
    assert not np.array_equal(expected, cv2.resize(expected_small, (517, 300), interpolation=cv2.INTER_NEAREST_EXACT))

    worker = predict.Predictor(str(city_checkpoint / "state.pt"), str(tmp_path / "out"), False, False, "cpu", 1)
    (tmp_path / "out").mkdir()
    rows = worker({
        "path": np.array([str(tmp_path / "odd.png")], dtype=object),
        "name": np.array(["odd"], dtype=object),
        "kind": np.array(["auto"], dtype=object),
        "split": np.array([""], dtype=object),
    })
    assert rows["status"].tolist() == ["ok"]
    mask = np.asarray(Image.open(tmp_path / "out" / "odd_mask.png"))
    np.testing.assert_array_equal(mask, expected)
    color = np.asarray(Image.open(tmp_path / "out" / "odd_color.png"))
    np.testing.assert_array_equal(color, palette.class_set("cityscapes19").colorize(mask))


def test_cli_input_errors_stop_before_ray(trained, tmp_path, capsys, monkeypatch):
    checkpoint, _ = trained

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started for a run that should have stopped before it")

    monkeypatch.setattr(raysession, "ensure_ray", no_ray)  # predict imports it from unet_ray.raysession when run
    assert main(["predict", "--checkpoint", str(checkpoint), "--input", str(tmp_path / "none"), "--out", str(tmp_path / "o")]) == 2
    assert "input" in capsys.readouterr().err
    assert main(["predict", "--checkpoint", str(tmp_path / "none"), "--input", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    for flag, value in (("--workers", "0"), ("--workers", "-1"), ("--batch-size", "0")):
        argv = ["predict", "--checkpoint", str(checkpoint), "--input", str(tmp_path), "--out", str(tmp_path / "o"), flag, value]
        assert main(argv) == 2
        assert f"unet-ray predict: error: {flag} {value}: must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


# --- through Ray Data ------------------------------------------------------------------------


@pytest.mark.ray
def test_pair_iou_equals_evaluate(ray_session, trained, tmp_path):
    checkpoint, root = trained
    summary = predict.predict(checkpoint, [str(root / "val")], tmp_path / "out", batch_size=3)
    reference = evaluate.evaluate_checkpoint(checkpoint, root, "val")
    assert 0.0 < reference["val_iou"] < 1.0
    assert summary["iou"] == pytest.approx(reference["val_iou"], abs=1e-6)
    assert summary["metrics"]["val_pixels"] == reference["val_pixels"] == 8 * 64 * 64
    assert (summary["pairs"], summary["written"], summary["skipped"]) == (8, 8, 0)
    for i in range(1, 9):
        mask = np.asarray(Image.open(tmp_path / "out" / f"{i}_mask.png"))
        assert mask.shape == (256, 256) and mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1}
        assert np.asarray(Image.open(tmp_path / "out" / f"{i}_color.png")).shape == (256, 256, 3)
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["iou"] == summary["iou"]

    again = predict.predict(checkpoint, [str(root / "val")], tmp_path / "out", skip_existing=True)
    assert (again["existing"], again["written"], again["pairs"]) == (8, 0, 0)


@pytest.mark.ray
def test_pairs_folder_through_cli_scores_each_split(ray_session, trained, tmp_path, capsys):
    """A pairs folder with train/ and val/: names prefixed by split, IoU per split as evaluate's;
    --checkpoint given as a run folder (its best.json)."""
    checkpoint, root = trained
    run = tmp_path / "run"
    run.mkdir()
    (run / "best.json").write_text(json.dumps({"checkpoint": str(checkpoint)}))
    out = tmp_path / "out"
    assert main(["predict", "--checkpoint", str(run), "--input", str(root), "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert f'"iou": {summary["iou"]}' in capsys.readouterr().out  # the summary is printed too
    assert (summary["pairs"], summary["written"]) == (24, 24)
    assert len(list(out.glob("*_mask.png"))) == 24
    assert (out / "train_1_mask.png").is_file() and (out / "val_1_mask.png").is_file()
    for split in ("train", "val"):
        reference = evaluate.evaluate_checkpoint(checkpoint, root, split)
        assert summary["by_split"][split]["val_iou"] == pytest.approx(reference["val_iou"], abs=1e-6)


@pytest.mark.ray
def test_cityscapes_tree_through_cli_scores_each_split(ray_session, trained, tmp_path, capsys):
    """The official Cityscapes layout as --input: every leftImg8bit photo is predicted, named by
    split and its path below it, written at its own size (the logits upsampled), and scored
    against its gtFine label ids (here for the road model's two classes) as evaluate scores them."""
    from layout_trees import write_cityscapes_tree

    checkpoint, _ = trained
    tree = write_cityscapes_tree(tmp_path / "cityscapes", per_city=2, size=(96, 192))
    out = tmp_path / "out"
    assert main(["predict", "--checkpoint", str(checkpoint), "--input", str(tree), "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["written"], summary["skipped"]) == (8, 0)
    mask = np.asarray(Image.open(out / "val_aachen_aachen_000000_000000_mask.png"))
    assert mask.shape == (96, 192) and set(np.unique(mask)) <= {0, 1}
    for split in ("train", "val"):
        reference = evaluate.evaluate_checkpoint(checkpoint, tree, split)
        assert 0 < reference["val_iou"] < 1
        assert summary["by_split"][split]["val_iou"] == pytest.approx(reference["val_iou"], abs=1e-6)


@pytest.mark.ray
def test_odd_sizes_and_unreadable_files(ray_session, trained, tmp_path, capsys):
    """Odd sizes give masks of their own size; unreadable files (a decompression bomb too) are
    skipped and counted; progress and the actor count are printed; colliding names are traced
    back in summary.json; a folder of nothing but unreadable files fails (exit 2)."""
    checkpoint, _ = trained
    photos = tmp_path / "photos"
    photos.mkdir()
    # output name -> (file, photo size); odd.png collides with odd.jpg and becomes odd-2
    good = {"odd": ("odd.jpg", (300, 517)), "odd-2": ("odd.png", (31, 45)), "tall": ("tall.png", (517, 300)),
            "tiny": ("tiny.jpg", (5, 3))}
    for file, (h, w) in good.values():
        (photos / file).write_bytes(encode(_photo(h, w), "PNG" if file.endswith("png") else "JPEG"))
    (photos / "rgba.png").write_bytes(encode(np.dstack([_photo(40, 60), np.full((40, 60), 128, np.uint8)]), "PNG"))
    good["rgba"] = ("rgba.png", (40, 60))
    bad = {"zero.jpg": b"", "text.jpg": b"this is no image", "cut.jpg": encode(_photo(300, 517))[:2000],
           "huge.jpg": jpeg_claiming_a_huge_size()}
    for name, data in bad.items():
        (photos / name).write_bytes(data)
    out = tmp_path / "out"

    rc = main(["predict", "--checkpoint", str(checkpoint), "--input", str(photos), "--out", str(out),
               "--overlay", "--workers", "1", "--batch-size", "4"])
    printed = capsys.readouterr().out
    assert rc == 0
    lines = printed.splitlines()
    assert any(line.startswith(f"predict: 9 files -> {out} (model 64px, road, epoch 5 of ") for line in lines)
    assert any(re.fullmatch(r"predict: 1 model actor \(num_cpus=[\d.]+ each\)", line) for line in lines)
    progress = [int(m[1]) for m in (re.fullmatch(r"predict: (\d+)/9 files \([\d.]+/s, ~\d+s left\)", line) for line in lines) if m]
    assert progress and progress == sorted(progress) and progress[-1] == 9, printed
    assert "skipped 4 of 9 files" in printed
    for name in bad:
        assert f"skipped {photos / name}: " in printed
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["inputs"], summary["read"], summary["written"], summary["skipped"], summary["pairs"]) == (9, 5, 5, 4, 0)
    assert "iou" not in summary
    assert summary["name_collisions"] == {"odd": str(photos / "odd.jpg"), "odd-2": str(photos / "odd.png")}
    listed = (out / "skipped.txt").read_text().splitlines()
    assert sorted(line.split(": ", 1)[0] for line in listed) == sorted(str(photos / n) for n in bad)
    assert any("empty file" in line for line in listed)
    assert any(line.startswith(f"{photos / 'huge.jpg'}: not a readable image") for line in listed)
    for stem, (_, size) in good.items():
        mask = np.asarray(Image.open(out / f"{stem}_mask.png"))
        assert mask.shape == size and set(np.unique(mask)) <= {0, 1}
        assert np.asarray(Image.open(out / f"{stem}_color.png")).shape == (*size, 3)
        assert np.asarray(Image.open(out / f"{stem}_overlay.png")).shape == (*size, 3)

    # nothing readable at all: the run fails with the reason, after writing summary and skipped.txt
    only_bad = tmp_path / "only_bad"
    only_bad.mkdir()
    for name, data in bad.items():
        (only_bad / name).write_bytes(data)
    rc = main(["predict", "--checkpoint", str(checkpoint), "--input", str(only_bad), "--out", str(tmp_path / "out_bad"),
               "--batch-size", "2"])  # default --workers 2: two blocks, two actors
    captured = capsys.readouterr()
    assert rc == 2
    assert re.search(r"^predict: 2 model actors \(num_cpus=[\d.]+ each\)$", captured.out, re.M)
    assert "unet-ray predict: error: none of the 4 files could be predicted; every one was skipped" in captured.err
    summary = json.loads((tmp_path / "out_bad" / "summary.json").read_text())
    assert (summary["written"], summary["skipped"]) == (0, 4) and "name_collisions" not in summary
    assert len((tmp_path / "out_bad" / "skipped.txt").read_text().splitlines()) == 4


# A driver that kept every result (mask + colour image per photo) would grow by this much per photo.
PHOTO_H, PHOTO_W = 120, 160
HELD_BYTES_PER_PHOTO = PHOTO_H * PHOTO_W * (1 + 3)

RSS_SCRIPT = textwrap.dedent(
    """
    import resource, sys
    from unet_ray.cli import main
    rc = main(sys.argv[1:])
    print("PEAK_RSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, flush=True)
    sys.exit(rc)
    """
)


def _driver_peak_rss(checkpoint, photos, out) -> int:
    """Peak RSS in bytes of a `unet-ray predict` driver process (its own, not Ray's workers)."""
    done = subprocess.run(
        [sys.executable, "-c", RSS_SCRIPT, "predict", "--checkpoint", str(checkpoint), "--input", str(photos),
         "--out", str(out), "--batch-size", "32"],
        capture_output=True, text=True, timeout=240,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    peak = [line for line in done.stdout.splitlines() if line.startswith("PEAK_RSS_KB")]
    assert peak, done.stdout[-2000:]
    return int(peak[-1].split()[1]) * 1024


@pytest.mark.ray
def test_driver_memory_stays_flat(trained, tmp_path):
    """1000 photos stream through with the driver's peak memory about that of a 100-photo run:
    results are counted as they arrive, never held. Holding only the 900 extra photos' masks and
    colour images would add ~69 MB; the bound allows a quarter of that."""
    checkpoint, _ = trained
    base = _photo(PHOTO_H, PHOTO_W)
    for n in (100, 1000):
        folder = tmp_path / f"photos{n}"
        folder.mkdir()
        for i in range(n):
            Image.fromarray(np.roll(base, i, axis=1)).save(folder / f"{i:04d}.jpg", quality=85)
    small = _driver_peak_rss(checkpoint, tmp_path / "photos100", tmp_path / "out100")
    large = _driver_peak_rss(checkpoint, tmp_path / "photos1000", tmp_path / "out1000")
    assert len(list((tmp_path / "out1000").glob("*_mask.png"))) == 1000
    growth, held = large - small, 900 * HELD_BYTES_PER_PHOTO
    assert growth < held / 4, f"driver peak RSS grew {growth / 2**20:.1f} MB from 100 to 1000 photos ({small / 2**20:.0f} MB -> {large / 2**20:.0f} MB)"
