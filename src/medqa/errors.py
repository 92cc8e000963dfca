"""User-facing errors. The CLI prints their message as one paragraph, without a traceback."""


class MedqaError(Exception):
    """An error the user can fix; its message names the file, the record and what to do."""


class ConfigError(MedqaError, ValueError):
    """A bad config file, key, type or value."""


class DataError(MedqaError):
    """Input data that cannot be read at all (record-level problems go to rejected.jsonl instead)."""


class Interrupted(MedqaError):
    """Stopped on request (Ctrl-C, a notebook's stop button, SIGTERM) after saving what can be resumed. `signum`:
    the signal that asked (the CLI exits with 128 + it: 130 for Ctrl-C, 143 for SIGTERM)."""

    def __init__(self, message: str, signum: int = 2):
        super().__init__(message)
        self.signum = signum


class ModelError(MedqaError):
    """A model or tokenizer that cannot be loaded, or does not match the tokenized data."""
