"""One provider in a process of its own: ``python -m bench.worker JOB RESULT``.

``JOB`` is a JSON file written by :class:`bench.runner.IsolatedRunner`; the outcomes are written
to ``RESULT`` as JSON. Not meant to be run by hand.
"""

from __future__ import annotations

import json
import sys

import torch

from .measure import Settings
from .providers import Case
from .runner import DiskStore, run_outcomes, weigh_outcomes


def main(argv) -> int:
    job_path, result_path = argv
    with open(job_path) as f:
        job = json.load(f)
    if job.get("threads"):
        torch.set_num_threads(job["threads"])
    settings = Settings(**job["settings"])
    store = DiskStore(job["store"], settings.device)
    case = Case(**job["case"])
    if "weigh" in job:  # memory only (runner.IsolatedRunner.run)
        result = weigh_outcomes(job["provider"], case, job["weigh"], store.problem, settings)
    else:
        roles = {int(k): v for k, v in job["roles"].items()}
        result = [o.to_dict() for o in run_outcomes(job["provider"], case, roles, store.problem, store, settings)]
    with open(result_path, "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
