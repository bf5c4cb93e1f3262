"""Reading the refer toolkit's ``refs(*).p`` pickles without letting them run code.

A pickle can name any importable callable (``os.system``, ``subprocess.Popen``…) and the stock
unpickler calls it; a downloaded dataset is untrusted input. The refer files hold only lists,
dicts, strings and numbers, which pickle stores with opcodes that import nothing, so an
unpickler that refuses every global loses nothing those files need.
"""

from __future__ import annotations

import io
import pickle

from sspsam.data import DatasetLayoutError

# Python 2 pickles of plain containers can name these; nothing in them executes user code.
_ALLOWED = {
    ("builtins", "set"), ("builtins", "frozenset"), ("__builtin__", "set"), ("__builtin__", "frozenset"),
    ("builtins", "complex"), ("__builtin__", "complex"),
}


class RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED:
            return super().find_class("builtins", name)
        raise pickle.UnpicklingError(f"it names {module}.{name}, which a refs pickle never holds (refused: it could run code)")

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("it uses persistent ids, which a refs pickle never holds")


def safe_load(data: bytes, what: str):
    """Unpickle plain data (Python 2 strings as str, via latin-1 where not ASCII) or raise DatasetLayoutError."""
    last = None
    for encoding in ("ASCII", "latin1"):
        try:
            return RestrictedUnpickler(io.BytesIO(data), encoding=encoding).load()
        except UnicodeDecodeError as exc:
            last = exc
            continue
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
                MemoryError, RecursionError, OverflowError, ImportError) as exc:
            raise DatasetLayoutError(f"{what} is not a refs pickle ({type(exc).__name__}: {str(exc)[:200]})") from None
    raise DatasetLayoutError(f"{what} is not a refs pickle ({last})")
