"""Exceptions a user can act on: each message says what was wrong and how to fix it."""


class RewardError(Exception):
    """Base class for errors raised by the rewards package."""


class UnknownRewardError(RewardError, KeyError):
    """The requested reward name is not registered."""

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return str(self.args[0]) if self.args else ""


class InputError(RewardError, ValueError):
    """Images or prompts do not meet the protocol (shape, dtype, range, count)."""


class MissingFileError(RewardError, FileNotFoundError):
    """A checkpoint, config or tokenizer file could not be found locally or on the hub."""


class CorruptCheckpointError(RewardError, ValueError):
    """A checkpoint file exists but cannot be read (truncated, wrong format)."""


class UnsafeCheckpointError(RewardError, ValueError):
    """A pickled checkpoint holds objects other than tensors and plain containers."""


class CheckpointMismatchError(RewardError, ValueError):
    """A checkpoint's keys or shapes do not fit the model it is loaded into."""
