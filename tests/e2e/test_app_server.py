"""diffrestorer-app as a real process on loopback, serving the shipped demo checkpoint.

Requests and results (input size, sidecar, zip, the command line's output), concurrent requests
batched into fewer compiled calls than requests with no compile for a seen size, bad uploads named while the rest is served,
limits and refusals, localhost only, a restart that loads its programs from the compilation cache.
One warmed server for the module (1 sampling step, batches of up to 2, warmed at 64x64).
At the end, in this process: the batching worker (with a stand-in restorer) when a compile fails or
it stops, the job store's trimming, and queued images held compactly (with the demo checkpoint).
"""
import collections
import http.client
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
import zipfile

import numpy as np
import pytest
from PIL import Image

import procs
from app_helpers import DEMO_CHECKPOINT, ROOT, WARM_ARGS, AppServer, decode_png, multipart, png_bytes, random_image, start_warm
from diffrestorer_jax.app import jobs, service
from diffrestorer_jax.app.batching import Batcher, QueueFull, Work
from diffrestorer_jax.data.image_io import decode_image, encode_png
from diffrestorer_jax.infer.restorer import Options, Restorer, path_image_id

ARGS = ["--batch-wait-ms", "300", "--max-pixels", "40000", "--max-upload-mb", "1", "--max-images", "6"]


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    server = start_warm(ARGS, tmp_path_factory)
    yield server
    assert server.stop() == 0, "".join(server.stderr)


def batching(app):
    return app.get("/api/status").json()["batching"]


