"""A tiny bench/netns/run_slow_link.sh (QUICK=1): two network namespaces joined by a tc-limited veth, grace run
flat / flat-dedup / hsc on 2x2 with Open MPI over TCP between them. Skips (exit 77) where namespaces, veth or tc
are not available or not root. Checks that the job really spanned the namespaces and the link: every byte the
runtime counts as cross-node crossed the veth (veth bytes >= runtime cross-node bytes, and not far more, so the
intra-node traffic stayed in shared memory), and that HSC sends fewer cross-node bytes than flat."""
import csv
import json
import os
import pathlib
import subprocess
import sys
import tempfile

SRC = pathlib.Path(os.environ["GRACE_SOURCE_DIR"])
BUILD = pathlib.Path(os.environ["GRACE_BUILD_DIR"])
SKIP = 77


def cross_bytes(report):
    b = report["bytes"]
    return sum(b[d]["cross_node"][f] for d in ("dispatch", "combine") for f in ("payload", "metadata", "control"))


def main():
    if os.geteuid() != 0:
        print("skip: needs root")
        return SKIP
    with tempfile.TemporaryDirectory(prefix="grace-slowlink-test-") as tmp:
        env = dict(os.environ, QUICK="1", RATE="1gbit", RUN_TIMEOUT="12", BUILD=str(BUILD))
        # SIGTERM (not SIGKILL) on overrun, so that the script's trap still deletes its namespaces; bash runs the
        # trap once the current mpirun (bounded by RUN_TIMEOUT) returns.
        p = subprocess.Popen(["bash", str(SRC / "bench/netns/run_slow_link.sh"), tmp], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            stdout, _ = p.communicate(timeout=38)
        except subprocess.TimeoutExpired:
            p.terminate()
            stdout, _ = p.communicate(timeout=18)
            print(stdout)
            print("FAIL: run_slow_link.sh took more than 38 s")
            return 1
        print(stdout)
        if p.returncode == SKIP:
            return SKIP
        if p.returncode != 0:
            print(f"FAIL: run_slow_link.sh exited {p.returncode}")
            return 1
        out = pathlib.Path(tmp)
        hosts = (out / "pingpong.md").read_text() if (out / "pingpong.md").exists() else ""
        if (BUILD / "bench/mpi/bench_pingpong").exists():
            assert "0=grace-node0" in hosts and "2=grace-node1" in hosts, hosts
        veth = {s: int(b) for s, _, b in csv.reader(open(out / "veth.tsv"), delimiter="\t")}
        cross = {}
        for s in ("flat", "flat-dedup", "hsc"):
            r = json.loads((out / f"run_{s}_1.json").read_text())
            assert r["topology"] == "2x2" and r["scheme"] == s, r
            cross[s] = cross_bytes(r)
            # TCP/IP headers, MPI's own headers and Open MPI's out-of-band wire-up add to the runtime's count.
            assert cross[s] <= veth[s] <= 1.25 * cross[s] + 4e6, (s, cross[s], veth[s])
        assert cross["hsc"] < cross["flat"], cross
        print("veth bytes", veth, "runtime cross-node bytes", cross)
    print("OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
