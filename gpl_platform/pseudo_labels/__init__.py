"""GPL, the method (steps 1-4 per UTC day, no Dagster here):

1. ``anchors/`` interest anchors from each user's history (SmolLM2, an OpenAI-compatible server, the
   history itself, or semantic IDs from ``semantic_ids/``), prompts from ``prompts/``; ``anchor_stages``
   runs steps 1-2 over the warehouse;
2. ``encoder`` the frozen sentence encoder (item and anchor vectors; ``vectors`` moves them in and out of DuckDB);
3. ``similarity`` max/mean-pooled cosine of each candidate to its user's anchors, and ``calibration``
   similarity -> probability, fitted per refit day by ``day_calibration``;
4. ``confidence`` the three confidence factors and the weight.

``pipeline`` runs steps 3-4 over a range of days in streamed batches of users (``batches``: what one
batch computes; ``stages``: the tables a variant writes); ``in_memory`` is the whole-range reference;
``audit`` compares pseudo-labels with later real clicks; ``model_loading`` builds the anchor generator
and the encoder from the settings, once per process.
"""
