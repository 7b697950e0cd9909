"""`make demo`: the whole mission end to end. Not built yet: this placeholder says so and fails."""

import sys

MISSING = [
    "synthetic world generation, teacher/student training and distillation",
    "ONNX export and the live ROS 2 node replaying a bag",
    "the report with metrics and pictures (runs/demo/report.md)",
]


def main() -> int:
    print("make demo: the end-to-end demo is not built yet. Missing:", file=sys.stderr)
    for item in MISSING:
        print(f"  - {item}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
