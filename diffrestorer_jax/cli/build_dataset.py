"""diffrestorer-build-dataset: build a TFDS dataset without TensorFlow.

  diffrestorer-build-dataset --kind hq_folder --src DIR [DIR ...] --out DATA_DIR [--split train]
  diffrestorer-build-dataset --kind paired    --src ROOT [ROOT ...] --out DATA_DIR --split test

hq_folder: clean images (any folders, recursive, links to folders followed). paired: the DA-CLIP
layout ROOT/<type>/LQ/*, ROOT/<type>/GT/*; from several roots, records are named
<type>/LQ/<root folder name>/<file>. Skipped inputs are listed in DATA_DIR/<kind>_<split>_report.txt.
Splits are built one command each and live side by side in DATA_DIR; a split that is already there
is refused (exit 2) unless --overwrite is given, which rebuilds that split only. What a killed build
left (DATA_DIR/.building-*) is removed by the next one.
"""
import argparse
import sys

from diffrestorer_jax.cli import startup


def main(argv=None) -> int:
    from diffrestorer_jax.data.tfds.build import BUILDERS, build_dataset
    parser = argparse.ArgumentParser(prog="diffrestorer-build-dataset", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", required=True, choices=sorted(BUILDERS))
    parser.add_argument("--src", required=True, nargs="+", help="source folder(s)")
    parser.add_argument("--out", required=True, help="TFDS data_dir to write into")
    parser.add_argument("--split", default="train")
    parser.add_argument("--overwrite", action="store_true", help="rebuild the split if DATA_DIR already holds it")
    args = parser.parse_args(argv)
    startup.quiet_console()
    try:
        count, report = build_dataset(args.kind, args.src, args.out, args.split, overwrite=args.overwrite)
    except (ValueError, OSError) as e:  # bad arguments, a split already built, an unwritable --out
        print(f"error: {e}", file=sys.stderr)
        return 2
    with open(report) as f:
        skipped = sum(1 for line in f if not line.startswith("#"))
    print(f"{args.kind}/{args.split}: {count} records in {args.out}; {skipped} skipped (see {report})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
