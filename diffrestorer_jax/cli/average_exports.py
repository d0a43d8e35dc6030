"""diffrestorer-average-exports: a weighted average of two exports' parameters (a "model soup").

    diffrestorer-average-exports workdir_demo/stage2/export workdir_demo/stage2_whole/export \\
        --weight 0.5 --out workdir_demo/soup

Writes (1 - weight) * A + weight * B with A's config; networks equal in both are copied unchanged.
Refused (exit 1, nothing written): exports of other models or diffusion processes, and an --out that
is A or B or an existing folder that is not an export; an export at --out is replaced atomically.
The demo recipe averages its decoder with the same decoder fine-tuned on whole photos (demo/README.md).
"""
import argparse
import sys

from diffrestorer_jax.cli import startup


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="diffrestorer-average-exports", description=__doc__.splitlines()[0])
    parser.add_argument("a", help="export directory (its config is kept)")
    parser.add_argument("b", help="export directory")
    parser.add_argument("--weight", type=float, default=0.5, help="weight of B (default 0.5)")
    parser.add_argument("--out", required=True, help="export directory to write")
    args = parser.parse_args(argv)
    startup.prepare_process()
    startup.quiet_console()
    from diffrestorer_jax.export import average_exports
    try:
        averaged = average_exports(args.a, args.b, args.weight, args.out)
    except (ValueError, FileNotFoundError) as e:
        print(f"cannot average: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.out}: {', '.join(averaged) or 'no network'} averaged "
          f"({1 - args.weight:g} x {args.a} + {args.weight:g} x {args.b}), the others copied")
    return 0


if __name__ == "__main__":
    sys.exit(main())
