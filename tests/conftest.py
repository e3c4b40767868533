"""Test-suite options shared by the unit and integration tests."""

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    """Add ``--soak``, which runs the tests marked ``soak``."""
    parser.addoption(
        "--soak",
        action="store_true",
        default=False,
        help="run tests marked soak (long soak and fuzz campaigns)",
    )


def pytest_collection_modifyitems(
    config: pytest.Config, items: list[pytest.Item]
) -> None:
    """Skip the tests marked ``soak`` unless ``--soak`` was given."""
    if config.getoption("--soak"):
        return

    skip_soak = pytest.mark.skip(reason="soak test: run it with pytest --soak")
    for item in items:
        if item.get_closest_marker("soak") is not None:
            item.add_marker(skip_soak)
