"""Where and how the benchmarks write their reports: JSON under benchmarks/results/, named by device and date."""

import json
import os
import re

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def write_report(report: dict, output: str | None, prefix: str = "", small: bool = False) -> str:
    """Write `report` (with "device" and "date") to `output`, or to results/<prefix><device>[-small]-<date>.json."""
    device = re.sub(r"[^a-z0-9]+", "-", report["device"].lower()).strip("-")
    output = output or os.path.join(RESULTS, f"{prefix}{device}{'-small' if small else ''}-{report['date']}.json")
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(output, "w") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    print(f"wrote {output}")
    return output
