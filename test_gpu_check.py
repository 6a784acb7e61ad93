"""gpu_check.py, the one command run on a GPU machine: its table and JSON are built from the checks'
results, failures and timeouts are rows of their own, and a timeout kills a whole process group.
"""
import json
import os
import re
import sys

import pytest

import train


# -----------------------------------------------------------------------------
# gpu_check.py with its process runner faked


def test_gpu_check_builds_its_table_and_json_from_the_checks_results(tmp_path, monkeypatch, capsys):
    """gpu_check.py with its process runner faked (no tests, no training): the flags train.py is
    given parse, report.json and the peak memory file are read, failures and timeouts are rows of
    their own, no GPU stops it (exit 2) unless --allow-cpu, and a real timeout kills a whole group."""
    import time
    import gpu_check
    calls, results, real_run = [], {}, gpu_check.run

    def fake_run(cmd, env, timeout):
        calls.append((cmd, env, timeout))
        if "pytest" in cmd:
            return results["tests"]
        _, cfg = train.parse_args(cmd[cmd.index("train.py") + 1:])  # flags train.py accepts
        code, report = results["decoder" if "--decoder" in cmd else "small"]
        if report:
            os.makedirs(cfg.out_dir)
            with open(os.path.join(cfg.out_dir, "report.json"), "w") as f:
                json.dump(report, f)
            with open(env["DREAM_PEAK_MEMORY_FILE"], "w") as f:
                f.write(str(3 * 2**30))
        return code, f"{cfg.steps} steps, {cfg.dtype}, {cfg.dev_questions} dev questions"

    monkeypatch.setattr(gpu_check, "run", fake_run)
    monkeypatch.setattr(gpu_check, "cuda_available", lambda: True)
    results.update(tests=(0, "..s.\n120 passed, 2 skipped, 3 warnings in 81.20s (0:01:21)\n"),
                   small=(0, {"seconds_per_step": 0.25, "seconds": 70.0}), decoder=(None, None))
    out = tmp_path / "new_folder" / "gpu_check.json"
    assert gpu_check.main(["--out", str(out), "--timeout", "99"]) == 1  # the decoder run timed out
    printed = capsys.readouterr()
    saved = json.loads(out.read_text())
    assert printed.out.strip() == saved["table"] and saved["device"] == "cuda" and saved["steps"] == 30
    lines = saved["table"].splitlines()
    assert lines[0] == "| check | result | seconds | seconds per step | peak GPU memory (GiB) |" and len(lines) == 5
    assert re.fullmatch(r"\| tests \| 120 passed, 2 skipped \| \d+ \|  \|  \|", lines[2]), lines[2]
    assert re.fullmatch(r"\| small \| OK \| \d+ \| 0.250 \| 3.00 \|", lines[3]), lines[3]
    assert re.fullmatch(r"\| decoder \| TIMED OUT after 99 s \| \d+ \|  \|  \|", lines[4]), lines[4]
    tests, small, decoder = saved["rows"]
    assert tests["ok"] and small["ok"] and not decoder["ok"] and decoder["exit_code"] is None
    assert small["train_seconds"] == 70.0 and small["peak_gib"] == 3.0 and "30 steps, bf16" in decoder["output_tail"]
    assert "decoder: TIMED OUT" in printed.err
    assert [timeout for *_, timeout in calls] == [99, 99, 99]
    assert calls[0][1]["DREAM_TEST_DEVICE"] == "cuda"
    assert calls[0][0][1:] == ["-m", "pytest", "test_dream.py", "-q"]  # the method's proofs, all of them
    assert all("--dev-questions" in cmd and "--no-evaluate-before" in cmd for cmd, *_ in calls[1:])

    # a failed test run, a run that leaves no report: FAILED, exit 1
    calls.clear()
    results.update(tests=(1, "F\n1 failed, 37 passed in 10.02s\n"), small=(0, None), decoder=(3, None))
    assert gpu_check.main(["--out", str(out), "--checks", "tests,small,decoder"]) == 1
    rows = {r["check"]: r["result"] for r in json.loads(out.read_text())["rows"]}
    assert rows == {"tests": "FAILED (exit 1): 1 failed, 37 passed",
                    "small": "FAILED: exit 0 but no report.json", "decoder": "FAILED (exit 3)"}
    capsys.readouterr()

    # no GPU: a clear message and exit 2, nothing run; --allow-cpu: the CPU, fp32, 2 steps
    calls.clear()
    monkeypatch.setattr(gpu_check, "cuda_available", lambda: False)
    assert gpu_check.main(["--out", str(out)]) == 2 and not calls
    assert "no CUDA GPU" in capsys.readouterr().err
    results.update(tests=(0, "1 passed in 0.5s"), small=(0, {"seconds_per_step": 9.0, "seconds": 99.0}))
    assert gpu_check.main(["--allow-cpu", "--checks", "tests,small", "--out", str(out)]) == 0
    saved = json.loads(out.read_text())
    assert saved["device"] == "cpu" and [r["result"] for r in saved["rows"]] == ["1 passed", "OK"]
    _, cfg = train.parse_args(calls[1][0][calls[1][0].index("train.py") + 1:])
    assert calls[0][1]["DREAM_TEST_DEVICE"] == "cpu" and (cfg.steps, cfg.dtype, cfg.eval_data) == (2, "fp32", "none")
    with pytest.raises(SystemExit):
        gpu_check.main(["--checks", "tests,gpu"])
    capsys.readouterr()

    # the real runner: a process and the child it started, killed together at the timeout
    t = time.time()
    code, output = real_run([sys.executable, "-c", "import subprocess, sys, time; print('started', flush=True); "
                             "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
                             "time.sleep(60)"], dict(os.environ), 1)
    assert code is None and "started" in output and time.time() - t < 10
    assert real_run([sys.executable, "-c", "print('hi'); raise SystemExit(4)"], dict(os.environ), 30) == (4, "hi\n")
