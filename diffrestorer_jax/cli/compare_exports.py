"""diffrestorer-compare-exports: is a re-trained checkpoint the same as the shipped one?

    diffrestorer-compare-exports demo/checkpoint workdir_demo/stage2/export

Prints the largest absolute parameter difference of each network and whether the two are bit for
bit identical; a network shaped differently in the two (another config, e.g. a larger decoder) is
named and left out, so an early stage's export can be checked against the finished checkpoint.
Exits 0 either way (1 only when no network can be compared).
"""
import argparse
import sys

from diffrestorer_jax.cli import startup


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="diffrestorer-compare-exports", description=__doc__.splitlines()[0])
    parser.add_argument("a", help="export directory")
    parser.add_argument("b", help="export directory")
    args = parser.parse_args(argv)
    startup.prepare_process()
    startup.quiet_console()
    from diffrestorer_jax.export import compare_exports
    try:
        diffs = compare_exports(args.a, args.b)
    except (ValueError, FileNotFoundError) as e:
        print(f"cannot compare: {e}", file=sys.stderr)
        return 1
    for name, d in diffs.items():
        print(f"{name:8s} " + ("shaped differently (other configs): not compared" if d is None
                               else f"max |difference| {d:.3g}"))
    compared = [d for d in diffs.values() if d is not None]
    same = all(d == 0.0 for d in compared)
    some = f"the {len(compared)} networks compared: " if len(compared) < len(diffs) else ""
    print(some + ("identical parameters" if same else "parameters differ"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
