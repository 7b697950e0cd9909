"""The verbs behind `distill <verb>` (eval, export, cache, bench, viz) and `make demo`: each takes keyword arguments,
prints its progress and result, and reports user mistakes as `distill.errors.UserError`."""
