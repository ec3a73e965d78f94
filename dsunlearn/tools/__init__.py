"""Tools around the trainer: the step benchmark against the paper's loop (``bench_step``), the grid sweep over the
objective's weights (``sweep``) and the demo builder (``demo``).

May import every room below it; never the trainer (``train``) or the command line (``__main__``).
"""
