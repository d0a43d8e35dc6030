"""diffrestorer-evaluate on a tiny paired folder (DA-CLIP layout): metrics.json/md written, PSNR and
SSIM equal scikit-image's on the same restored/GT pairs, per type and averaged."""
import json
import shutil

import numpy as np
import pytest
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from diffrestorer_jax.cli import evaluate as evaluate_cli
from diffrestorer_jax.tools import evaluate as ev
from exports import tiny_export


@pytest.fixture(scope="module")
def paired(tmp_path_factory):
    from skimage import data
    root = tmp_path_factory.mktemp("paired")
    rng = np.random.default_rng(0)
    srcs = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]
    for t, folder in enumerate(("noisy", "low-light")):
        for sub in ("LQ", "GT"):
            (root / folder / sub).mkdir(parents=True)
        for i in range(2):
            gt = np.asarray(Image.fromarray(srcs[2 * t + i]).resize((32, 32)), np.float32)
            lq = gt + rng.normal(0, 20, gt.shape) if t == 0 else gt * 0.3
            Image.fromarray(gt.astype(np.uint8)).save(root / folder / "GT" / f"{i}.png")
            Image.fromarray(np.clip(lq, 0, 255).astype(np.uint8)).save(root / folder / "LQ" / f"{i}.png")
    (root / "shadowed").mkdir()  # a type we do not model: reported, skipped
    return root


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_export(tmp_path_factory.mktemp("export"))


def test_evaluate_folder_matches_skimage(ckpt, paired, tmp_path, capsys):
    out = tmp_path / "eval"
    rc = evaluate_cli.main(["--checkpoint", ckpt, "--data", str(paired), "--out", str(out), "--steps", "2",
                            "--seed", "1", "--save-images", "--no-progress", "--crop-border", "2"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "shadowed" in err and "FID skipped" in err and "Traceback" not in err
    metrics = json.loads((out / "metrics.json").read_text())
    proto = metrics["protocol"]
    assert proto["restoration"]["seed"] == 1 and proto["restoration"]["settings"]["steps"] == 2
    assert proto["metric_conventions"]["crop_border"] == 2 and "jax" in proto["versions"]
    assert metrics["fid"]["computed"] is False
    assert set(metrics["per_type"]) == {"noise", "low_light"}
    assert len(metrics["per_image"]) == 4
    for row in metrics["per_image"]:
        folder, lq_dir, name = row["name"].split("/")  # named by its path: <type folder>/LQ/<file>
        assert (folder, lq_dir) == ("noisy" if row["type"] == "noise" else "low-light", "LQ")
        restored = np.asarray(Image.open(out / "images" / folder / "LQ" / name))
        gt = np.asarray(Image.open(paired / folder / "GT" / name))
        r, g = restored[2:-2, 2:-2], gt[2:-2, 2:-2]
        assert row["psnr"] == pytest.approx(peak_signal_noise_ratio(g, r, data_range=255), abs=1e-3)
        ref_ssim = structural_similarity(g, r, channel_axis=-1, data_range=255, gaussian_weights=True,
                                         sigma=1.5, use_sample_covariance=False)
        assert row["ssim"] == pytest.approx(ref_ssim, abs=1e-4)
        lq = np.asarray(Image.open(paired / folder / "LQ" / name))
        assert row["input"]["psnr"] == pytest.approx(
            peak_signal_noise_ratio(g, lq[2:-2, 2:-2], data_range=255), abs=1e-3)
    per_type = metrics["per_type"]
    assert metrics["average"]["psnr"] == pytest.approx(np.mean([per_type[t]["psnr"] for t in per_type]))
    md = (out / "metrics.md").read_text()
    assert "| noise |" in md and "| low_light |" in md and "**average**" in md and "PSNR (Y)" in md


def test_evaluate_errors_are_messages(tmp_path, capsys):
    assert evaluate_cli.main(["--checkpoint", str(tmp_path), "--data", str(tmp_path / "none"),
                              "--out", str(tmp_path / "o")]) == 2
    assert "no such folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert evaluate_cli.main(["--checkpoint", str(tmp_path), "--data", str(tmp_path / "empty"),
                              "--out", str(tmp_path / "o")]) == 2
    assert "no LQ/GT pairs" in capsys.readouterr().err
    with pytest.raises(ev.EvaluateError):
        ev.load_pairs(str(tmp_path / "empty"))
    for flag, value in (("--crop-border", "-1"), ("--max-per-type", "0")):
        assert evaluate_cli.main(["--checkpoint", str(tmp_path), "--data", str(tmp_path / "empty"),
                                  "--out", str(tmp_path / "o"), flag, value]) == 2
        assert f"{flag} must be" in capsys.readouterr().err
    for flags in (["--data", "gs://b/test", "--out", str(tmp_path / "o")],
                  ["--data", str(tmp_path / "empty"), "--out", "gs://b/o"]):
        assert evaluate_cli.main(["--checkpoint", str(tmp_path)] + flags) == 2
        assert "only --checkpoint may be a gs://" in capsys.readouterr().err


