"""What every other file needs, at the bottom of the import stack.

    InputError        bad input from the user: the command line prints its message as one line
                      and exits with status 2 -- never a traceback
    read_text_file    a whole UTF-8 file, or an InputError naming the line of the first bad byte
    write_atomic      a file written whole or not at all (temporary file, fsync, rename),
                      errors as OSError
    verify_records    a zip archive's (a checkpoint's) CRC-32 of every record checked,
                      or an InputError
    label conventions IGNORE_INDEX, IS_NEXT, NOT_NEXT: BERT's and `transformers`' own values
"""

import contextlib
import os
import tempfile
import zipfile

# Label conventions, the same as BERT's original code and `transformers`:
IGNORE_INDEX = -100  # MLM label at positions that were not selected for prediction
IS_NEXT, NOT_NEXT = 0, 1  # NSP labels: 0 = B really follows A, 1 = B is from another document


class InputError(Exception):
    """Bad input from the user (a file, a flag, a checkpoint). The command line prints the
    message as one line and exits with status 2 -- never a traceback."""


def read_text_file(path):
    """A whole UTF-8 file as a string. Undecodable bytes are an error naming the byte offset
    (we refuse rather than silently replace: a wrong encoding usually means a wrong file)."""
    if not os.path.exists(path):
        raise InputError(f"{path}: no such file")
    if os.path.isdir(path):
        raise InputError(f"{path}: is a folder, expected a file")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise InputError(f"{path}:{line}: byte {error.start} is not valid UTF-8 "
                         f"(expected UTF-8 text)") from None


# ----------------------------------------------------------------------------------------
# Writing a file: whole or not at all, never through a link, never leaving debris
# ----------------------------------------------------------------------------------------

MARKER = ".ptft-run"  # in every folder ptft makes for its output: --force deletes only such folders
TEMPORARY_SUFFIX = ".ptft-partial"  # every file being written is named .NAME.<random>.ptft-partial
UMASK = os.umask(0o022)  # read once (os.umask can only be read by setting it), then put back
os.umask(UMASK)


class RecordingFile:
    """A binary file that remembers the first error its write() raised. torch.save and numpy
    write through it and wrap that error in their own (a RuntimeError "unexpected pos ..."):
    write_temporary reports the error underneath -- "No space left on device", not the wrapper."""

    def __init__(self, raw):
        self.raw, self.error = raw, None

    def write(self, data):
        try:
            return self.raw.write(data)
        # ENOSPC, EIO, ... and a KeyboardInterrupt arriving mid-write
        except BaseException as error:
            self.error = self.error or error
            raise

    def flush(self):
        self.raw.flush()

    def tell(self):
        return self.raw.tell()

    def seek(self, *args):
        return self.raw.seek(*args)

    def seekable(self):
        return self.raw.seekable()

    def read(self, *args):  # never called: numpy.savez asks for it only to tell a file from a path
        return self.raw.read(*args)


def write_temporary(path, write):
    """write(file) into a new temporary file beside `path`, flushed to disk; returns its name
    (commit it with os.replace(temporary, path)). The name is random and created exclusively
    (mkstemp: O_CREAT | O_EXCL, which never follows a symbolic link planted under that name).
    On any failure the temporary file is removed and the error is re-raised as it happened:
    an OSError naming `path` (ENOSPC, EIO, EROFS -- the command line prints it as one line,
    exit status 2) or the KeyboardInterrupt itself."""
    folder, name = os.path.split(os.path.abspath(path))
    temporary, raw, recorder = None, None, None
    try:
        descriptor, temporary = tempfile.mkstemp(dir=folder, prefix=f".{name}.",
                                                 suffix=TEMPORARY_SUFFIX)
        # mkstemp makes it 0600; the file gets what open() would give
        os.fchmod(descriptor, 0o666 & ~UMASK)
        raw = os.fdopen(descriptor, "wb")
        recorder = RecordingFile(raw)
        write(recorder)
        raw.flush()
        os.fsync(raw.fileno())
        raw.close()
        return temporary
    except BaseException as error:
        if raw is not None:
            with contextlib.suppress(OSError):
                raw.close()
        if temporary is not None:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
        cause = (recorder.error if recorder is not None else None) or error
        if isinstance(cause, OSError):
            raise OSError(cause.errno, cause.strerror or str(cause), path) from None
        if isinstance(cause, KeyboardInterrupt):
            raise KeyboardInterrupt from None
        raise


def write_atomic(path, write):
    """Atomic write: write(file) into a temporary file beside `path`, flushed to disk, then
    renamed over `path` -- a crash at any moment leaves the old file or the new one, whole.
    A symbolic link at `path` is replaced, its target never written."""
    os.replace(write_temporary(path, write), path)


def write_text_atomic(path, text):
    write_atomic(path, lambda f: f.write(text.encode("utf-8")))


def verify_records(path, required=True):
    """Integrity: a checkpoint.pt is a zip archive (torch.save's format) that stores a CRC-32
    of every record -- the pickled metadata (vocabulary, settings, RNG states) and each tensor.
    torch.load never checks them; this does, reading every record once. One flipped bit in
    the file is then refused, or (a bit in a field nothing reads) loads exactly as written --
    tests/test_reliability.py flips random bits to hold it to that. A file that is not a zip
    archive (torch's legacy format, e.g. an old pytorch_model.bin) is refused when `required`."""
    try:
        if not zipfile.is_zipfile(path):
            if required:
                raise InputError(f"{path}: not a ptft checkpoint (not the zip archive "
                                 f"torch.save writes; truncated or damaged?)")
            return
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()  # reads every record, compares its CRC-32
    except InputError:
        raise
    except Exception as error:  # BadZipFile, zlib.error, a record header pointing nowhere, ...
        raise InputError(f"{path}: damaged ({str(error)[:120] or type(error).__name__}); "
                         f"it fails its integrity check") from None
    if damaged is not None:
        raise InputError(f"{path}: damaged: record {damaged} fails its CRC-32 check "
                         f"(the file changed after it was written)")
