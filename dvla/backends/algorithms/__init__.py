"""Built-in algorithm backends."""
