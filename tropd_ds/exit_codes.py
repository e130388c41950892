"""The exit statuses of tropd-ds's commands (no heavy imports: `tropd-ds --help` and `--version` stay quick)."""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    """How a run ends: its process's exit status on every rank (the launcher reports the first ended rank's;
    128 + n when signal n ended the process while nothing would be lost)."""

    OK = 0
    DOES_NOT_FIT = 1  # tropd-ds plan: the run does not fit the hardware it was given
    CONFIG = 2  # a configuration or input error, named (before any engine when it can be)
    IO = 3  # a write that failed: a full disk, a checkpoint that cannot be saved or verified, the export
    NON_FINITE = 4  # more non-finite steps in a row than optim.max_bad_steps
    COLLECTIVE = 5  # a collective timed out, or lost its peer
    TEACHER = 6  # the teacher service did not answer within teacher.wait_minutes (a checkpoint was saved)
