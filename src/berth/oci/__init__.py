"""Pure OCI model code: references, digests, media types, manifests, runtime spec.

Nothing here does I/O or imports any other part of berth (an import-linter contract checks it).
"""
