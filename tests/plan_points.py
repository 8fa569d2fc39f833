"""``point(...)``: a ``Point`` from the values the tests once gave ``PruneConfig`` / ``SweepConfig``
(``Point.from_spec``: criterion spec, keep rate, α, locations, fusion, options; budget, adaptive)."""

from renyiprune.planning.points import Point

point = Point.from_spec