def test_tfds_dataset_gives_the_same_numbers(ckpt, paired, tmp_path, capsys):
    """The same pairs as a built TFDS `paired` dataset: same image ids, so the same restorations."""
    from diffrestorer_jax.data.tfds.build import build_dataset
    build_dataset("paired", [str(paired)], str(tmp_path / "tfds"), "test")
    runs = {}
    for kind, data in (("folders", paired), ("tfds", tmp_path / "tfds")):
        out = tmp_path / kind
        assert evaluate_cli.main(["--checkpoint", ckpt, "--data", str(data), "--out", str(out), "--steps", "2",
                                  "--seed", "1", "--no-progress"]) == 0
        runs[kind] = json.loads((out / "metrics.json").read_text())
        assert runs[kind]["protocol"]["data_kind"] == kind
    capsys.readouterr()
    rows = lambda m: sorted((r["name"], r["psnr"], r["ssim_y"]) for r in m["per_image"])  # noqa: E731
    assert rows(runs["folders"]) == rows(runs["tfds"])


def test_fid_per_type_from_inception_weights(ckpt, paired, tmp_path, capsys, monkeypatch):
    """--fid-inception: FID of the restored (8-bit) images against the GT, per type and overall, from
    the features of exactly those images; the protocol names the weights. (Network parity with the
    PyTorch reference is test_fid_inception's; here the network runs at 75 px to keep this fast.)"""
    from diffrestorer_jax.convert import inception
    from diffrestorer_jax.data.image_io import read_image
    from diffrestorer_jax.metrics import fid
    from fid_reference import random_reference
    _, weights = random_reference(str(tmp_path))
    load, build, seen = inception.load_fid_inception, fid.inception_features, []

    def recording(*args, **kwargs):  # the command's features function, recording (input, output)
        features = build(*args, **kwargs)
        return lambda x: seen.append((np.asarray(x), features(x))) or seen[-1][1]
    monkeypatch.setattr(inception, "load_fid_inception", lambda path: load(path, image_size=75))
    monkeypatch.setattr(fid, "inception_features", recording)
    out = tmp_path / "eval"
    assert evaluate_cli.main(["--checkpoint", ckpt, "--data", str(paired), "--out", str(out), "--steps", "2",
                              "--seed", "1", "--save-images", "--no-progress", "--fid-inception", weights]) == 0
    capsys.readouterr()
    metrics = json.loads((out / "metrics.json").read_text())
    result = metrics["fid"]
    assert result["computed"] and result["images"] == {"low_light": 2, "noise": 2}
    assert len(seen) == 8  # one call per image: restored, then GT, for each pair

    def features_of(image):
        match = [f for x, f in seen if x.shape == (1,) + image.shape and np.array_equal(x[0], image)]
        assert match, "no features were computed for this image"
        return match[0]
    sets = {}
    for t, folder in (("noise", "noisy"), ("low_light", "low-light")):
        restored = np.concatenate([features_of(read_image(out / "images" / folder / "LQ" / f"{i}.png")) for i in range(2)])
        gt = np.concatenate([features_of(read_image(paired / folder / "GT" / f"{i}.png")) for i in range(2)])
        sets[t] = restored, gt
        assert result["per_type"][t] == pytest.approx(fid.fid_from_features(restored, gt), rel=1e-6, abs=1e-9)
    every = [np.concatenate([sets[t][k] for t in sets]) for k in (0, 1)]
    assert result["all_images"] == pytest.approx(fid.fid_from_features(*every), rel=1e-6)
    assert metrics["protocol"]["metric_conventions"]["fid"].endswith(weights)
    assert "FID (restored vs GT): low_light" in (out / "metrics.md").read_text()


