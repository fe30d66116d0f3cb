"""Errors raised for user mistakes. Every message says what to do next."""


class MemoirError(Exception):
    """Base class of every error memoir_hf raises on bad input or misuse."""


class MemoirConfigError(MemoirError, ValueError):
    """A MemoirConfig value is out of range or of the wrong type."""


class UnsupportedModelError(MemoirError):
    """The model family is not in the registry, or its layout is not what the registry expects."""


class PatchError(MemoirError):
    """Patching was refused: already patched, bad layer, or the model was unpatched."""


class EditInputError(MemoirError, ValueError):
    """A prompt, target or metadata passed to edit() is unusable."""


def first_line(error: BaseException, default: str = "") -> str:
    """The first line of an error's message (``default`` when it has none): what a one-line report shows."""
    text = str(error).strip()
    return text.splitlines()[0] if text else default
