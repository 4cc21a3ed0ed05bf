"""Render every benchmark table that has a renderer from its committed JSON, with the code of the checkout
CODE_ROOT, into OUT_DIR: run it with two checkouts and `diff -r` the folders to show that a change of code
leaves the tables as they were.

    python benchmarks/rerender.py CODE_ROOT OUT_DIR"""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT, OUT = Path(sys.argv[1]).resolve(), Path(sys.argv[2])
sys.path[:0] = [str(ROOT), str(ROOT / "jobs")]
HERE = Path(__file__).resolve().parent          # the JSON files: this checkout's, whichever code renders them

import assessment_noise  # noqa: E402  (jobs/assessment_noise.py of CODE_ROOT)

from benchmarks import report_calibration, speed  # noqa: E402
from crosspt.bench import decoder, report, standard_report  # noqa: E402


def load(name: str) -> dict:
    return json.loads((HERE / f"{name}.json").read_text())


def speed_table(d: dict) -> str:
    if "before" in d:
        return speed.render_before_after(d["before"], d["after"], before_label=d["before_label"],
                                         after_label=d["after_label"])
    return speed.render_speed(d)


TABLES = {
    "quick": lambda: report.render_report(load("quick"), "quick"),
    "standard_router": lambda: standard_report.render(load("standard_router"))[0],
    "standard_router_lr01": lambda: standard_report.render(load("standard_router_lr01"))[0],
    "decoder": lambda: decoder.render(load("decoder")),
    "assessment_noise": lambda: assessment_noise.render(load("assessment_noise")),
    "report_calibration": lambda: report_calibration.to_markdown(load("report_calibration")),
    **{n: (lambda n=n: speed_table(load(n))) for n in ("speed", "speed_latency", "speed_memory")},
}

if __name__ == "__main__":
    OUT.mkdir(parents=True, exist_ok=True)
    for name, table in TABLES.items():
        (OUT / f"{name}.md").write_text(table())
    print(f"{len(TABLES)} tables rendered into {OUT}")
