"""Write the demo's training photos (never the held-out or validation ones) as PNGs for
`config.data.kind=hq_folder`: `python -m diffrestorer_jax.cli.demo_photos DIR` (launch/demo_train.sh)."""
import argparse
import sys


def main(argv=None) -> int:
    from diffrestorer_jax.data.demo_photos import write_training_folder
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--size", type=int, default=192)
    parser.add_argument("--tiles", type=int, default=2)
    args = parser.parse_args(argv)
    print(f"wrote {write_training_folder(args.out_dir, args.size, args.tiles)} training photos to {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
