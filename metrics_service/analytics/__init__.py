"""Usage analytics from the stored history: the views, their HTTP routes and the report."""

from metrics_service.analytics.queries import VIEWS, Params, parse_params, run

__all__ = ["VIEWS", "Params", "parse_params", "run"]
