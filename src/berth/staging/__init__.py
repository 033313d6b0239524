"""berth.staging."""
