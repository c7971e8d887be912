"""Rank-aware logging that works before and without an `accelerate` state.

accelerate's own adapter refuses to log until a `PartialState` exists, and models and engines are
often built before one; this adapter decides the rank at call time from torch.distributed (or the
launcher's ``RANK`` variable) instead.
"""

from __future__ import annotations

import functools
import logging
import os

import torch.distributed as dist


def process_rank() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


class RankAwareLogger(logging.LoggerAdapter):
    """Logs on the main process only unless ``main_process_only=False``; ``warning_once`` for loops."""

    def log(self, level, msg, *args, main_process_only: bool = True, **kwargs):
        if main_process_only and process_rank() != 0:
            return
        if self.isEnabledFor(level):
            msg, kwargs = self.process(msg, kwargs)
            self.logger.log(level, msg, *args, **kwargs)

    @functools.cache  # noqa: B019 - one adapter per module, cached messages on purpose
    def warning_once(self, msg: str) -> None:
        self.warning(msg)


def get_logger(name: str) -> RankAwareLogger:
    return RankAwareLogger(logging.getLogger(name), {})
