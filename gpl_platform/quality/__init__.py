"""Quality gates (no Dagster here): ``thresholds`` (the bounds, from the settings), ``results`` (what a
suite returns), ``gx_validation`` (the Great Expectations plumbing), ``suites`` (events, anchors,
embeddings, pseudo-labels) and ``gate`` (the suites re-run over the warehouse for consumers)."""
