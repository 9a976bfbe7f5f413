"""The one user-facing error type.

Anything the user can fix (a bad recipe key, a missing file, a shape that does not fit) is raised as
`EdgekdError` with a message naming the file/key/shape and what was expected. The CLI prints it as one
line and exits with code 2; `EDGEKD_DEBUG=1` shows the traceback instead.
"""

from __future__ import annotations


class EdgekdError(Exception):
    """A problem with the user's input, reported as one line (CLI exit code 2)."""
