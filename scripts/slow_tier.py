r"""Choose the slow test tier (``tests/slow.txt``) from measured per-test durations.

``make test`` (the README's command, and CI's) skips tests marked ``slow``; ``make test-all``
runs every test. Tests get the mark either from a ``@pytest.mark.slow`` decorator or by being
listed in ``tests/slow.txt`` (``tests/conftest.py`` reads it). This script writes that list:
it keeps every test in the fast tier except the most expensive ones, taken greedily (longest
first) until the fast tier's summed duration is within ``--budget-s``, and it never moves the
last fast test of a test file (every file keeps at least its cheapest test in CI). Measure
with the list switched off (``EMVI_IGNORE_SLOW_LIST=1``) and the decorated slow tests left
out (``-m "not slow"``), as below.

Usage::

    EMVI_IGNORE_SLOW_LIST=1 python -m pytest -n 2 -q -m "not slow" --junitxml=runs/junit.xml
    python scripts/slow_tier.py runs/junit.xml --budget-s 1000 > tests/slow.txt
"""

from __future__ import annotations

import argparse
import collections
import sys
import xml.etree.ElementTree as ET


def durations(path: str) -> dict[str, float]:
    """Per-test durations (setup + call + teardown, seconds) from a pytest JUnit XML file."""
    out: dict[str, float] = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        module = case.get("classname", "")
        parts = module.split(".")
        # classname is "tests.test_x" or "tests.test_x.TestClass"
        file_parts = [p for p in parts if not p[:1].isupper()]
        cls = [p for p in parts if p[:1].isupper()]
        nodeid = "/".join(file_parts) + ".py::" + "::".join([*cls, case.get("name", "")])
        out[nodeid] = out.get(nodeid, 0.0) + float(case.get("time", 0.0))
    return out


def choose(times: dict[str, float], budget_s: float) -> list[str]:
    """The tests to mark slow: longest first until the rest fits ``budget_s``."""
    if budget_s <= 0:
        raise ValueError(f"budget_s must be positive; got {budget_s}.")
    per_file = collections.Counter(nid.split("::")[0] for nid in times)
    total = sum(times.values())
    slow: list[str] = []
    for nid, t in sorted(times.items(), key=lambda kv: -kv[1]):
        if total <= budget_s:
            break
        f = nid.split("::")[0]
        if per_file[f] <= 1:
            continue
        per_file[f] -= 1
        total -= t
        slow.append(nid)
    return sorted(slow)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("junit_xml")
    parser.add_argument("--budget-s", type=float, default=1000.0)
    args = parser.parse_args(argv)
    times = durations(args.junit_xml)
    slow = choose(times, args.budget_s)
    fast = sum(t for nid, t in times.items() if nid not in set(slow))
    print(f"# {len(slow)} of {len(times)} tests; fast tier {fast:.0f} s summed, measured")
    print(f"# total {sum(times.values()):.0f} s; regenerate: see scripts/slow_tier.py")
    sys.stdout.writelines(nid + "\n" for nid in slow)


if __name__ == "__main__":
    main()
