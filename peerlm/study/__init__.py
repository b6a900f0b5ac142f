"""Studies that reproduce the paper's comparisons on peerlm's models: ``isoflop`` (Table 1) and the
ablations, each a plan (``IsoflopPlan``, the ``ABLATIONS`` registry) that one ``Runner`` executes
over its ``RecordStore``."""

from peerlm.study.ablations import ABLATIONS, AblationSpec, ablation_study
from peerlm.study.design import BUDGETS, METHODS, SIZES, RunSpec
from peerlm.study.isoflop import IsoflopPlan, isoflop_study
from peerlm.study.records import RecordStore
from peerlm.study.runner import Plan, Runner

__all__ = ["ABLATIONS", "AblationSpec", "ablation_study", "IsoflopPlan", "isoflop_study", "Plan", "Runner",
           "RecordStore", "RunSpec", "BUDGETS", "METHODS", "SIZES"]
