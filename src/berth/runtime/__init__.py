"""berth.runtime."""
