"""sti's own exception types.

Every error a user can cause or meet (bad input, a missing asset, a corrupt store)
is one of these, so the CLI can print one readable line and exit non-zero instead of
a traceback. The message always names the problem and, where there is one, the fix.
"""


class StiError(Exception):
    """Base class of every error sti raises on purpose."""

    exit_code = 1


class AssetError(StiError):
    """A model or data asset could not be fetched, or failed its checksum."""


class DataError(StiError):
    """A data set file is missing, malformed, or a split name is unknown."""


class ConfigError(StiError):
    """A model configuration or a submodel specification is invalid."""


class StoreError(StiError):
    """A store is missing, malformed, truncated or corrupt (the message names file and record)."""


class InputError(StiError):
    """A request or a command-line value is invalid (empty text, bad number, ...)."""

    exit_code = 2


class Cancelled(StiError):
    """Long work was cancelled by the user (Ctrl-C or a progress callback)."""

    exit_code = 130
