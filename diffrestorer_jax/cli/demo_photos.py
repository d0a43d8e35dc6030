"""Write the demo's training images as PNGs for `config.data.kind=hq_folder` (launch/demo_train.sh):

    python -m diffrestorer_jax.cli.demo_photos DIR                    # the training photos
    python -m diffrestorer_jax.cli.demo_photos DIR --dead-leaves 600  # procedural images instead

The photos are the ten of data/demo_photos.TRAIN (never the held-out or validation ones), whole and
as close-ups; the dead-leaves images (data/dead_leaves.py) take their colours from those photos."""
import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--size", type=int, default=192)
    parser.add_argument("--tiles", type=int, default=2, help="photos: close-ups per side")
    parser.add_argument("--dead-leaves", type=int, default=0, metavar="N",
                        help="write N dead-leaves images (keyed by --seed and index) instead of the photos")
    parser.add_argument("--seed", type=int, default=0, help="dead leaves: which images")
    args = parser.parse_args(argv)
    if args.dead_leaves:
        from diffrestorer_jax.data.dead_leaves import write_folder
        n = write_folder(args.out_dir, args.dead_leaves, args.size, args.seed)
        print(f"wrote {n} dead-leaves images to {args.out_dir}")
        return 0
    from diffrestorer_jax.data.demo_photos import write_training_folder
    print(f"wrote {write_training_folder(args.out_dir, args.size, args.tiles)} training photos to {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
