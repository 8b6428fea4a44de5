"""SSH keepalive intervals, client and server, chosen together.

Any packet received restarts the receiving side's keepalive timer, so with the server's
interval the longer one only the client sends keepalives on a quiet connection: one global
request and reply per agent per interval, paid by the host and by the controller alike. A
side gives up after three unanswered keepalives, so the client finds a frozen controller in
about four intervals (and fails over), and the server frees a dead agent's connection in
about four of its own.
"""

from __future__ import annotations

KEEPALIVE_S = 30.0
"""The client's interval (agents, CLI): ~2 minutes to find a controller that stopped answering."""

SERVER_KEEPALIVE_S = 45.0
"""The server's interval: longer than the client's, so a live client's keepalives keep it quiet."""
