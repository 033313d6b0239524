"""Command-line interface: argument parsing and output. The only place that prints and exits."""
