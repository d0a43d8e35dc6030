"""Data throughput on this machine: host pipeline samples/s at 512^2, and degradations images/s.

  python benchmarks/data_throughput.py [--batches 8] [--degrade-batch 8] [--threads 2]

Host: the grain pipeline over (a) an in-memory source of scikit-image photos and (b) a TFDS
`hq_folder` built from the same photos enlarged to 1024x768 PNGs (so PNG decoding, the real cost,
is included). Device: the jitted `degrade` on a random-type batch (compile time reported apart).
Prints a Markdown table with the machine (CPU model, cores, jax backend).
"""
import argparse
import os
import platform
import sys
import tempfile
import time

import jax  # noqa: E402
import numpy as np  # noqa: E402

from diffrestorer_jax.data import degradations, pipeline  # noqa: E402
from diffrestorer_jax.data.gallery import sample_photos  # noqa: E402
from diffrestorer_jax.data.image_io import square, write_png  # noqa: E402
from diffrestorer_jax.data.tfds.build import build_dataset, load_source  # noqa: E402


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def photos(n: int, h: int, w: int) -> list:
    """n natural photos at h x w (the four skimage photos, enlarged and cycled, flipped per pass)."""
    base = sample_photos(max(h, w))
    out = []
    for i in range(n):
        img = base[i % len(base)][:h, :w]
        out.append(img[:, ::-1] if (i // len(base)) % 2 else img)
    return out


def time_pipeline(source, batches: int, threads: int, batch_size: int = 16) -> float:
    cfg = pipeline.default_pipeline_config()
    cfg.global_batch_size, cfg.num_threads, cfg.prefetch_buffer = batch_size, threads, 2 * batch_size
    it = pipeline.make_pipeline(source, cfg, process_index=0, process_count=1)
    next(it)  # start-up (threads, first reads)
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * batch_size / (time.perf_counter() - start)


def time_degrade(batch: int, size: int, iters: int = 3):
    images = np.stack([square(p, size) for p in photos(batch, size, size)])
    fn = degradations.make_degrade_fn()
    ids = np.full((batch,), degradations.RANDOM, np.int32)
    start = time.perf_counter()
    jax.block_until_ready(fn(jax.random.key(0), images, ids))
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    for i in range(iters):
        jax.block_until_ready(fn(jax.random.key(i + 1), images, ids))
    return batch * iters / (time.perf_counter() - start), compile_s


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--degrade-batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=512)
    args = parser.parse_args(argv)
    rows = []
    memory = pipeline.InMemorySource(photos(64, 768, 1024))
    rows.append(("host pipeline, in-memory source, 512^2 crops", f"{time_pipeline(memory, args.batches, args.threads):.1f} samples/s"))
    with tempfile.TemporaryDirectory() as tmp:
        for i, img in enumerate(photos(32, 768, 1024)):
            write_png(os.path.join(tmp, "src", f"{i:03d}.png"), img)
        build_dataset("hq_folder", [os.path.join(tmp, "src")], os.path.join(tmp, "data"))
        source = load_source(os.path.join(tmp, "data"), "hq_folder")
        rows.append(("host pipeline, TFDS hq_folder (PNG decode), 512^2 crops",
                     f"{time_pipeline(source, args.batches, args.threads):.1f} samples/s"))
    ips, compile_s = time_degrade(args.degrade_batch, args.size)
    rows.append((f"degrade (random types, batch {args.degrade_batch}, {args.size}^2, jit)",
                 f"{ips:.2f} images/s (compile {compile_s:.0f} s)"))
    print(f"\nMachine: {cpu_model()}, {os.cpu_count()} cores, jax {jax.__version__} on {jax.default_backend()}, "
          f"load average {os.getloadavg()[0]:.1f}\n")
    print("| measurement | result |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
