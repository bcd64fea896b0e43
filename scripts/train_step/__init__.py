"""Helpers of ``scripts/bench_train_step.py`` (and ``scripts/bench_translate.py``): the benchmark's setups,
its component measurements and its optimisation ablations. A package beside the scripts, imported by them as
``train_step`` (a script's own directory is first on ``sys.path``), so no script patches ``sys.path``.
"""
