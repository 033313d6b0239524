"""Data staging: S3 objects, https URLs and host files into a job's directory before its
container starts, and its results out after it ends (issue 7, docs/staging.md).

Modules: ``locations`` (pure: SRC:DEST syntax), ``profiles`` (endpoints and credentials from
the user's own files, never recorded), ``transfer`` (planning, verified transfers, summaries).
The S3 library (obstore) is imported only when a transfer runs: ``berth run`` and
``berth submit`` without staging never pay for it. This package sits below ``jobs`` and beside
``runtime``: it never imports either.
"""
