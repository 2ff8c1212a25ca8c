"""oss-loadtest: load generation, honest metrics, SLO search and capacity planning."""
