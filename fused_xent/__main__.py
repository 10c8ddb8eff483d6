"""``python -m fused_xent bench ...``: the side-by-side benchmark (see ``fused_xent.bench``)."""

import sys


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] != "bench":
        print("usage: python -m fused_xent bench [case ...] [--only METHOD ...] [--out DIR]")
        sys.exit(2)
    from fused_xent.bench import main as bench

    bench(sys.argv[2:])


if __name__ == "__main__":
    main()