def restore_concurrently(app, requests, fields=None):
    """Each element of requests is one POST's files; all are sent at once from their own threads."""
    barrier = threading.Barrier(len(requests))
    out = [None] * len(requests)

    def client(k):
        barrier.wait()
        try:
            out[k] = app.restore(requests[k], fields)
        except BaseException as e:  # noqa: BLE001  re-raised below, in the test's thread
            out[k] = e
    threads = [threading.Thread(target=client, args=(k,)) for k in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for result in out:
        if isinstance(result, BaseException):
            raise result
    return out


def test_page_and_status(app):
    page = app.get("/")
    assert page.status == 200 and page.headers["Content-Type"].startswith("text/html")
    assert b'id="restore"' in page.body and b"/static/app.js" in page.body
    assert app.get("/static/app.js").status == 200
    s = app.get("/api/status").json()
    assert s["ready"] and s["model"]["image_size"] == 64 and s["model"]["platform"] == "cpu"
    assert s["defaults"]["steps"] == 1 and s["batching"]["batch_sizes"] == [1, 2]
    assert s["batching"]["programs"] == {"64x64 ddim 1 steps": [1, 2]}
    assert s["limits"]["max_images"] == 6 and s["limits"]["max_upload_bytes"] == 1 << 20
    # tiles around the training size (16 latent pixels) and the checkpoint's own (sampler.tile = 64)
    assert s["choices"]["tile"] == [4, 8, 16, 32, 64] and s["defaults"]["tile"] == "auto"


def test_restore_keeps_size_and_writes_sidecar(app):
    before = batching(app)
    image = random_image(61, 57, seed=1)
    snap = app.restore([("my photo.png", png_bytes(image))], {"seed": "7", "fidelity": "0.5"})
    (item,) = snap["images"]
    assert item["state"] == "done", item
    assert np.array_equal(decode_png(app.get(item["input_url"]).body), image)
    restored = decode_png(app.get(item["restored_url"]).body)
    assert restored.shape == (61, 57, 3)
    side = app.get(item["sidecar_url"]).json()
    assert side["input"] == "my photo.png" and side["size"] == [61, 57] and side["bucket"] == [64, 64]
    assert side["image_id"] == path_image_id("my photo.png")  # the CLI's id for a file of that name
    assert side["seed"] == 7 and side["knobs"]["fidelity_weight"] == 0.5 and side["settings"]["steps"] == 1
    assert abs(sum(side["type_probs"].values()) - 1) < 1e-4 and side["predicted_type"] in side["type_probs"]
    z = zipfile.ZipFile(io.BytesIO(app.get(snap["zip_url"]).body))
    assert sorted(z.namelist()) == ["01_my_photo_restored.json", "01_my_photo_restored.png"]
    assert z.read("01_my_photo_restored.png") == app.get(item["restored_url"]).body
    after = batching(app)
    assert after["compiles"] == before["compiles"], "a size in a warmed bucket compiled a program"


def test_concurrent_requests_share_compiled_calls(app):
    app.wait_idle()
    before = batching(app)
    images = [random_image(64, 64, seed=10 + k) for k in range(6)]
    snaps = restore_concurrently(app, [[(f"user{k}.png", png_bytes(images[k]))] for k in range(6)])
    items = [s["images"][0] for s in snaps]
    assert all(i["state"] == "done" for i in items), items
    calls = {i["call"]["call"] for i in items}
    after = batching(app)
    assert after["images"] - before["images"] == 6
    assert after["calls"] - before["calls"] == len(calls) < 6, "concurrent requests were not batched"
    assert any(i["call"]["rows"] == 2 for i in items)
    assert after["compiles"] == before["compiles"]
    restored = [decode_png(app.get(i["restored_url"]).body).astype(float) for i in items]
    for k, r in enumerate(restored):  # every user got their own image back
        errors = [np.mean((r - x.astype(float)) ** 2) for x in images]
        assert int(np.argmin(errors)) == k, errors
    # An image's result does not depend on the batch it ran in: alone it is identical, bit for bit.
    shared = next(k for k, i in enumerate(items) if i["call"]["rows"] == 2)
    alone = app.restore([(f"user{shared}.png", png_bytes(images[shared]))])["images"][0]
    assert alone["call"]["rows"] == 1
    assert app.get(alone["restored_url"]).body == app.get(items[shared]["restored_url"]).body


def test_same_output_as_the_command_line(app, tmp_path):
    """The app's result for a file equals diffrestorer-restore's for that file, settings and name, both
    --exact (the command loads the app's compiled program from the shared compilation cache, so it is
    quick)."""
    image = random_image(61, 58, seed=40)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "same.png").write_bytes(png_bytes(image))
    item = app.restore([("same.png", png_bytes(image))], {"seed": "5"})["images"][0]
    cache = app.cmd[app.cmd.index("--compile-cache") + 1]
    proc = subprocess.run([*procs.command("diffrestorer-restore"), "--checkpoint", str(DEMO_CHECKPOINT),
                           "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--steps", "1",
                           "--seed", "5", "--devices", "1", "--no-progress", "--exact", "--compile-cache", cache],
                          capture_output=True, text=True, timeout=600, cwd=str(ROOT), env=app.env)
    assert proc.returncode == 0, proc.stderr
    cli = decode_png((tmp_path / "out" / "same.png").read_bytes())
    assert np.array_equal(decode_png(app.get(item["restored_url"]).body), cli)


def _modes():
    rgb = random_image(60, 58, seed=3)
    gray16 = Image.fromarray(random_image(60, 58, seed=4)[..., 0].astype(np.uint16) * 257)
    assert gray16.mode.startswith("I;16")
    cmyk, palette = io.BytesIO(), io.BytesIO()
    Image.fromarray(rgb).convert("CMYK").save(cmyk, format="JPEG")
    Image.fromarray(rgb).convert("P").save(palette, format="PNG", transparency=0)
    g = io.BytesIO()
    gray16.save(g, format="PNG")
    return {"gray16.png": g.getvalue(), "cmyk.jpg": cmyk.getvalue(), "palette.png": palette.getvalue()}


