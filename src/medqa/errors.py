"""User-facing errors. The CLI prints their message as one paragraph, without a traceback."""


class MedqaError(Exception):
    """An error the user can fix; its message names the file, the record and what to do."""


class ConfigError(MedqaError, ValueError):
    """A bad config file, key, type or value."""


class DataError(MedqaError):
    """Input data that cannot be read at all (record-level problems go to rejected.jsonl instead)."""


class Interrupted(MedqaError):
    """Stopped on request (Ctrl-C, a notebook's stop button) after saving what can be resumed."""


class ModelError(MedqaError):
    """A model or tokenizer that cannot be loaded, or does not match the tokenized data."""
