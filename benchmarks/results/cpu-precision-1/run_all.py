"""The runs of this folder: every AdamW storage configuration on 4x16M and
single-2^24 with fused_adamw-cpu, repeated until each has NEED runs whose
rows are not flagged busy? (at most MAX_TRIES more tries per call), the
order rotated between passes, a new run started only while the 1-minute load
average is at most 1.5. Each try goes to <name>-r<k>, quiet or not (k counts
every try; a second call continues the numbering). The head-* configurations
run the package at 4e14b1f (the commit before issue 12's kernels), unpacked
with `git archive 4e14b1f` and its _cpu built apart, by PYTHONPATH=HEAD_PYTHON.

Run from the repository root:
  python benchmarks/results/cpu-precision-1/run_all.py 3   # then again with 5
"""
import json
import os
import subprocess
import sys
import time

OUT = "benchmarks/results/cpu-precision-1"
HEAD_PYTHON = os.environ.get("HEAD_PYTHON", "/tmp/bench_eng/head/python")
NEED = int(sys.argv[1]) if len(sys.argv) > 1 else 3
MAX_TRIES = 6
MAX_LOAD = 1.5
CONFIGS = [  # (name, run.py options, PYTHONPATH)
    ("fp32", "--dtype fp32", ""),
    ("bf16", "--dtype bf16", ""),
    ("bf16-master", "--dtype bf16 --precision master", ""),
    ("bf16-stochastic", "--dtype bf16 --precision stochastic", ""),
    ("bf16-kahan", "--dtype bf16 --precision kahan", ""),
    ("fp32-bf16state", "--dtype fp32 --state-dtype bf16", ""),
    ("bf16-fp32state", "--dtype bf16 --state-dtype fp32", ""),
    ("fp16", "--dtype fp16", ""),
    ("fp16-master", "--dtype fp16 --precision master", ""),
    ("fp16-stochastic", "--dtype fp16 --precision stochastic", ""),
    ("fp16-kahan", "--dtype fp16 --precision kahan", ""),
    ("head-fp32", "--dtype fp32", HEAD_PYTHON),
    ("head-bf16", "--dtype bf16", HEAD_PYTHON),
    ("head-fp16", "--dtype fp16", HEAD_PYTHON),
]


def quiet_run(folder: str) -> bool:
    try:
        with open(f"{folder}/results.json") as f:
            rows = json.load(f)
    except OSError:
        return False
    return bool(rows) and all(r["status"] == "ok" and not r["busy"] for r in rows)


quiet = {name: 0 for name, _, _ in CONFIGS}
tries = {name: 0 for name, _, _ in CONFIGS}
for name in quiet:  # continue after the runs already here
    while os.path.isdir(f"{OUT}/{name}-r{tries[name] + 1}"):
        tries[name] += 1
        quiet[name] += quiet_run(f"{OUT}/{name}-r{tries[name]}")
limit = max(tries.values()) + MAX_TRIES
rotation = 0
while True:
    todo = [c for c in CONFIGS if quiet[c[0]] < NEED and tries[c[0]] < limit]
    if not todo:
        break
    k = rotation % len(todo)
    rotation += 5
    for name, options, pythonpath in todo[k:] + todo[:k]:
        while float(open("/proc/loadavg").read().split()[0]) > MAX_LOAD:
            time.sleep(15)
        tries[name] += 1
        folder = f"{OUT}/{name}-r{tries[name]}"
        os.makedirs(folder, exist_ok=True)
        cmd = ["python", "benchmarks/run.py", *options.split(), "--workloads", "single", "4x16M",
               "--sizes", "24", "--providers", "fused_adamw-cpu", "--out", folder]
        with open(f"{folder}/stdout.log", "w") as f:
            subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT,
                           env=dict(os.environ, PYTHONPATH=pythonpath))
        for p in os.listdir(folder):  # keep the folder small: results.json has the numbers
            if p.endswith(".png"):
                os.remove(os.path.join(folder, p))
        ok = quiet_run(folder)
        quiet[name] += ok
        print(time.strftime("%H:%M:%S"), name, f"try {tries[name]}", "quiet" if ok else "BUSY/ERR",
              flush=True)
print("quiet runs:", quiet)
