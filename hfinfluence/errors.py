"""Exception classes. Each subclasses the builtin a caller would naturally catch."""


class InfluenceError(Exception):
    """Base class for every error hfinfluence raises on purpose."""


class ConfigError(InfluenceError, ValueError):
    """An `InfluenceConfig` field or a combination of fields is invalid."""


class NoTrackableModuleError(InfluenceError, ValueError):
    """The model (or the `modules` patterns) selects no module the engine can track."""


class UnsupportedModuleError(InfluenceError, NotImplementedError):
    """A selected module is of a kind whose per-example gradient the engine cannot capture."""


class SharedModuleError(InfluenceError, ValueError):
    """A tracked module is tied to another or called more than once per forward pass."""


class EmptyInputError(InfluenceError, ValueError):
    """A batch list, dataset or batch holds nothing the engine can use."""


class NonFiniteError(InfluenceError, FloatingPointError):
    """A factor, gradient or score is NaN or infinite."""


class NotFittedError(InfluenceError, RuntimeError):
    """A method needs `fit` (or `set_target`) to have run first."""


class ConfigMismatchError(InfluenceError, ValueError):
    """Saved state was produced by a different configuration than the one in use."""


class SourceNotFoundError(InfluenceError, FileNotFoundError):
    """A model or dataset source (local path, bundled file, Hub id, split) cannot be found or reached."""


class DataFormatError(InfluenceError, ValueError):
    """Data, a tokenizer or a formatting option does not fit the requested loading or formatting step."""


class MissingColumnError(DataFormatError):
    """A row lacks a column the formatting step was told to read; the message lists the columns it has.

    A `ValueError` rather than a `KeyError`, so the message prints as written.
    """


class OutputFolderError(InfluenceError, FileExistsError):
    """An output folder cannot be used: it is foreign, overlaps an input, or another run is writing to it."""


class PushToHubError(InfluenceError, ConnectionError):
    """Uploading results to the Hugging Face Hub cannot start (offline, no login) or failed."""
