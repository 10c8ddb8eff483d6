"""``python -m fused_xent bench ...``: the side-by-side benchmark (see ``fused_xent.bench``)."""

import sys

USAGE = "usage: python -m fused_xent bench [case ...] [--only METHOD ...] [--sweep SWEEP ...] [--out DIR]"


def main() -> None:
    if len(sys.argv) >= 2 and sys.argv[1] in ("-h", "--help"):
        print(USAGE + "\n\n'python -m fused_xent bench --help' describes the benchmark's options")
        return
    if len(sys.argv) < 2 or sys.argv[1] != "bench":
        unknown = f"unknown command {sys.argv[1]!r}\n" if len(sys.argv) >= 2 else ""
        print(unknown + USAGE, file=sys.stderr)
        sys.exit(2)
    from fused_xent.bench import main as bench

    bench(sys.argv[2:])


if __name__ == "__main__":
    main()
