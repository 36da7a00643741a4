"""abliteration."""
