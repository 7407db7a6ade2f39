"""Error types: every user-facing failure is a MoelabError with an actionable message.

Subclasses say which stage failed; messages say what was wrong, what was expected and where.
"""


class MoelabError(Exception):
    """Base class of all errors moelab raises on purpose."""


class ConfigError(MoelabError, ValueError):
    """A configuration value is invalid (names the parameter, the value and what is allowed)."""


class InputError(MoelabError, ValueError):
    """A tensor or array given to moelab has the wrong shape, dtype or contents (e.g. NaN)."""


class DataError(MoelabError):
    """A corpus, tokenizer or data file is missing, empty, unreadable or malformed."""


class ModelError(MoelabError):
    """A model cannot be loaded, is of an unsupported family, or does not match a store/trace."""


class TraceError(MoelabError):
    """A trace store is missing, corrupt, truncated or does not match the model resuming it."""


class AnalysisError(MoelabError):
    """An analysis cannot run on the given trace (empty, lacking logits, unknown token)."""


class PredictorError(MoelabError):
    """A predictor is misused (not fitted, wrong horizon, trace lacks what it needs)."""


class OffloadError(MoelabError):
    """Expert store / cache / prefetch misuse (capacity too small, missing or truncated file)."""
