"""Errors in what the user gave (flags, data files, folders), and how the recipes print them: one line, no traceback.

An InputError's message says what is wrong and where (the flag, the file and line, the sample). Everything else
is a bug and keeps its traceback.
"""

import functools
import sys


class InputError(ValueError):
    """A problem with the command line or the input files; the message is complete on one line."""


def one_line(error) -> str:
    """The message of an error; one raised in a DataLoader worker arrives wrapped in the worker's traceback."""
    text = str(error).strip()
    if "Traceback" in text:
        text = text.splitlines()[-1].split(": ", 1)[-1]
    return " ".join(text.split("\n"))


def exit_on_input_error(main):
    """Run `main` (a recipe's entry point); an InputError ends the process with `error: <message>` (exit code 1)."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except InputError as error:
            sys.exit(f"error: {one_line(error)}")

    return wrapper
