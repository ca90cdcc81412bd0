"""The server side of each benchmark path, each run as a separate process by ``benchmarks.run``."""
