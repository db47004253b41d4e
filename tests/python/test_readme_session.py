#!/usr/bin/python3
"""README's "A session": every `grace ...` line runs as written, in order, in an empty folder (the `mpirun` line
is left out: it needs MPI and minutes of CPU; tests/mpi covers `grace run`). The lines once named traces and a
statistics folder (a.npy, b.npy, new_stats) that no line made."""
import os
import re
import shlex
import subprocess
import tempfile
import unittest

GRACE = os.path.abspath(os.environ.get("GRACE_BIN", "build/tools/grace/grace"))
SRC = os.environ.get("GRACE_SOURCE_DIR", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))


def session_commands():
    with open(os.path.join(SRC, "README.md"), encoding="utf-8") as f:
        text = f.read()
    section = text.split("## A session", 1)[1].split("\n## ", 1)[0]
    commands = []
    for line in section.splitlines():
        if line.startswith("    grace "):
            commands.append(shlex.split(re.sub(r"\s+#.*$", "", line.strip()))[1:])
    return commands


class ReadmeSession(unittest.TestCase):
    def test_every_grace_line_runs(self):
        commands = session_commands()
        self.assertGreaterEqual(len(commands), 8)
        with tempfile.TemporaryDirectory() as d:
            for args in commands:
                with self.subTest(" ".join(args)):
                    p = subprocess.run([GRACE, *args], cwd=d, capture_output=True, text=True, timeout=600)
                    self.assertEqual(p.returncode, 0, f"grace {' '.join(args)}: {p.stderr[-2000:]}")


if __name__ == "__main__":
    unittest.main()
