"""berth.image."""