def test_a_failed_batch_is_named_and_the_rest_is_reported(ckpt, paired, tmp_path, capsys, monkeypatch):
    """A batch that fails (out of device memory on the largest size, say) costs its own pairs only:
    they are named, metrics.json reports the others, and the exit status is 1."""
    from diffrestorer_jax.infer.restorer import Restorer
    data = tmp_path / "data"
    shutil.copytree(paired, data)
    big = np.asarray(Image.fromarray(np.zeros((8, 8, 3), np.uint8)).resize((48, 48)))
    for sub in ("LQ", "GT"):
        Image.fromarray(big).save(data / "noisy" / sub / "big.png")
    real = Restorer.restore_batch

    def out_of_memory_when_large(self, batch, ids):
        if batch.shape[1] > 40:
            raise RuntimeError("RESOURCE_EXHAUSTED: out of memory while trying to allocate (a stand-in)")
        return real(self, batch, ids)

    monkeypatch.setattr(Restorer, "restore_batch", out_of_memory_when_large)
    out = tmp_path / "eval"
    rc = evaluate_cli.main(["--checkpoint", ckpt, "--data", str(data), "--out", str(out), "--steps", "2",
                            "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1 and "noisy/LQ/big.png" in err and "RESOURCE_EXHAUSTED" in err, err
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["per_image"]) == 4 and "big.png" not in str(metrics["per_image"])
    assert [f["file"] for f in metrics["failed"]] == ["noisy/LQ/big.png"]


def test_names_twice_in_the_data_are_refused_before_restoring(tmp_path):
    """Pairs of one name (a paired set built from several roots by an older version) would share
    their report row, saved image and image id: refused, naming one, before any work."""
    def load():
        raise AssertionError("nothing is read")
    entries = [("noisy/LQ/0.png", "noise", load), ("noisy/LQ/0.png", "noise", load)]
    with pytest.raises(ev.EvaluateError, match=r"occur more than once.*'noisy/LQ/0.png'.*rebuild it"):
        ev.evaluate(None, entries)


def test_values_left_out_of_the_means_are_counted_and_said(ckpt, paired, tmp_path, capsys):
    """An LQ equal to its GT has an infinite input PSNR, which no mean can hold: the means leave it
    out, and the report says how many were left out instead of averaging fewer images silently."""
    data = tmp_path / "data"
    shutil.copytree(paired, data)
    shutil.copy(data / "noisy" / "GT" / "1.png", data / "noisy" / "LQ" / "1.png")
    out = tmp_path / "eval"
    rc = evaluate_cli.main(["--checkpoint", ckpt, "--data", str(data), "--out", str(out), "--steps", "2",
                            "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["left_out_of_means"] == {"psnr": {"restored": 0, "input": 1},
                                            "psnr_y": {"restored": 0, "input": 1}}
    finite = [r["input"]["psnr"] for r in metrics["per_image"] if r["type"] == "noise" and np.isfinite(r["input"]["psnr"])]
    assert metrics["input"]["per_type"]["noise"]["psnr"] == pytest.approx(np.mean(finite))
    assert "not in the means" in err
    assert "Left out of the means: PSNR of 0 restored and 1 input image(s)" in (out / "metrics.md").read_text()
