"""The advisor's scenario suite as a table: right cause first, and fits after the literal top suggestion.

python benchmarks/scenario_table.py [name-substring]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from IPython.core.interactiveshell import InteractiveShell

from tests.conftest import Shell
from tests.scenarios import SCENARIOS
from tests.test_scenarios import evaluate


def main() -> None:
    names = [a for a in sys.argv[1:] if not a.startswith("-")]
    wanted = names[0] if names else ""
    ip = InteractiveShell.instance()
    rows = []
    for scenario in SCENARIOS:
        if wanted not in scenario.name:
            continue
        ip.reset(new_session=False)
        ip.run_line_magic("load_ext", "oomnb")
        ip.run_cell("import torch", store_history=False)
        for name in ("last_type", "last_value", "last_traceback", "last_exc"):
            if hasattr(sys, name):
                delattr(sys, name)
        start = time.perf_counter()
        outcome = evaluate(Shell(ip), scenario)
        took = time.perf_counter() - start
        ip.run_line_magic("unload_ext", "oomnb")
        top = outcome.get("top")
        rows.append((scenario, outcome, took))
        fits = {True: "yes", False: "NO", None: "n/a"}[outcome.get("fits")]
        print(
            f"{scenario.family:12} {scenario.name[:44]:44} oom={'y' if outcome['oom'] else 'N'} "
            f"top={(top.kind if top else '-'):22} right={'y' if outcome.get('right') else 'N'} "
            f"fits={fits:3} back={'y' if outcome.get('back') else 'N'} {took:5.1f}s",
            flush=True,
        )
        if "-v" in sys.argv and not (outcome.get("right") and outcome.get("fits") is not False and outcome.get("back")):
            print(outcome.get("text", ""))
    right = sum(bool(o.get("right")) for _, o, _ in rows)
    literal = [o for s, o, _ in rows if s.literal]
    fit = sum(bool(o.get("fits")) for o in literal)
    print(
        f"\n{len(rows)} scenarios: right cause first {right}/{len(rows)}; "
        f"fits after the literal top suggestion {fit}/{len(literal)} (of those applicable in the session)"
    )


if __name__ == "__main__":
    main()
