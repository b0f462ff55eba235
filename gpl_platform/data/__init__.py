"""The data stage: the data contract (``contract``), the sources (``sources``: MovieLens-100K, the simulator,
contract directories) with their exposure policies and sampling, the DuckDB warehouse (``warehouse``),
ingestion into it (``ingestion``), dataset statistics and export (``stats``) and the shared errors."""
