"""Content-addressed image stores (user and site): blobs, SquashFS images, index, locks.

This package owns every on-disk path of a store: do not compute such paths elsewhere.
"""
