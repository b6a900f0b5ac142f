"""Studies that reproduce the paper's comparisons on peerlm's models: ``isoflop`` (Table 1)."""

from peerlm.study.design import BUDGETS, METHODS, SIZES, RunSpec
from peerlm.study.isoflop import Study

__all__ = ["Study", "RunSpec", "BUDGETS", "METHODS", "SIZES"]
