"""Multi-process and multi-node runs: coordinator and worker daemons."""
