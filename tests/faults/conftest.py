"""The fault tests reuse the integration tests' cached training runs."""

from tests.integration.conftest import run  # noqa: F401  (a fixture)
