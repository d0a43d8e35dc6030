"""Compare two exports network by network: is a re-trained checkpoint the same as the shipped one?

    python launch/compare_exports.py demo/checkpoint workdir_demo/stage2/export

Prints the largest absolute parameter difference of each network and whether the two are bit for
bit identical; exits 0 either way (1 only when they cannot be compared).
"""
import argparse
import sys

from diffrestorer_jax.train.export import compare_exports


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", help="export directory")
    parser.add_argument("b", help="export directory")
    args = parser.parse_args(argv)
    try:
        diffs = compare_exports(args.a, args.b)
    except (ValueError, FileNotFoundError) as e:
        print(f"cannot compare: {e}", file=sys.stderr)
        return 1
    for name, d in diffs.items():
        print(f"{name:8s} max |difference| {d:.3g}")
    same = all(d == 0.0 for d in diffs.values())
    print("identical parameters" if same else "parameters differ")
    return 0


if __name__ == "__main__":
    sys.exit(main())
