"""Where measurements run: in this process (GPU), or one subprocess per provider (CPU).

On the CPU the only peak-memory gauge is the process's resident set, which every earlier
allocation of the process, compiled code and imported library inflates; so each provider runs in
a process of its own (``python -m bench.worker``), on inputs and truths handed over as files.
On a GPU ``torch.cuda.max_memory_allocated`` is exact and resettable: everything runs here.
Both runners have the same interface and call the same :func:`bench.measure.measure`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict
from typing import Dict, List, Optional

import torch

from .inputs import Problem
from .measure import Outcome, Settings, floor_ms, measure, weigh
from .providers import Case

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class DiskStore:
    """Problems (the lm-head once, tokens per N) and truths as files under ``root``."""

    def __init__(self, root: str, device: str = "cpu"):
        self.root, self.device = root, device
        self._weight = None

    def _path(self, name: str) -> str:
        return os.path.join(self.root, name)

    def put_problem(self, prob: Problem) -> None:
        state = prob.state()
        if not os.path.exists(self._path("weight.pt")):
            torch.save(state["weight"], self._path("weight.pt"))
        state.pop("weight")
        torch.save(state, self._path(f"tokens_{prob.hidden.shape[0]}.pt"))

    def problem(self, N: int) -> Problem:
        if self._weight is None:
            self._weight = torch.load(self._path("weight.pt"), map_location=self.device)
        state = torch.load(self._path(f"tokens_{N}.pt"), map_location=self.device)
        return Problem(weight=self._weight, **state)

    def _truth_path(self, case: Case, N: int) -> str:
        return self._path(f"truth_{case.loss}_{case.mode}_{N}.pt")

    def has_truth(self, case: Case, N: int) -> bool:
        return os.path.exists(self._truth_path(case, N))

    def get_truth(self, case: Case, N: int):
        path = self._truth_path(case, N)
        return torch.load(path, map_location=self.device) if os.path.exists(path) else None

    def put_truth(self, case: Case, N: int, outs) -> None:
        torch.save([t.detach().cpu() for t in outs], self._truth_path(case, N))


def run_outcomes(provider: str, case: Case, roles: Dict[int, str], get_problem, store,
                 settings: Settings) -> List[Outcome]:
    """``measure`` for each N of ``roles`` (N -> role), in increasing N."""
    out = []
    for N in sorted(roles):
        prob = get_problem(N)
        out.append(measure(provider, case, prob, lambda: store.get_truth(case, N),
                           lambda outs: store.put_truth(case, N, outs), settings, roles[N]))
        del prob
    return out


def weigh_outcomes(provider: str, case: Case, Ns: List[int], get_problem, settings: Settings) -> Dict[int, float]:
    """``weigh`` for each N; the Ns where it failed are left out."""
    out = {}
    for N in sorted(Ns):
        prob = get_problem(N)
        mem = weigh(provider, case, prob, settings)
        del prob
        if mem is not None:
            out[N] = mem
    return out


# The weighing worker's allocator: glibc maps every allocation above 128 KiB on its own and returns
# it, and any free heap top above 128 KiB, when freed. By default it raises both thresholds as
# blocks are freed (up to 32 / 64 MiB) and keeps freed blocks in its heap, and the peak RSS then
# counts fragmentation: our chunked backend's 16 MiB blocks read 500-760 MiB for a 64 MiB live peak.
_LIVE_MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024), "MALLOC_TRIM_THRESHOLD_": str(128 * 1024)}


class _MemoryStore:
    def __init__(self):
        self.truths = {}

    def has_truth(self, case, N):
        return (case, N) in self.truths

    def get_truth(self, case, N):
        return self.truths.get((case, N))

    def put_truth(self, case, N, outs):  # on the host: a GPU's memory is what is being measured
        self.truths[(case, N)] = [t.detach().cpu() for t in outs]

    def drop(self, case):
        for key in [k for k in self.truths if k[0] == case]:
            del self.truths[key]


class InProcessRunner:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.problems: Dict[int, Problem] = {}
        self.store = _MemoryStore()

    def add_problem(self, prob: Problem) -> None:
        self.problems[prob.hidden.shape[0]] = prob

    def has_truth(self, case: Case, N: int) -> bool:
        return self.store.has_truth(case, N)

    def floor(self, Ns: List[int]) -> Dict[int, Dict[str, float]]:
        return {N: floor_ms(self.problems[N], self.settings) for N in Ns}

    def run(self, provider: str, case: Case, roles: Dict[int, str]) -> List[Outcome]:
        return run_outcomes(provider, case, roles, self.problems.__getitem__, self.store, self.settings)

    def done_with(self, case: Case) -> None:
        self.store.drop(case)  # truths of a finished case: gradients as big as the lm-head

    def close(self) -> None:
        self.problems.clear()


class IsolatedRunner:
    """Each ``run`` is one ``python -m bench.worker`` process."""

    def __init__(self, settings: Settings, root: str, threads: Optional[int] = None):
        self.settings, self.root, self.threads = settings, root, threads
        self.store = DiskStore(root)
        self._jobs = 0

    def add_problem(self, prob: Problem) -> None:
        self.store.put_problem(prob)

    def has_truth(self, case: Case, N: int) -> bool:
        return self.store.has_truth(case, N)

    def _spawn(self, job: dict, extra_env: Optional[Dict[str, str]] = None):
        self._jobs += 1
        job_path = os.path.join(self.root, f"job_{self._jobs}.json")
        result_path = os.path.join(self.root, f"result_{self._jobs}.json")
        job.update(store=self.root, settings=asdict(self.settings), threads=self.threads)
        with open(job_path, "w") as f:
            json.dump(job, f)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, env.get("PYTHONPATH")) if p)
        env.update(extra_env or {})
        proc = subprocess.run([sys.executable, "-m", "bench.worker", job_path, result_path], cwd=REPO_ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if proc.returncode != 0 or not os.path.exists(result_path):
            tail = "\n".join(proc.stdout.strip().splitlines()[-5:])
            return None, f"worker exited with status {proc.returncode}: {tail}"
        with open(result_path) as f:
            return json.load(f), None

    def floor(self, Ns: List[int]) -> Dict[int, Dict[str, float]]:
        # Here, not in a worker: GEMM times need no process of their own (no memory is reported).
        return {N: floor_ms(self.store.problem(N), self.settings) for N in Ns}

    def run(self, provider: str, case: Case, roles: Dict[int, str]) -> List[Outcome]:
        job = {"provider": provider, "case": asdict(case), "roles": {str(k): v for k, v in roles.items()}}
        result, err = self._spawn(job)
        if result is None:  # the process died (killed for memory, crashed in native code)
            status = "oom" if "status -9" in err else "error"
            return [Outcome(N, status, err) for N in sorted(roles)]
        outcomes = [Outcome(**o) for o in result]
        # Memory is weighed again in a process of its own with glibc returning large frees at once
        # (_LIVE_MEMORY_ENV); where that fails the row keeps no memory figure rather than a
        # different kind of one.
        timed = [o.N for o in outcomes if o.status == "ok"]
        if timed:
            job = {"provider": provider, "case": asdict(case), "weigh": timed}
            mems, _ = self._spawn(job, _LIVE_MEMORY_ENV)
            mems = {int(k): v for k, v in (mems or {}).items()}
            for o in outcomes:
                if o.status == "ok":
                    o.peak_mem_mib = mems.get(o.N)
        return outcomes

    def done_with(self, case: Case) -> None:
        for name in os.listdir(self.root):
            if name.startswith(f"truth_{case.loss}_{case.mode}_"):
                os.remove(os.path.join(self.root, name))

    def close(self) -> None:
        pass
