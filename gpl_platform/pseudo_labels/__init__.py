"""GPL, the method (steps 1-4 per UTC day, no Dagster here):

1. ``anchors/`` interest anchors from each user's history (SmolLM2, an OpenAI-compatible server, the
   history itself, or semantic IDs from ``semantic_ids/``), prompts from ``prompts/``; ``anchor_stages``
   runs steps 1-2 over the warehouse;
2. ``encoder`` the frozen sentence encoder (item and anchor vectors; ``vectors`` moves them in and out of DuckDB);
3. ``similarity`` max/mean-pooled cosine of each candidate to its user's anchors, and ``calibration``
   similarity -> probability, fitted per refit day by ``day_calibration``;
4. ``confidence`` the three confidence factors and the weight.

``chain`` (:class:`~gpl_platform.pseudo_labels.chain.LabellingChain`) runs the stages over a range of days, one
method per stage, each returning a frozen result (``stage_results``); ``pipeline`` runs steps 3-4 in streamed
batches of users (``batches``: what one batch computes; ``label_report``: the degenerate-day rule and the
statistics of the labels; ``stages``: the tables a variant writes and the settings the stages read); ``audit``
compares pseudo-labels with later real clicks; ``model_loading`` builds the anchor generator and the encoder
from the settings, once per process. The whole-range reference the streaming stages are tested against is
tests/pseudo_labels/reference_labels.py.
"""
