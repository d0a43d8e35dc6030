"""diffrestorer-app as a real process on loopback, serving the shipped demo checkpoint.

Requests and results (input size, sidecar, zip, the command line's output), concurrent requests
batched into fewer compiled calls than requests with no compile for a seen size, bad uploads named while the rest is served,
limits and refusals, localhost only, a restart that loads its programs from the compilation cache.
One warmed server for the module (1 sampling step, batches of up to 2, warmed at 64x64).
"""
import http.client
import io
import os
import socket
import subprocess
import sys
import threading
import zipfile

import numpy as np
import pytest
from PIL import Image

import procs
from app_helpers import DEMO_CHECKPOINT, ROOT, WARM_ARGS, AppServer, decode_png, multipart, png_bytes, random_image, start_warm
from diffrestorer_jax.infer.restorer import path_image_id

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
