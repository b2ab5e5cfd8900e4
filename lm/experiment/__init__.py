"""Studies: a grid of runs declared once, launched anywhere, reported as tables and plots.

`experiments/NAME/study.py` defines `get_study() -> Study` from these pieces; the command
line is `python -m lm.experiment {launch,status,report} experiments/NAME`.
"""

from lm.experiment.study import Grid, Report, Run, Stage, Study, Zip, expand, load_study

__all__ = ["Grid", "Report", "Run", "Stage", "Study", "Zip", "expand", "load_study"]
