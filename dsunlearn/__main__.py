"""``python -m dsunlearn <command>`` (also installed as the ``dsunlearn`` command).

    train      unlearn a model (the same as ``deepspeed dsunlearn/train.py``); see ``train --help``
    eval       evaluate an unlearned model against the original; see ``eval --help``
    compare    put several saved evaluations (eval.json) side by side in one report
    make-demo  build the embedded demo's "original" model (tiny Llama taught the demo data)
    bench      benchmark the fused loss implementations; see ``bench --help``
    bench-step benchmark a whole unlearning step against the paper's loop (``python -m dsunlearn.tools.bench_step``)
    relearn    fine-tune a model on part of the forget data and measure how fast the behaviour returns
    sweep      a grid over the objective's weights and lr, one run each, and the forgetting/utility Pareto front
    methods    the unlearning methods (yao, ga, graddiff, npo, simnpo) side by side on the demos, with relearning
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Optional


def runs_a_watchdog(command: str) -> bool:
    """Whether ``command``'s process runs the watchdog (runtime/distributed.py), which takes SIGTERM in a thread of its
    own: ``train`` always, ``eval`` on several ranks (WORLD_SIZE > 1; one process has none)."""
    return command == "train" or (command == "eval" and int(os.environ.get("WORLD_SIZE", "1")) > 1)


def main(argv: Optional[list[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and runs_a_watchdog(argv[0]):
        # Before anything imports torch: numpy's OpenBLAS starts its threads at import, and a thread that leaves
        # SIGTERM unblocked takes it and dies with the whole process (-15) instead of the watchdog saving the step
        # (why at length: train.py). Only for commands with a watchdog: in others a blocked SIGTERM would be lost.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        raise SystemExit(0 if argv else 2)
    command, rest = argv[0], argv[1:]
    if command == "train":
        from dsunlearn.train import main as run
    elif command == "eval":
        from dsunlearn.eval.evaluation import main as run
    elif command == "compare":
        from dsunlearn.eval.report import main as run
    elif command == "make-demo":
        from dsunlearn.tools.demo import main as run
    elif command == "bench":
        from dsunlearn.kernels.bench import main as run
    elif command == "bench-step":
        from dsunlearn.tools.bench_step import main as run
    elif command == "relearn":
        from dsunlearn.eval.relearn import main as run
    elif command == "sweep":
        from dsunlearn.tools.sweep import main as run
    elif command == "methods":
        from dsunlearn.tools.methods import main as run
    else:
        print(f"dsunlearn: unknown command {command!r}\n{__doc__}", file=sys.stderr)
        raise SystemExit(2)
    run(rest)
    if command == "train":  # skip the interpreter's teardown after a clean end, as train.py does (why: see there)
        from dsunlearn.runtime import distributed

        distributed._exit(distributed.EXIT_OK)


if __name__ == "__main__":
    main()
