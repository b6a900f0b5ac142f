"""The one exception type of the data pipeline.

Every failure a user can fix (a missing client, a checksum mismatch, an empty or binary file, a bad
option) is raised as `DataError` with a one-line message that says what was wrong and what to do. The
command line prints it without a traceback; anything else escaping is a bug.
"""

from __future__ import annotations


class DataError(Exception):
    """A user-fixable problem with data: fetch, read, prepare or load."""
