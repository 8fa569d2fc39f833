"""Planners that return plans: GMACs (flops), budgets (budget), configuration specs, build_plan, policies."""
