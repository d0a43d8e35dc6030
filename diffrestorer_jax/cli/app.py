"""diffrestorer-app: restore images in the browser, with concurrent requests batched on the device.

    diffrestorer-app --checkpoint EXPORT_DIR [--port 7860] [--batch-size 4] [--steps 20 ...]
                     [--config.sampler.eta=0.5 ...]

Serves the page on http://127.0.0.1:PORT/ (this machine only, unless --host says otherwise),
compiles the programs for the checkpoint's native size at start (through JAX's persistent
compilation cache, so a second start mostly loads them), then restores what people upload. The
restore flags set the page's defaults; see diffrestorer_jax/app/ for how requests are batched.
"""
import argparse
import errno
import re
import signal
import sys
import threading

from diffrestorer_jax.cli import restore_options, startup


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="diffrestorer-app", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="export directory (config.json + params/)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 opens it to "
                        "the network, with no authentication)")
    p.add_argument("--port", type=int, default=7860, help="default 7860; 0 picks a free port")
    restore_options.add_options(p)
    p.set_defaults(batch_size=4)
    p.add_argument("--batch-wait-ms", type=float, default=20.0,
                   help="how long an idle server waits for concurrent uploads to fill a batch (default 20)")
    p.add_argument("--warm", default="native",
                   help="sizes compiled at start: 'native' (the checkpoint's training size), 'none', "
                        "or HxW[,HxW...]")
    p.add_argument("--no-idle-warm", action="store_true",
                   help="do not compile the other batch sizes of a new size while idle")
    p.add_argument("--max-upload-mb", type=float, default=32.0, help="largest request body (default 32)")
    p.add_argument("--max-pixels", type=int, default=2048 * 2048,
                   help="largest image accepted, in pixels (default 2048x2048)")
    p.add_argument("--max-images", type=int, default=16, help="images per request (default 16)")
    p.add_argument("--max-queue", type=int, default=128, help="images waiting before uploads are refused")
    p.add_argument("--keep-jobs", type=int, default=100, help="finished jobs kept for viewing and download")
    p.add_argument("--keep-mb", type=float, default=512.0,
                   help="memory for finished jobs' results (default 512; the last to finish is always kept)")
    return p


class UsageError(Exception):
    pass


def parse_sizes(text: str, native: int):
    """--warm: 'none', 'native' or HxW[,HxW...] -> [(h, w), ...]."""
    if text == "none":
        return []
    if text == "native":
        return [(native, native)]
    sizes = []
    for item in text.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", item)
        if not m or min(int(m.group(1)), int(m.group(2))) < 1:
            raise UsageError(f"--warm: {item!r} is not HEIGHTxWIDTH (e.g. 512x512), 'native' or 'none'")
        sizes.append((int(m.group(1)), int(m.group(2))))
    return sizes


def check_args(args) -> None:
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be in 0..65535, got {args.port}")
    for name in ("max_upload_mb", "max_pixels", "max_images", "max_queue", "keep_jobs", "keep_mb", "batch_size"):
        if getattr(args, name) <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.batch_wait_ms < 0:
        raise UsageError(f"--batch-wait-ms must be >= 0, got {args.batch_wait_ms}")


def main(argv=None) -> int:
    args, rest = build_parser().parse_known_args(argv)
    startup.prepare_process(restore=True)
    startup.quiet_console()
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    from diffrestorer_jax.app import server, service
    from diffrestorer_jax.infer.restorer import Restorer, RestoreError
    httpd = None
    try:
        check_args(args)
        overrides = restore_options.parse_overrides(rest)
        sizes = parse_sizes(args.warm, 0) if args.warm != "native" else None
        try:
            httpd = server.make_server(args.host, args.port)
        except OSError as e:
            raise UsageError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}"
                             + (" (another server is there; choose another --port)"
                                if getattr(e, "errno", None) == errno.EADDRINUSE else "")) from None
        cache = restore_options.enable_compile_cache(args)
        restorer = Restorer.from_export(args.checkpoint, restore_options.options_from_args(args), overrides)
        platform = restorer.mesh.devices.flat[0].platform
        native = int(restorer.config.get("image_size", 512))
        config = service.AppConfig(
            batch_size=args.batch_size, batch_wait_ms=args.batch_wait_ms,
            max_upload_bytes=int(args.max_upload_mb * 2 ** 20), max_pixels=args.max_pixels,
            max_images=args.max_images, max_pending=args.max_queue, keep_jobs=args.keep_jobs,
            keep_bytes=int(args.keep_mb * 2 ** 20), warm_sizes=[(native, native)] if sizes is None else sizes,
            idle_warm=not args.no_idle_warm)
        app = service.App(restorer, config, log=log)
        server.attach(httpd, app)
    except (RestoreError, UsageError) as e:
        log(f"error: {e}")
        if httpd is not None:
            httpd.server_close()
        return 2
    host, port = httpd.server_address[:2]
    shown = f"[{host}]" if ":" in host else host
    if not server.is_loopback(host):
        log(f"warning: listening on {host}: anyone who can reach this machine can use the app (no authentication)")
    log(f"checkpoint {restorer.source}; {platform} x{restorer.num_devices}; batches up to "
        f"{app.batcher.sizes[-1]} ({app.batch_mode}); compilation cache: {cache or 'off'}")
    print(f"serving on http://{shown}:{port}/", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    app.start()
    server.serve_in_thread(httpd)
    stop.wait()
    log("shutting down")
    httpd.shutdown()
    app.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
