"""Elastic pipeline planning: which submodel, which bitwidth per shard, what to preload.

    plan.py     the Plan (request, choice, prediction), its JSON, `simulate`, `explain`
    problem.py  one request's inputs, validated once; a decision assembled into a Plan
    paper.py    the paper's planner (STI's two stages), made monotone
    joint.py    our joint planner: families of plans independent of T and M
    bounds.py   upper bounds that make the joint search exact over its families
    kernels.py  the numba inner loops both planners share
    make.py     `make_plan`: the entry point, headroom, infeasibility reports
    streamed.py the best streaming around a preload buffer already chosen
    lengths.py  length-aware plans: a `PlanSet`, one plan per length bucket, one buffer
    rows.py     the split of M between resident embedding rows and the preload buffer

Both planners are monotone (a larger T or M never lowers the predicted accuracy): each
result is the best member, among those that fit (T, M), of a set of plans that does not
depend on (T, M). The execution model they predict, and both planners in full, are in
docs/PLANNER.md (docs/DESIGN.md tells the story once, for users).
"""

from .lengths import Bucket, PlanSet, explain_set, make_plan_set
from .make import make_plan
from .rows import make_plan_set_with_rows
from .plan import (PLAN_VERSION, PLANNERS, LayerTiming, Plan, PlanChoice, PlanError, PlanPrediction,
                   PlanRequest, explain, simulate)

__all__ = ["Bucket", "LayerTiming", "PLANNERS", "PLAN_VERSION", "Plan", "PlanChoice", "PlanError", "PlanPrediction",
           "PlanRequest", "PlanSet", "explain", "explain_set", "make_plan", "make_plan_set",
           "make_plan_set_with_rows", "simulate"]
