"""Prints how many host tests (tests/host, tests/browser) ran and how many were skipped, from a JUnit report."""
import sys
import xml.etree.ElementTree as ET  # our own pytest report, not user input

root = ET.parse(sys.argv[1]).getroot()
ran = skipped = failed = 0
reasons = set()
for case in root.iter("testcase"):
    name = case.get("classname", "")
    if not (name.startswith("host.") or name.startswith("browser.") or ".host." in name or ".browser." in name):
        continue
    skip = case.find("skipped")
    if skip is not None:
        skipped += 1
        reasons.add(skip.get("message", "")[:200])
    else:
        ran += 1
        if case.find("failure") is not None or case.find("error") is not None:
            failed += 1
print(f"[test] host tests: {ran} ran ({failed} failed), {skipped} skipped")
if skipped:
    for r in sorted(reasons):
        print(f"[test] !!! skipped: {r}")
