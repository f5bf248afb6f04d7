"""Built-in model backends and the pieces they share (action and text tokenisers)."""
