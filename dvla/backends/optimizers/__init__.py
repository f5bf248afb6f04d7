"""Built-in optimizer backends."""
