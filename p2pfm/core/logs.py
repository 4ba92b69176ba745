"""Loggers that carry a node's name: one stdlib logger per module, the node in every record.

p2pfm logs through ``logging`` only. Each module has its own logger
(``logging.getLogger(__name__)``); code that acts for one node logs through
:func:`node_logger`, whose records carry the node's name as ``record.node``,
so one handler can show which node said what when several nodes share a
process (the simulator, tests). The command line configures the handlers
(p2pfm/cli.py, ``-v`` / ``-q``); as a library p2pfm adds none.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    NodeLogger = logging.LoggerAdapter[logging.Logger]


def node_logger(module: str, node: str) -> NodeLogger:
    """The logger of ``module`` with ``node`` attached to every record it makes (``record.node``)."""
    return logging.LoggerAdapter(logging.getLogger(module), {"node": node})
