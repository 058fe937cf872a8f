"""``evolve`` against the obvious loop: the locator run once per checkpoint, by hand.

    .venv/bin/python benchmarks/bench_evolve.py --run RUN [--analysis recall,circuit]
        [--checkpoints all] [--limit 4] [--threads 1] [--json out.json]

RUN is an ``engram train`` run with checkpoints (24 with the default ``--checkpoints dense:24``).
Both sides analyse the same facts (the run's world, ``--limit`` per attribute) on the same
checkpoints with the same settings:

* loop: for every checkpoint, load it (``load_model``), run each locator (``find``), save the
  result into a fresh directory - what a user scripting the locators would do;
* evolve: ``dynamics.evolve.evolve`` into a fresh directory, with its extras switched off that the
  loop does not do (no transplant matrix), but with what it always does: the circuit pairs frozen
  on the final checkpoint (one more model load), the comparisons over time, the change points.

Target: evolve / loop <= 1.2. Run it on an idle machine; the ratio is what to compare.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, type=Path)
    ap.add_argument("--analysis", default="recall,circuit")
    ap.add_argument("--checkpoints", default="all")
    ap.add_argument("--limit", type=int, default=4, help="facts per attribute")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    import torch

    from engramlab.cli.evolve import locator_settings
    from engramlab.cli.options import Settings
    from engramlab.dynamics.evolve import Checkpoints, evolve, freeze_pairs, select_steps, world_facts
    from engramlab.locate import get_locator, select
    from engramlab.locate.configs import LOCATOR_CONFIGS
    from engramlab.models.loading import list_checkpoints, load_model

    torch.set_num_threads(args.threads)
    names = [a for a in args.analysis.split(",") if a]
    base = locator_settings({n: Settings(LOCATOR_CONFIGS[n], prefix=f"{n}.") for n in names})
    configs = dict(base)
    facts = select(world_facts(args.run), None, args.limit)
    steps = select_steps(args.checkpoints, list(list_checkpoints(args.run)))
    work = Path(tempfile.mkdtemp(prefix="bench-evolve-"))
    try:
        # The loop also needs the frozen pairs to run circuits on checkpoints that know nothing yet.
        if "circuit" in names:
            freeze_pairs(Checkpoints(args.run, "float32", "cpu"), facts, configs["circuit"], steps,
                         work / "pairs.jsonl", print)
            configs["circuit"] = replace(configs["circuit"], pairs=str(work / "pairs.jsonl"))
        t0 = time.perf_counter()
        for step in steps:
            lm = load_model(f"{args.run}:{step}")
            for name in names:
                try:
                    result = get_locator(name).find(lm, facts, configs[name])
                except Exception as e:  # what evolve lists in skipped.jsonl
                    print(f"loop: step {step} {name}: {e}")
                    continue
                result.save(work / "loop" / str(step) / name)
        loop = time.perf_counter() - t0
        t0 = time.perf_counter()  # evolve freezes its own pairs, as it always does
        evolve(args.run, work / "evolve", names, facts, steps, configs=base, transplant=0)
        evolved = time.perf_counter() - t0
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = {"run": str(args.run), "analysis": names, "n_checkpoints": len(steps), "n_facts": len(facts),
           "loop_seconds": round(loop, 2), "evolve_seconds": round(evolved, 2), "ratio": round(evolved / loop, 3)}
    print(json.dumps(out, indent=1))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
