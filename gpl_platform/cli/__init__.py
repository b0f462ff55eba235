"""`gpl`, the command line (`main`), its benchmarks (`bench`), the end-of-run summary (`summary`), the Dagster
instance of a data directory (`instance`), and the entry point through which it reaches the orchestration
(`orchestration`)."""
