"""No patient data in logs or stderr, whatever the libraries print.

pydicom quotes the value it finds invalid ("Invalid value for VR UI: '1.2.3.abc'", through both
``warnings`` and its logger), highdicom quotes a single-component person name it warns about and
logs source UIDs at INFO, and exception messages from either end up in failure reasons. All of
these are values of patient data. ``install`` (run when ``bundle`` is imported, so by every config,
DataLoader worker and the PACS node) rewrites them without the values:

- every warning's text, as the ``warnings`` module formats it for stderr or for logging;
- every log record of the pydicom and highdicom loggers (and of ``py.warnings``), at creation, so
  no handler or logging config a user brings can print the original;
- ``redact`` for the failure reasons the bundle writes itself.

Once values are withheld, the warnings about 1000 files with 1000 different invalid UIDs read the same:
each such message is shown once per process (warnings, and the ``pydicom`` logger), not once per file.

Quoted text and dotted numbers of UID shape become ``<withheld>``, unless the quoted text is the name
or keyword of a DICOM attribute or UID ('Pixel Data', 'JPEG 2000'): the rest of each message
(which attribute, which VR, what was wrong) stays, so the message is still useful.
"""

from __future__ import annotations

import functools
import logging
import re
import warnings

WITHHELD = "<withheld>"
# a quoted value, as repr() and f"'{value}'" print it (str or bytes, either quote)
_QUOTED = re.compile(r"""b?'(?:[^'\\\n]|\\.)*'|b?"(?:[^"\\\n]|\\.)*\"""")
_UID_SHAPED = re.compile(r"(?<![\w.])\d+(?:\.\d+){3,}(?![\w.])")  # four or more dotted numbers: a UID
# Loggers whose messages quote attribute values; quieted ones log identifiers at INFO (UIDs)
REDACTED_LOGGERS = ("pydicom", "highdicom", "py.warnings")
QUIET_LOGGERS = {"highdicom": logging.WARNING}

_installed = False


@functools.cache
def _dictionary_terms() -> frozenset[str]:
    """Names and keywords of DICOM attributes and UIDs: what a message may quote that is not a value."""
    from pydicom.datadict import DicomDictionary
    from pydicom.uid import UID_dictionary

    attributes = {term for entry in DicomDictionary.values() for term in (entry[2], entry[4])}
    uids = {term for entry in UID_dictionary.values() for term in (entry[0], entry[4])}
    return frozenset(attributes | uids)


def _withheld(match: re.Match) -> str:
    quoted = match.group(0).removeprefix("b")
    return match.group(0) if quoted[1:-1] in _dictionary_terms() else WITHHELD


def redact(text: str) -> str:
    """``text`` with quoted values and UID-shaped numbers replaced by ``<withheld>``."""
    return _UID_SHAPED.sub(WITHHELD, _QUOTED.sub(_withheld, text))


def _redacted_logger(name: str) -> bool:
    return any(name == root or name.startswith(root + ".") for root in REDACTED_LOGGERS)


class _Once(logging.Filter):
    """Pass each (already redacted) message once."""

    def __init__(self):
        super().__init__()
        self.seen: set[tuple[int, str]] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.levelno, record.getMessage())
        if key in self.seen:
            return False
        self.seen.add(key)
        return True


def install() -> None:
    """Rewrite warnings and the records of ``REDACTED_LOGGERS`` without values, for this process (idempotent)."""
    global _installed
    if _installed:
        return
    _installed = True
    format_warning = warnings.formatwarning

    def formatwarning(message, category, filename, lineno, line=None):
        return format_warning(redact(str(message)), category, filename, lineno, line)

    warnings.formatwarning = formatwarning  # used by the default stderr output and logging.captureWarnings
    show_warning, shown = warnings.showwarning, set()

    def showwarning(message, category, filename, lineno, file=None, line=None):
        key = (redact(str(message)), category, filename, lineno)
        if key not in shown:
            shown.add(key)
            show_warning(message, category, filename, lineno, file, line)

    warnings.showwarning = showwarning
    make_record = logging.getLogRecordFactory()

    def record_factory(*args, **kwargs) -> logging.LogRecord:
        record = make_record(*args, **kwargs)
        if _redacted_logger(record.name):
            try:
                text = record.getMessage()
            except Exception:  # a malformed library message: keep its template only
                text = str(record.msg)
            record.msg, record.args = redact(text), None
            if record.exc_info and record.exc_info[1] is not None:
                record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
                record.exc_info = None
        return record

    logging.setLogRecordFactory(record_factory)
    logging.getLogger("pydicom").addFilter(_Once())  # pydicom logs each invalid value it warns about
    for name, level in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
