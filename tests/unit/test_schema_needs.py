"""Each history schema version says which version this code needs while it is the latest."""

from dispatcher.history.schema import MIGRATIONS, NEEDS


def test_every_migration_has_its_needs_row_and_needs_no_later_version() -> None:
    """A version added without its row would be a KeyError in every process's start-up
    check (`require_needed`); a row may only point back, never past its own version."""
    versions = [version for version, _ in MIGRATIONS]
    assert set(NEEDS) == set(versions)
    assert all(NEEDS[version] <= version for version in versions)
    assert NEEDS[versions[-1]] in versions
