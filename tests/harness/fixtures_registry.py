"""pytest fixtures: registry (see docs/contracts.md "tests/harness").

- ``registry``: anonymous registry for the whole session (images are pushed here).
- ``auth_registry``: htpasswd basic auth; ``.username`` / ``.password``.
- ``token_registry``: bearer-token auth with a token server; ``.username`` / ``.password``,
  ``.token_server.issued`` lists the scopes granted.
- ``fresh_registry``: function-scoped factory ``fresh_registry(auth="none"|"basic"|"token")``
  for a test that needs an empty registry of its own (deleted at the end of the test).

All yield :class:`tests.harness.registry.Registry` (``.host`` = ``127.0.0.1:PORT``, ``.url``).
"""

from __future__ import annotations

import pytest

from tests.harness.registry import Registry, start_registry


@pytest.fixture(scope="session")
def registry() -> Registry:
    server = start_registry(auth="none")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def auth_registry() -> Registry:
    server = start_registry(auth="basic", username="berthuser")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def token_registry() -> Registry:
    server = start_registry(auth="token", username="tokenuser")
    yield server
    server.stop()


@pytest.fixture
def fresh_registry():
    started: list[Registry] = []

    def start(auth: str = "none", **kwargs) -> Registry:
        server = start_registry(auth=auth, **kwargs)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()
