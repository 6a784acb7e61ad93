"""
Every table in results/ regenerates from what the folder keeps: results/README.md names the command
that made each one, and that command with --rebuild (on a copy of the folder) writes it byte for byte.
"""
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.environ.get("DREAM_DATA", os.path.join(HERE, "..", "shared", "data"))


def recorded_commands():
    """(folder, table, argv) of every compare.py command in results/README.md's table."""
    with open(os.path.join(HERE, "results", "README.md")) as f:
        text = f.read()
    found = []
    for command in re.findall(r"`(python compare\.py [^`]*--out-dir results/[^`]*)`", text):
        argv = shlex.split(command)[2:]
        folder = argv[argv.index("--out-dir") + 1]
        if not os.path.isdir(os.path.join(HERE, folder)) or "--probe" in argv:  # a pattern, or a probe: no table
            continue
        table = argv[argv.index("--table") + 1] if "--table" in argv else "compare"
        found.append((folder, table, argv))
    return found


def test_results_readme_names_a_command_for_every_table():
    tables = {os.path.relpath(os.path.join(root, f), HERE) for root, _, files in os.walk(os.path.join(HERE, "results"))
              for f in files if f.endswith(".md") and f != "README.md"}
    assert tables == {os.path.join(folder, table + ".md") for folder, table, _ in recorded_commands()}


@pytest.mark.parametrize("folder, table, argv", recorded_commands(), ids=lambda x: x if isinstance(x, str) else "")
def test_recorded_command_rebuilds_its_table_from_a_copy(folder, table, argv, tmp_path):
    if not os.path.isdir(os.path.join(DATA, "squad")):
        pytest.skip(f"{DATA}/squad is not here (the QA dev and test questions the tables pair)")
    copy = tmp_path / "copy"
    shutil.copytree(os.path.join(HERE, folder), copy)
    os.remove(copy / f"{table}.md")
    argv = [a if a != folder else str(copy) for a in argv] + ["--rebuild", "--reuse-older", "--data-dir", DATA]
    # the data found elsewhere and the folder copied: still the same runs (neither place is a setting)
    done = subprocess.run([sys.executable, "compare.py", *argv], cwd=HERE, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    with open(copy / f"{table}.md") as a, open(os.path.join(HERE, folder, f"{table}.md")) as b:
        assert a.read() == b.read()
