"""The one exception tree of groupgate; each class carries its exit code.

    GroupgateError            70  internal / unexpected state
    +-- ConfigError           78  bad config file, key or value
    +-- SchemaMismatch        78  store schema behind or ahead of this release
    +-- StoreUnavailable      69  the database cannot be reached or is busy
    +-- DirectoryUnavailable  69  no directory server answered, or a search failed
    +-- BadInput              65  bad command-line argument or request value
    +-- NotPermitted          77  authentication failed or not allowed
    +-- SyncRefused           75  the safety brake refused a plan (temporary: retry with --force)

The CLI's ``main()`` is the only place that turns these into a stderr line and an exit code.
Messages are one line and never contain a secret.
"""

from __future__ import annotations

EX_DATAERR = 65
EX_UNAVAILABLE = 69
EX_SOFTWARE = 70
EX_TEMPFAIL = 75
EX_NOPERM = 77
EX_CONFIG = 78


class GroupgateError(Exception):
    exit_code: int = EX_SOFTWARE


class ConfigError(GroupgateError):
    exit_code = EX_CONFIG


class SchemaMismatch(GroupgateError):
    exit_code = EX_CONFIG


class StoreUnavailable(GroupgateError):
    """The store cannot answer; verify raises this instead of guessing an answer."""

    exit_code = EX_UNAVAILABLE


class DirectoryUnavailable(GroupgateError):
    exit_code = EX_UNAVAILABLE


class BadInput(GroupgateError):
    exit_code = EX_DATAERR


class NotPermitted(GroupgateError):
    exit_code = EX_NOPERM


class SyncRefused(GroupgateError):
    exit_code = EX_TEMPFAIL
