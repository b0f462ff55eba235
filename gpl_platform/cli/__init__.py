"""`gpl`, the command line (`main`), its benchmarks (`bench`) and the end-of-run summary (`summary`)."""
