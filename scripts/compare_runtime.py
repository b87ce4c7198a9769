"""Old vs new anytime runtime, request by request, on a deterministic fake clock (the reshaping check).

    git worktree add /tmp/before f33aec2
    python scripts/compare_runtime.py /tmp/before

Runs the same 160 requests (no controller / the calibrated one; budgets 6 ms-250 ms; four samplers;
rho 1 and 0.5; with and without --best-effort) through the runtime of the tree given (run in a
subprocess with that tree first on the path) and through this one, and reports how many reports
(steps, sigmas, re-plans, exit reasons, predictions, corrections, images) differ.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

RUN = r'''
import json, sys
import numpy as np
root, out_path = sys.argv[1], sys.argv[2]
try:
    from abcd_edge.runtime.session import AnytimeRuntime
    from abcd_edge.core.budget import parse_budget
    open_runtime = AnytimeRuntime.open
except ImportError:                      # the layout before the reshaping
    from abcd_edge.runtime import AnytimeRuntime
    from abcd_edge.budget import parse_budget
    open_runtime = AnytimeRuntime
from abcd_edge.errors import UserError

class StepClock:
    simulated = True
    def __init__(self, f): self.f, self.now, self.k = f, 0.0, 0
    def start(self): self.now, self.k = 0.0, 0
    def elapsed_ms(self): return self.now
    def run_step(self, call, abandon, guard_ms):
        cost = self.f(self.k); self.k += 1
        out = call()
        if guard_ms is not None and self.now + cost > guard_ms:
            self.now = guard_ms; return None, cost
        self.now += cost; return out, cost
    def disarm(self): pass
    def close(self): pass

def pattern(k):  # mostly ~3 ms, a burst, a very slow step now and then
    return [2.6, 2.8, 3.1, 9.0, 2.7, 2.9, 40.0, 2.6][k % 8]

out = []
for ctl in (None, root + "/calibration/demo"):
    rt = open_runtime(root + "/export/demo", profile=root + "/profiles/cpu-2t.json", controller=ctl, threads=1,
                      power="none", clock=StepClock(pattern))
    for b in ("6ms", "12ms", "30ms", "80ms", "250ms"):
        for sampler in ("ddim", "dpmpp-2m", "euler", "consistency"):
            for rho in (1.0, 0.5):
                for be in (False, True):
                    key = [ctl is not None, b, sampler, rho, be]
                    try:
                        img, rep = rt.generate(parse_budget(b), rho=rho, sampler=sampler, seed=7, best_effort=be)
                    except UserError as e:
                        out.append(key + ["refused: " + str(e)])
                        continue
                    d = {k: v for k, v in rep.to_json().items() if k not in ("controller", "notes", "artifact", "profile")}
                    out.append(key + [d, int(img.astype(np.int64).sum())])
    rt.close()
json.dump(out, open(out_path, "w"), default=str)
'''


def run(tree: Path, out: Path) -> list:
    env = dict(os.environ, PYTHONPATH=str(tree))
    subprocess.run([sys.executable, "-c", RUN, str(ROOT), str(out)], check=True, env=env, cwd=tree)
    return json.loads(out.read_text())


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    with tempfile.TemporaryDirectory() as tmp:
        old = run(Path(sys.argv[1]).resolve(), Path(tmp) / "old.json")
        new = run(ROOT, Path(tmp) / "new.json")
    differ = [(a[:5], b[:5]) for a, b in zip(old, new) if a != b]
    reasons: dict[str, int] = {}
    for r in new:
        reason = r[5]["exit_reason"] if isinstance(r[5], dict) else "refused"
        reasons[reason] = reasons.get(reason, 0) + 1
    print(f"{len(new)} requests, {len(differ)} reports differ; exits: {reasons}")
    for a, _ in differ[:10]:
        print("  differs:", a)
    sys.exit(1 if differ or len(old) != len(new) else 0)


if __name__ == "__main__":
    main()
