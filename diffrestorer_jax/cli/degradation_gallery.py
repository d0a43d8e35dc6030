"""diffrestorer-degradation-gallery: a PNG grid of every degradation type (columns) on a few photos.

  diffrestorer-degradation-gallery --out gallery.png [--images a.jpg b.png] [--size 256]

Without --images it uses photos bundled with scikit-image. Columns: clean, the eight types in
DEGRADATION_TYPES order, then a mixed composition.
"""
import argparse
import sys

from diffrestorer_jax.cli import startup


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="diffrestorer-degradation-gallery", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="gallery.png", help="PNG file to write")
    parser.add_argument("--images", nargs="*", default=None, help="image files (default: skimage photos)")
    parser.add_argument("--size", type=int, default=256, help="side of each (square, centre-cropped) tile")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--preset", default="default", help="'default' or 'paper_protocol'")
    args = parser.parse_args(argv)
    startup.prepare_process()
    startup.quiet_console()
    from diffrestorer_jax.data import gallery
    from diffrestorer_jax.data.image_io import write_png
    grid = gallery.make_gallery(args.images, args.size, args.seed, args.preset)
    write_png(args.out, grid)
    print(f"wrote {args.out} ({grid.shape[1]}x{grid.shape[0]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
