"""One exception family, so the CLI and the service can turn any of them into a one-line message."""


class SSPSamError(RuntimeError):
    """Base class: something the user can fix (a file, a name, an input), not a bug."""


class ImageLoadError(SSPSamError):
    """The image file is missing, unreadable, corrupt or of an unsupported kind."""


class ImageTooLargeError(ImageLoadError):
    """The image has more pixels than the configured limit (decompression-bomb guard)."""


class TextError(SSPSamError):
    """A phrase is empty, too long, or not text."""


class CheckpointError(SSPSamError):
    """A checkpoint file is missing, truncated, corrupt, or does not fit the model."""


class ConfigError(SSPSamError):
    """A model config is missing or malformed."""


class ModelOutputError(SSPSamError):
    """The model produced non-finite outputs (NaN/inf): its weights are damaged."""


class OutputError(SSPSamError):
    """An output could not be written (disk full, no permission, a file where a folder should be)."""


def one_line(text: object) -> str:
    """A message as one line: user text (file names, phrases) may hold newlines or markup-like brackets."""
    return " ".join(str(text).split())


class MissingExtraError(SSPSamError, ImportError):
    """An optional dependency is not installed; the message names the pip extra. Also an
    ImportError, so ``except ImportError`` in a caller's fallback code still catches it."""


class OptionError(SSPSamError, ValueError):
    """An option's value is out of range (a learning rate of NaN, zero steps, an unknown precision).
    Also a ValueError, which the training API raised for these before they were named."""


class WorkLimitError(SSPSamError):
    """A request would make the model do more work than the configured bound (classes × image
    views × the model's per-class cost): refused before any of it runs, so a long class list
    answers at once instead of holding the process or the server past its timeout."""
