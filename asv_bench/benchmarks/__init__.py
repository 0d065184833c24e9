"""asv benchmarks of afpx (run from asv_bench/: ``asv run --python=same``)."""
