#!/usr/bin/python3
"""`grace run` under mpiexec when the ranks disagree or one stops (issue #15, defect 3; defects 7/8, run part).

- ranks started with different --batch-tokens, --comm, --layers or plan files end at once (non-zero exit, a few
  seconds) with one line naming the option, the differing rank and both values, printed once;
- a rank that stops (GRACE_TEST_STALL_RANK: it sends itself SIGSTOP, before the first exchange or at a layer)
  ends the job after --timeout with a message naming that rank; the stopped process does not survive;
- a trace with more layers than the plan is an error unless --layers N asks for fewer;
- options out of range are one-line errors naming the option and the value (--hidden 0 included).

Every mpiexec runs under a subprocess timeout, so a regression fails instead of hanging CI.
"""
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

GRACE = os.environ["GRACE_BIN"]
MPIEXEC = os.environ.get("GRACE_MPIEXEC", "mpiexec")
MPI = [MPIEXEC, "--oversubscribe", "--allow-run-as-root"]
E, K, T = 8, 2, 40
FAILED = []
OUT_DIR = [tempfile.gettempdir()]  # the test's temporary folder once main() made it


def check(cond, what):
    print(("ok   " if cond else "FAIL ") + what, flush=True)
    if not cond:
        FAILED.append(what)


def write_trace(d, name, layers):
    rng = np.random.default_rng(3)
    ids = np.zeros((T, layers, K), dtype=np.int32)
    for t in range(T):
        for l in range(layers):
            ids[t, l] = rng.choice(E, size=K, replace=False)
    np.save(os.path.join(d, name + ".npy"), ids)
    with open(os.path.join(d, name + ".json"), "w") as f:
        json.dump({"format": "grace.trace/v1", "num_experts": E, "top_k": K, "num_layers": layers, "model": "toy"}, f)
    return os.path.join(d, name + ".npy")


