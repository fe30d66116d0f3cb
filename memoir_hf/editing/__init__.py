"""editing."""
