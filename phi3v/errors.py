"""Errors in what the user gave (flags, data files, folders), and how every entry point reports them.

An InputError's message says what is wrong and where (the flag, the file and line, the sample). Everything else
is a bug and keeps its traceback.

One convention for every script (the recipes, predict.py, serve.py, scripts/merge_lora.py, convert_ucf101.py):
argparse's own. A user error ends the program with one line on stderr, `<script>: error: <message>`, and exit
status 2, as `parser.error` does (which prints the usage line before it).
"""

import functools
import os
import sys
from typing import NoReturn

USER_ERROR_STATUS = 2  # argparse's


class InputError(ValueError):
    """A problem with the command line or the input files; the message is complete on one line."""


def one_line(error) -> str:
    """The message of an error (or a message) on one line, each run of whitespace one space. One raised in a
    DataLoader worker arrives wrapped in the worker's traceback: its last line is the message. An exception
    without a message (KeyError(), a bare assert) gives its type's name rather than nothing."""
    text = str(error).strip()
    if "Traceback" in text:
        text = text.splitlines()[-1].split(": ", 1)[-1]
    text = " ".join(text.split())
    if not text and isinstance(error, BaseException):
        return type(error).__name__
    return text


def program_name() -> str:
    """The script's name as argparse's messages give it (the file name of sys.argv[0])."""
    return os.path.basename(sys.argv[0])


class UserErrorExit(SystemExit):
    """The SystemExit of a user error: exit status 2; str() is the line printed, `<script>: error: <message>`."""

    def __init__(self, message):
        super().__init__(USER_ERROR_STATUS)
        self.line = f"{program_name()}: error: {one_line(message)}"

    def __str__(self) -> str:
        return self.line


def exit_with_error(message) -> NoReturn:
    """End the program on a user error: `<script>: error: <message>` (one line) on stderr, exit status 2."""
    error = UserErrorExit(message)
    print(error.line, file=sys.stderr, flush=True)
    raise error


def exit_on_input_error(main):
    """Run `main` (an entry point); an InputError ends the process the way exit_with_error does."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except InputError as error:
            exit_with_error(error)

    return wrapper