def write_plan(d, name, layers, shift=0):
    g = 2
    out = []
    for l in range(layers):
        primary = [((e + l + shift) * g) // E % g for e in range(E)]
        gpu_experts = [[e for e in range(E) if primary[e] == q] for q in range(g)]
        out.append({"layer": l, "gpu_experts": gpu_experts, "primary_gpu": primary, "routing": {"policy": "primary"}})
    plan = {"format": "grace.plan/v1", "num_experts": E, "num_layers": layers, "top_k": K,
            "topology": {"nodes": 1, "gpus_per_node": g, "slots_per_gpu": None}, "method": "test", "layers": out}
    with open(os.path.join(d, name), "w") as f:
        json.dump(plan, f)
    return os.path.join(d, name)


def mpmd(args0, args1, env=None, timeout=60):
    """Rank 0 runs `grace run args0`, rank 1 `grace run args1`; returns (process, seconds)."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    default_out = ["-o", os.path.join(OUT_DIR[0], "default.json")]
    args0 = args0 if "-o" in args0 else args0 + default_out
    args1 = args1 if "-o" in args1 else args1 + default_out
    t0 = time.time()
    # Its own session, so that on a timeout (a regression that hangs) mpiexec and every rank can be killed.
    proc = subprocess.Popen(MPI + ["-n", "1", GRACE, "run"] + args0 + [":", "-n", "1", GRACE, "run"] + args1,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        err += f"\n(test harness: killed after {timeout} s)"
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), time.time() - t0


def error_lines(stderr):
    return [line for line in stderr.splitlines() if line.startswith("grace: error:")]


def main():
    with tempfile.TemporaryDirectory() as d:
        OUT_DIR[0] = d
        trace = write_trace(d, "trace", 2)
        plan = write_plan(d, "plan.json", 2)
        base = ["--plan", plan, "--trace", trace, "--hidden", "16", "--intermediate", "8"]

        p, secs = mpmd(base, base)
        check(p.returncode == 0, f"identical ranks run ({p.stderr.strip()[-300:]})")

        # Mismatches: one line, printed once, naming the option, the differing rank and both values.
        cases = [
            ("--batch-tokens", ["--batch-tokens", "5"], ["--batch-tokens", "7"],
             "rank 1 has --batch-tokens 7 but rank 0 has 5"),
            ("--comm", ["--comm", "hsc"], ["--comm", "flat"], "rank 1 has --comm flat but rank 0 has hsc"),
            ("--layers", ["--layers", "2"], ["--layers", "1"], "rank 1 has --layers 1 but rank 0 has 2"),
            ("--seed", [], ["--seed", "4"], "rank 1 has --seed 4 but rank 0 has 0"),
        ]
        for name, a0, a1, want in cases:
            out = os.path.join(d, "mm.json")
            p, secs = mpmd(base + a0 + ["-o", out], base + a1 + ["-o", out])
            lines = error_lines(p.stderr)
            check(p.returncode != 0 and secs < 30 and len(lines) == 1 and want in lines[0],
                  f"different {name}: one line '{want}' in {secs:.1f} s (got {lines})")
            check(not os.path.exists(out), f"different {name}: no report written")

        plan_b = write_plan(d, "plan_b.json", 2, shift=1)
        args_b = list(base)
        args_b[args_b.index(plan)] = plan_b
        p, secs = mpmd(base, args_b)
        lines = error_lines(p.stderr)
        check(p.returncode != 0 and secs < 30 and len(lines) == 1 and "rank 1 has --plan " + plan_b in lines[0]
              and "but rank 0 has " + plan in lines[0],
              f"different plan files: one line naming --plan, both files and rank 1 in {secs:.1f} s ({lines})")

        # The same plan content under another name is no mismatch (content is compared, not paths).
        plan_copy = os.path.join(d, "plan_copy.json")
        with open(plan, "rb") as src, open(plan_copy, "wb") as dst:
            dst.write(src.read())
        args_c = list(base)
        args_c[args_c.index(plan)] = plan_copy
        p, _ = mpmd(base, args_c)
        check(p.returncode == 0, f"the same plan under two names runs ({error_lines(p.stderr)})")

        # A different trace (same shape, other ids): named by --trace.
        rng = np.random.default_rng(9)
        other = np.load(trace)
        other[0, 0] = [x for x in rng.permutation(E) if x not in other[0, 0]][:K]
        trace_b = os.path.join(d, "trace_b.npy")
        np.save(trace_b, other)
        with open(os.path.join(d, "trace_b.json"), "w") as f:
            json.dump({"format": "grace.trace/v1", "num_experts": E, "top_k": K, "num_layers": 2, "model": "toy"}, f)
        args_t = list(base)
        args_t[args_t.index(trace)] = trace_b
        p, secs = mpmd(base, args_t)
        lines = error_lines(p.stderr)
        check(p.returncode != 0 and len(lines) == 1 and "rank 1 has --trace " + trace_b in lines[0],
              f"different trace contents: named by --trace ({lines})")

        # A stopped rank: the job ends after --timeout naming it, before the first exchange and inside a layer.
        for where, env in [("before the first exchange", {"GRACE_TEST_STALL_RANK": "1"}),
                           ("at layer 1", {"GRACE_TEST_STALL_RANK": "0", "GRACE_TEST_STALL_LAYER": "1"})]:
            stalled = env["GRACE_TEST_STALL_RANK"]
            out = os.path.join(d, "st.json")
            p, secs = mpmd(base + ["--timeout", "5", "--batch-tokens", "5", "-o", out],
                           base + ["--timeout", "5", "--batch-tokens", "5", "-o", out], env=env, timeout=90)
            lines = error_lines(p.stderr)
            check(p.returncode != 0 and secs < 60 and len(lines) == 1 and "timed out" in lines[0]
                  and f"rank(s) {stalled} did not answer" in lines[0],
                  f"rank {stalled} stopped {where}: job ends in {secs:.1f} s naming it ({lines})")
            check(not os.path.exists(out), f"rank {stalled} stopped {where}: no report written")
        left = subprocess.run(["pgrep", "-f", f"{GRACE} run"], capture_output=True, text=True).stdout.split()
        check(not left, f"no grace process survives the aborted jobs ({left})")

        # Layers: a trace with more layers than the plan is an error unless --layers asks for fewer.
        trace3 = write_trace(d, "trace3", 3)
        args3 = list(base)
        args3[args3.index(trace)] = trace3
        p, _ = mpmd(args3, args3)
        lines = error_lines(p.stderr)
        check(p.returncode != 0 and len(lines) == 1 and "the trace has 3 layers but the plan has 2" in lines[0]
              and "--layers" in lines[0], f"3-layer trace on a 2-layer plan is an error ({lines})")
        out = os.path.join(d, "l2.json")
        p, _ = mpmd(args3 + ["--layers", "2", "-o", out], args3 + ["--layers", "2", "-o", out])
        check(p.returncode == 0 and json.load(open(out))["layers"] == 2, "... unless --layers 2 is given")
        p, _ = mpmd(args3 + ["--layers", "3"], args3 + ["--layers", "3"])
        check(p.returncode != 0 and "--layers 3 exceeds" in p.stderr, "--layers beyond the plan is an error")

        # Options out of range: one line naming the option (CLI11 validators, no MPI needed).
        for opt, value in [("--hidden", "0"), ("--intermediate", "-3"), ("--batch-tokens", "0"), ("--layers", "0"),
                           ("--threads", "0"), ("--experts", "0"), ("--tolerance", "nan"), ("--tolerance", "-1"),
                           ("--timeout", "-5"), ("--timeout", "inf"), ("--comm", "ring"), ("--dtype", "fp16"),
                           ("--backend", "gloo"), ("--routing", "random"), ("--first-moe-layer", "-1"),
                           ("--seed", "-1"), ("--seed", "18446744073709551616")]:
            args = [a for a in base]
            if opt in args:
                i = args.index(opt)
                del args[i:i + 2]
            p = subprocess.run([GRACE, "run"] + args + [opt, value, "-o", os.path.join(d, "v.json")], capture_output=True, text=True, timeout=30)
            lines = p.stderr.strip().splitlines()
            check(p.returncode != 0 and len(lines) == 1 and lines[0].startswith("grace: error: " + opt)
                  and value in lines[0], f"{opt} {value}: one-line error ({lines})")
        # --hidden without --intermediate on a model that is no preset names the missing option.
        args = [a for a in base if a not in ("--intermediate", "8")]
        p, _ = mpmd(args, args)
        lines = error_lines(p.stderr)
        check(p.returncode != 0 and len(lines) == 1 and "--hidden 16 needs --intermediate" in lines[0],
              f"--hidden without --intermediate (no preset) names the missing option ({lines})")
    if FAILED:
        print(f"{len(FAILED)} check(s) failed")
        sys.exit(1)


if __name__ == "__main__":
    main()
