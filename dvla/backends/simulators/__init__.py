"""Built-in simulator backends."""
