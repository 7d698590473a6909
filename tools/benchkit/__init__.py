"""The jobd benchmark (`just bench`): environment, load-generating workers, the grpcio peer,
the cases and the report. Run through tools/bench.py; see docs/BENCHMARKS.md."""
