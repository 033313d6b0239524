"""berth.jobs."""
