"""What every other file needs, at the bottom of the import stack.

    InputError        bad input from the user: the command line prints its message as one line
                      and exits with status 2 -- never a traceback
    read_text_file    a whole UTF-8 file, or an InputError naming the line of the first bad byte
    label conventions IGNORE_INDEX, IS_NEXT, NOT_NEXT: BERT's and `transformers`' own values
"""

import os

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
        raise InputError(f"{path}:{line}: byte {error.start} is not valid UTF-8 (expected UTF-8 text)") from None
