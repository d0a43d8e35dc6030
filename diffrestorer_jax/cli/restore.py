"""diffrestorer-restore: restore images with an exported Diff-Restorer.

    diffrestorer-restore --checkpoint EXPORT_DIR --input FILE|DIR|'GLOB' --output DIR [options]
                         [--config.sampler.eta=0.5 ...]

One PNG per input (same relative path and name, extension .png, same size as the input) and a JSON
sidecar next to it with every setting, the seed, the image id and the predicted degradation-type
probabilities. An existing output is skipped when its sidecar shows the same settings and checkpoint
(--overwrite redoes it anyway). A file that cannot be read, or a batch that fails, is named on
stderr with the reason and the rest goes on; the exit status is then 1 (2 for a bad command line,
checkpoint, input or output folder). An output does not depend on the batch size, the device count or the other
files (diffrestorer_jax/infer/restorer.py). On several hosts, run the same command on every host.
"""
import argparse
import os
import sys
import time

from diffrestorer_jax.cli import restore_options, startup


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="diffrestorer-restore", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="export directory (config.json + params/)")
    p.add_argument("--input", required=True, help="an image, a folder (recursive) or a quoted glob")
    p.add_argument("--output", required=True, help="output folder")
    p.add_argument("--overwrite", action="store_true", help="redo existing outputs")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--max-pixels", type=int, default=restore_options.DEFAULT_MAX_PIXELS,
                   help="refuse an input file with more pixels than this (read from its header, before "
                        f"decoding; the file is named as failed and the rest go on; default "
                        f"{restore_options.DEFAULT_MAX_PIXELS} = 8192^2)")
    restore_options.add_options(p)
    return p


def main(argv=None) -> int:
    start = time.perf_counter()
    args, rest = build_parser().parse_known_args(argv)
    startup.prepare_process(restore=True)
    startup.quiet_console()
    from diffrestorer_jax.parallel.mesh import maybe_initialize_distributed
    maybe_initialize_distributed()
    from diffrestorer_jax.infer import files
    from diffrestorer_jax.infer.restorer import Restorer, RestoreError
    try:
        cache = restore_options.enable_compile_cache(args)
        overrides = restore_options.parse_overrides(rest)
        options = restore_options.options_from_args(args)
        inputs = files.find_inputs(args.input)
        files.check_output_folder(inputs, args.output)  # before the (slow) model load
        restorer = Restorer.from_export(args.checkpoint, options, overrides)
        print(f"restoring with {restorer.placement_note()}", file=sys.stderr, flush=True)
        summary = files.restore_files(
            restorer, inputs, args.output, overwrite=args.overwrite, progress=not args.no_progress,
            extra={"command": ["diffrestorer-restore"] + list(sys.argv[1:] if argv is None else argv),
                   "config_overrides": overrides})
    except RestoreError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{len(summary.written)} restored, {len(summary.skipped)} already there, "
          f"{len(summary.failed)} failed -> {os.path.abspath(args.output)}", file=sys.stderr)
    print(restore_options.timing_line(restorer, start, cache), file=sys.stderr)
    for path, reason in summary.failed:
        print(f"failed: {path}: {reason}", file=sys.stderr)
    return 1 if summary.failed else 0


if __name__ == "__main__":
    sys.exit(main())
