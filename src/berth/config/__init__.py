"""Settings, site policy and container templates: loading with provenance, validation."""
