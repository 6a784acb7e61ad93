"""
Check dream on a machine with one CUDA GPU, in one command (make gpu-check): never more than
3 x --timeout (150 s each; its run time on a GPU is not measured yet).

    tests     python -m pytest test_dream.py -q, with DREAM_TEST_DEVICE=cuda: the method's proofs
              (attention, loss, gradients, packing, fast paths, bf16, head ranking), every tensor on the GPU
    small     python train.py --small, 30 steps in bf16 (health checks and SciFact off; the final QA
              evaluation on 200 dev and 200 test questions over the whole passage pool)
    decoder   the same with --decoder (a LoRA copy of SmolLM2-135M as the retriever)

Prints one markdown table (check, result, seconds, seconds per step, peak GPU memory) and writes it
as JSON (--out). Each check runs in a process of its own with a timeout: one that runs past it is
killed and reported as timed out, and the others still run. The data is train.py's --data-dir
(DREAM_DATA, else ../shared/data). Without a CUDA GPU it stops (exit 2), unless --allow-cpu: then
the same checks run on the CPU in fp32, 2 steps each (a test of this script, not of the GPU; the
decoder run may well time out there). Exit status: 0 when every check passed, else 1.
"""
import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
CHECKS = ("tests", "small", "decoder")


def run(cmd, env, timeout):
    """(exit code, or None when killed at the timeout; stdout and stderr together)."""
    proc = subprocess.Popen(cmd, cwd=HERE, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, errors="replace", start_new_session=True)
    try:
        output = proc.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # its whole group: no child left holding the pipe
        return None, proc.communicate()[0]
    return proc.returncode, output


def cuda_available():
    import torch
    return torch.cuda.is_available()


def pytest_counts(output):
    """'3 passed, 1 skipped' from pytest's last summary line ('... in 9.81s'), or ''."""
    for line in reversed(output.splitlines()):
        counts = re.findall(r"(\d+) (passed|failed|errors?|skipped|xfailed|xpassed|deselected)", line)
        if counts and re.search(r" in [\d.]+s", line):
            return ", ".join(f"{n} {what}" for n, what in counts)
    return ""


def train_flags(check, cpu, steps, out_dir):
    return [f"--{check}", "--steps", str(steps), "--dtype", "fp32" if cpu else "bf16", "--health-every", "0",
            "--eval-data", "none", "--no-evaluate-before", "--checkpoint-every", str(steps),
            "--dev-questions", "200", "--test-questions", "200", "--out-dir", out_dir]


def check(name, cpu, steps, timeout):
    """One check, run in a process of its own: a row of the table."""
    with tempfile.TemporaryDirectory(prefix=f"gpu_check_{name}_") as tmp:
        out_dir, peak_file = os.path.join(tmp, "out"), os.path.join(tmp, "peak_memory")
        if name == "tests":
            cmd, env = [sys.executable, "-m", "pytest", "test_dream.py", "-q"], \
                dict(os.environ, DREAM_TEST_DEVICE="cpu" if cpu else "cuda")
        else:  # train.py writes its peak GPU memory there
            cmd, env = [sys.executable, "train.py", *train_flags(name, cpu, steps, out_dir)], \
                dict(os.environ, DREAM_PEAK_MEMORY_FILE=peak_file)
        t = time.time()
        code, output = run(cmd, env, timeout)
        row = {"check": name, "command": " ".join(cmd[1:]), "exit_code": code, "ok": code == 0,
               "seconds": round(time.time() - t, 1), "seconds_per_step": None, "peak_gib": None}
        if name == "tests":
            row["result"] = pytest_counts(output)
        if code is None:
            row["result"] = f"TIMED OUT after {timeout:g} s" + (f" ({row['result']})" if row.get("result") else "")
        elif code:
            row["result"] = f"FAILED (exit {code})" + (f": {row['result']}" if row.get("result") else "")
        elif name != "tests":
            row["result"] = "OK"
            report = os.path.join(out_dir, "report.json")
            if os.path.exists(report):
                with open(report) as f:
                    report = json.load(f)
                row["seconds_per_step"], row["train_seconds"] = report.get("seconds_per_step"), report.get("seconds")
            else:
                row.update(ok=False, result=f"FAILED: exit 0 but no {os.path.basename(report)}")
        if os.path.exists(peak_file):
            with open(peak_file) as f:
                row["peak_gib"] = int(f.read()) / 2**30
        if not row["ok"]:
            row["output_tail"] = output[-3000:]
        return row


def table(rows):
    lines = ["| check | result | seconds | seconds per step | peak GPU memory (GiB) |", "|---|---|---|---|---|"]
    for r in rows:
        step = "" if r["seconds_per_step"] is None else f"{r['seconds_per_step']:.3f}"
        peak = "" if r["peak_gib"] is None else f"{r['peak_gib']:.2f}"
        lines.append(f"| {r['check']} | {r['result']} | {r['seconds']:.0f} | {step} | {peak} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--allow-cpu", action="store_true", help="no CUDA GPU: run the checks on the CPU "
                        "(fp32, --steps 2 unless given; minutes, and the decoder run may time out)")
    parser.add_argument("--timeout", type=float, default=150, help="seconds each check may run (default 150)")
    parser.add_argument("--steps", type=int, help="training steps of each run (default 30 on a GPU, 2 on the CPU)")
    parser.add_argument("--checks", default=",".join(CHECKS), help=f"which, comma-separated (default {','.join(CHECKS)})")
    parser.add_argument("--out", default="out/gpu_check.json", help="the table as JSON (default out/gpu_check.json)")
    args = parser.parse_args(argv)
    checks = args.checks.split(",")
    if set(checks) - set(CHECKS):
        parser.error(f"--checks {args.checks}: choose from {', '.join(CHECKS)}")
    cpu = not cuda_available()
    if cpu and not args.allow_cpu:
        print("gpu_check: no CUDA GPU here (torch.cuda.is_available() is False). Run it on a machine with "
              "one, or pass --allow-cpu to run the same checks on the CPU (a test of this script).", file=sys.stderr)
        return 2
    steps = args.steps or (2 if cpu else 30)
    rows = []
    for name in checks:
        print(f"gpu_check: {name} on the {'CPU' if cpu else 'GPU'} (at most {args.timeout:g} s)", file=sys.stderr)
        rows.append(check(name, cpu, steps, args.timeout))
        if not rows[-1]["ok"]:
            print(f"gpu_check: {name}: {rows[-1]['result']}; the end of its output:\n{rows[-1]['output_tail']}",
                  file=sys.stderr)
    text = table(rows)
    print(text)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"device": "cpu" if cpu else "cuda", "steps": steps, "rows": rows, "table": text}, f, indent=1)
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