def test_bad_uploads_are_named_and_the_rest_is_restored(app):
    good = png_bytes(random_image(62, 59, seed=5))
    bad = {"notes.png": b"this is text, not a picture",
           "truncated.png": good[: len(good) // 2],
           "empty.png": b"",
           "huge.png": png_bytes(np.zeros((256, 256, 3), np.uint8))}  # 65536 pixels > --max-pixels 40000
    files = [("good.png", good)] + list(bad.items()) + list(_modes().items())
    r = app.post_images(files[:5])
    assert r.status == 202
    named = {f["name"]: f["error"] for f in r.json()["files"]}
    assert set(named) == set(bad)
    assert "not an image" in named["notes.png"] and "truncated" in named["truncated.png"]
    assert "empty" in named["empty.png"] and "65536 pixels exceeds the limit of 40000" in named["huge.png"]
    snap = app.wait_job(r.json()["job"])
    assert snap["done"] == 1 and snap["failed"] == 4
    # Other modes (16-bit grey, CMYK JPEG, palette with transparency) are converted to RGB and restored.
    snap = app.restore(files[5:])
    assert [i["state"] for i in snap["images"]] == ["done"] * 3
    for i in snap["images"]:
        assert decode_png(app.get(i["restored_url"]).body).shape == (60, 58, 3)
    # Nothing usable: a clear 400 naming every file; and the server keeps serving.
    r = app.post_images(list(bad.items()))
    assert r.status == 400 and len(r.json()["files"]) == 4 and "no usable image" in r.json()["error"]
    assert app.restore([("after.png", good)])["images"][0]["state"] == "done"


def _post_raw(app, body, headers):
    return app.request("POST", "/api/restore", body, headers)


@pytest.mark.parametrize("fields, message", [
    ({"steps": "0"}, "steps must be between 1 and 1000"),
    ({"steps": "ten"}, "steps must be a whole number"),
    ({"sampler": "euler"}, "sampler must be one of ddim, ddpm, dpmpp_2m"),
    ({"tile": "3"}, "must be a multiple of 2"),
    ({"fidelity": "nan"}, "fidelity must be between 0 and 10"),
    ({"colour": "wavelet"}, "unknown setting(s) colour"),
])
def test_bad_settings_get_a_message(app, fields, message):
    r = app.post_images([("a.png", png_bytes(random_image(16, 16, seed=0)))], fields)
    assert r.status == 400 and message in r.json()["error"], r.body


def test_limits_and_refusals(app):
    small = png_bytes(random_image(16, 16, seed=0))
    r = app.post_images([("big.png", np.random.default_rng(0).bytes(1_500_000))])
    assert r.status == 413 and "at most 1.0 MiB" in r.json()["error"]
    r = app.post_images([(f"{k}.png", small) for k in range(7)])
    assert r.status == 413 and "7 images in one upload; at most 6" in r.json()["error"]
    r = _post_raw(app, b'{"image": 1}', {"Content-Type": "application/json"})
    assert r.status == 400 and "multipart/form-data" in r.json()["error"]
    r = app.post_images([], {"steps": "1"})
    assert r.status == 400 and "no image" in r.json()["error"]
    body, ctype = multipart([("a.png", small)])
    r = _post_raw(app, body[:-20], {"Content-Type": ctype})
    assert r.status == 400 and "incomplete" in r.json()["error"]
    r = app.get("/api/status", headers={"Host": "attacker.example:80"})  # DNS rebinding
    assert r.status == 403
    r = _post_raw(app, body, {"Content-Type": ctype, "Origin": "http://attacker.example"})  # cross-site
    assert r.status == 403
    assert app.get("/api/jobs/nosuchjob").status == 404
    assert app.get("/static/..%2Fserver.py").status == 404 and app.get("/nothing").status == 404
    assert app.request("PUT", "/api/restore", b"x").status == 405
    host, port = app.url.split("//")[1].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.putrequest("POST", "/api/restore")
    conn.putheader("Transfer-Encoding", "chunked")
    conn.putheader("Content-Type", ctype)
    conn.endheaders()
    conn.send(b"0\r\n\r\n")
    resp = conn.getresponse()
    assert resp.status == 411
    conn.close()
    assert app.get("/api/status").json()["ready"]


def _raw_request(app, head: str):
    """Send a request head as written (no body), end our side, and read the whole answer."""
    host, port = app.url.split("//")[1].split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(head.replace("\n", "\r\n").encode() + b"\r\n\r\n")
        s.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := s.recv(1 << 16):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


@pytest.mark.parametrize("length", ["-1", "12abc"])
def test_content_length_must_be_a_whole_number(app, length):
    status, reply = _raw_request(app, f"POST /api/restore HTTP/1.1\nHost: 127.0.0.1\n"
                                      f"Content-Type: multipart/form-data; boundary=x\nContent-Length: {length}")
    assert status == 400 and "Content-Length must be a whole number" in reply["error"], reply
    assert app.get("/api/status").json()["ready"]


def test_post_from_an_opaque_origin_is_refused(app):
    """`Origin: null` (a sandboxed frame, a page opened from a file) is another site's page."""
    body, ctype = multipart([("a.png", png_bytes(random_image(16, 16, seed=0)))])
    r = _post_raw(app, body, {"Content-Type": ctype, "Origin": "null"})
    assert r.status == 403, r.body


@pytest.mark.parametrize("seed", [str(2 ** 63), "-1", "9" * 40])
def test_sample_seed_out_of_range_gets_a_message(app, seed):
    r = app.get(f"/api/sample.png?photo=coffee&type=noise&strength=1&seed={seed}")
    assert r.status == 400 and "seed must be between 0 and 2147483647" in r.json()["error"], r.body


def _outside_address():
    """A non-loopback IPv4 address of this machine, or None (no packet is sent)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.connect(("10.254.254.254", 1))
        ip = s.getsockname()[0]
    except OSError:
        return None
    finally:
        s.close()
    return None if ip.startswith("127.") or ip == "0.0.0.0" else ip


def test_listens_on_localhost_only(app):
    host, port = app.url.split("//")[1].split(":")
    assert host == "127.0.0.1"
    ip = _outside_address()
    if ip is None:
        pytest.skip("this machine has no non-loopback IPv4 address to try")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((ip, int(port)), timeout=5).close()


def test_new_size_compiles_once_and_never_again(app):
    start = app.wait_idle()
    # Two images of an unseen size in one request: one compile (batch 2) for the call, then the
    # other batch size (1) is compiled while the server is idle.
    snap = app.restore([("n1.png", png_bytes(random_image(44, 40, seed=20))),
                        ("n2.png", png_bytes(random_image(43, 39, seed=21)))])
    assert [i["state"] for i in snap["images"]] == ["done", "done"]
    assert snap["images"][0]["call"]["compiling"] and snap["images"][0]["call"]["rows"] == 2
    idle = app.wait_idle()
    assert idle["compiles"] - start["compiles"] == 2
    assert idle["programs"]["48x40 ddim 1 steps"] == [1, 2]
    # Seen size, new seed and fidelity (traced, never compiled): no compile however they batch.
    snaps = restore_concurrently(app, [[(f"m{k}.png", png_bytes(random_image(41 + k, 38, seed=30 + k)))]
                                       for k in range(3)], {"seed": "3", "fidelity": "0.8"})
    assert all(s["images"][0]["state"] == "done" for s in snaps)
    single = app.restore([("m9.png", png_bytes(random_image(48, 40, seed=39)))])
    assert single["images"][0]["state"] == "done"
    assert app.wait_idle()["compiles"] == idle["compiles"]


def test_restart_loads_programs_from_the_compilation_cache(app):
    second = AppServer(WARM_ARGS + ARGS, app.cmd[app.cmd.index("--compile-cache") + 1]).start()
    try:
        s = second.wait_ready()
        assert s["batching"]["compiles"] == 2 and s["batching"]["cache_hits"] == 2
    finally:
        assert second.stop() == 0


def test_load_8_clients_x_4_images(app):
    """8 clients, each restoring 4 images one request after another, all at once: every image is
    restored exactly once, in fewer calls than requests, with no compile; twice, and the server's
    memory after the second round is where it was after the first."""
    def round_(tag):
        before = app.wait_idle()
        barrier = threading.Barrier(8)
        got = {}

        def client(c):
            barrier.wait()
            for k in range(4):
                name = f"{tag}-client{c}-{k}.png"
                snap = app.restore([(name, png_bytes(random_image(64, 60, seed=100 * c + k)))])
                got[name] = snap["images"]
        threads = [threading.Thread(target=client, args=(c,)) for c in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        after = app.wait_idle()
        assert len(got) == 32 and all(len(v) == 1 and v[0]["state"] == "done" and v[0]["name"] == n
                                      for n, v in got.items()), got
        assert after["images"] - before["images"] == 32  # each restored once, none twice
        assert after["calls"] - before["calls"] < 32
        assert after["compiles"] == before["compiles"] and after["failed"] == before["failed"]
        return app.rss(), after["calls"] - before["calls"]

    rss1, calls1 = round_("first")
    rss2, calls2 = round_("second")
    print(f"load: calls per round {calls1}, {calls2}; server RSS {rss1 / 2**20:.0f} -> {rss2 / 2**20:.0f} MiB")
    assert rss2 - rss1 < 24 * 2 ** 20, (rss1, rss2)


@pytest.mark.parametrize("args, message", [
    (["--warm", "64by64"], "error: --warm: '64by64' is not HEIGHTxWIDTH"),
    (["--max-upload-mb", "0"], "error: --max-upload-mb must be positive"),
])
def test_bad_flags_get_one_line(args, message, capsys):
    from diffrestorer_jax.cli.app import main
    assert main(["--checkpoint", str(DEMO_CHECKPOINT), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("args, message", [
    (["--checkpoint", "/nonexistent/export"], "error: --checkpoint /nonexistent/export"),
    (["--port", "TAKEN"], "(another server is there; choose another --port)"),
])
def test_command_line_mistakes_get_one_line(args, message):
    """As a user runs it: one line and exit status 2, no traceback, before the model is loaded."""
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    args = [str(taken.getsockname()[1]) if a == "TAKEN" else a for a in args]
    if "--checkpoint" not in args:
        args = ["--checkpoint", str(DEMO_CHECKPOINT)] + args
    try:
        proc = subprocess.run([sys.executable, "-m", "diffrestorer_jax.cli.app", "--compile-cache", "none", *args],
                              capture_output=True, text=True, timeout=120, cwd=str(ROOT),
                              env=dict(os.environ, PYTHONPATH=str(ROOT)))
    finally:
        taken.close()
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stdout == ""


# ---------------------------------------------------------------------- in this process
Settings = collections.namedtuple("Settings", "sampler steps tile samples")


class StandInRestorer:
    """The restorer interface the batcher uses, without a model: an image comes back as its own
    restoration, and a batch larger than `fits` fails as running out of device memory would."""
    num_devices = 1

    def __init__(self, batch_size=1, fits=1):
        self.batch_size, self.fits = batch_size, fits

    def bucket(self, height, width):
        return height, width

    def settings_for(self, bucket):
        return Settings("ddim", 1, 0, 1)

    def restore_batch(self, batch, ids):
        if len(batch) > self.fits:
            raise RuntimeError(f"RESOURCE_EXHAUSTED: out of memory for a batch of {len(batch)}")
        return batch, np.zeros((len(batch), 5)), np.zeros(len(batch), bool)

    def restore_stream(self, items):
        if self.batch_size > self.fits:
            raise RuntimeError(f"RESOURCE_EXHAUSTED: out of memory for a batch of {self.batch_size}")
        for tag, image, image_id in items:
            self.restore_batch(image[None], np.array([image_id]))
            yield tag, image, {}


class StandInPool:
    base = StandInRestorer()

    def get(self, options, batch_size=1):
        return StandInRestorer(batch_size)


def _work(size=64):
    """(a Work of a size x size image, its outcome: done.wait() then outcome['error'])."""
    outcome = {"done": threading.Event()}

    def done(restored, info, error):
        outcome.update(error=error)
        outcome["done"].set()
    return Work(image=np.zeros((size, size, 3), np.uint8), image_id=0, options=Options(), done=done), outcome


def _until(condition, timeout=10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@pytest.mark.parametrize("warm_at_start", [True, False])
def test_a_failed_compile_skips_that_batch_size(warm_at_start):
    """Batch sizes 2 and 4 fail to compile (at start-up or while idle): logged, and the server goes on
    restoring with batch 1."""
    logs = []
    batcher = Batcher(StandInPool(), max_batch=4, wait_s=0.01, idle_s=0.05, log=logs.append)
    batcher.start(warm=[(Options(), (64, 64))] if warm_at_start else [])
    try:
        for n in (1, 3):  # the 3 after the idle compiles of batches 2 and 4 failed
            works = [_work() for _ in range(n)]
            batcher.submit([w for w, _ in works])
            assert all(o["done"].wait(10) and o["error"] is None for _, o in works), logs
            assert _until(lambda: batcher.snapshot()["pending_warm"] == 0 and not batcher.snapshot()["status"])
        assert batcher.state == "ready" and batcher.snapshot()["programs"] == {"64x64 ddim 1 steps": [1]}
        assert sum("batch 4 failed, so that batch size is not used" in line for line in logs) == 1, logs
    finally:
        batcher.stop()


def test_a_stopped_worker_refuses_new_images():
    """However the worker ends, what it held is answered and later uploads are refused (a 503)."""
    batcher = Batcher(StandInPool(), max_batch=1, wait_s=0.01, log=lambda line: None)
    batcher.start()
    broken, outcome = _work()
    broken.started = lambda call: 1 / 0  # a bug on the worker thread
    batcher.submit([broken])
    assert outcome["done"].wait(10) and "worker stopped" in outcome["error"]
    with pytest.raises(QueueFull, match="restore worker has stopped"):
        batcher.submit([_work()[0]])
    batcher.stop()


def test_finished_results_are_kept_while_other_jobs_wait():
    """--keep-jobs / --keep-mb count finished jobs only; the job that finished last is always kept."""
    store = jobs.JobStore(max_jobs=2, max_bytes=1000)

    def job(nbytes):
        entry = jobs.Entry("a.png", size=(8, 8))
        entry.input_png = b"x" * nbytes
        j = jobs.Job([entry], {})
        store.add(j)
        return j

    def finish(j):
        j.update(0, state=jobs.DONE, restored_png=b"y" * 100, sidecar={})
        store.trim()  # as App does when a job finishes

    waiting = [job(600) for _ in range(3)]  # over both limits, none finished
    first, second = job(300), job(300)
    finish(second)
    assert store.get(second.id), "a result was dropped the moment it finished"
    finish(first)
    assert store.get(first.id) and store.get(second.id)
    big = job(2000)
    finish(big)  # alone over the budget: kept; the ones that finished before it are dropped
    assert store.get(big.id) and not store.get(first.id) and not store.get(second.id)
    assert all(store.get(j.id) for j in waiting)


def test_queued_images_wait_as_integers_and_restore_as_before():
    """An 8-bit upload waits as uint8, a 16-bit one as uint16 (an alpha one, composited on white, as
    the decoder's float32); each restored output equals the restorer's for the decoded image."""
    restorer = Restorer.from_export(str(DEMO_CHECKPOINT), Options(num_devices=1, steps=1))
    app = service.App(restorer, service.AppConfig(batch_size=1), log=lambda line: None)
    rgb = random_image(60, 58, seed=3)
    gray16, alpha = io.BytesIO(), io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 65536, (60, 58), np.uint16)).save(gray16, format="PNG")
    Image.fromarray(np.dstack([rgb, np.full((60, 58), 128, np.uint8)])).save(alpha, format="PNG")
    files = [("rgb.png", png_bytes(rgb)), ("gray16.png", gray16.getvalue()), ("alpha.png", alpha.getvalue())]
    status, reply = app.submit(*multipart(files))
    assert status == 202
    assert [w.image.dtype for w in app.batcher._pending] == [np.uint8, np.uint16, np.float32]
    job = app.jobs.get(reply["job"])
    app.start()
    try:
        assert _until(lambda: job.finished, timeout=300)
    finally:
        app.stop()
    before = app.pool.get(app.defaults).restore_stream((n, decode_image(d, n), path_image_id(n)) for n, d in files)
    for (name, restored, _), entry in zip(before, job.entries):
        assert entry.state == jobs.DONE and entry.restored_png == encode_png(restored), name
