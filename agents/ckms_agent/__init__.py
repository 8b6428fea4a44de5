"""ckms host agent: keeps one host's keys current and acknowledges what it installed.

Modules, from the edge inward:

- ``cli``: the ``ckms-agent`` entry point; a plain ``run`` goes to ``runner`` (the daemon process:
  config, logging, signals) without loading ``commands``, the Typer command line (``enroll``,
  ``run``, ``status``) that parses, calls and renders.
- ``config``: :class:`~ckms_agent.config.AgentConfig` from TOML + ``CKMS_AGENT_*`` environment.
- ``enroll``: first contact with the controller; makes the keys, pins what it answers.
- ``daemon``: :class:`~ckms_agent.daemon.Agent`, the task group of loops (connection, reconcile,
  events, heartbeat, staleness, acks): *when* things happen.
- ``keyops``: *what* happens to key files: execute a plan, record, ack; it composes
  ``materials`` (the verified material cache and fetch), ``revocation`` (offline revocation
  from the signed event) and ``removal`` (taking a key off, per-key locks, critical sections).
- ``plan`` / ``events``: pure decisions (desired vs held; what an event means for this host).
- ``installer`` / ``files`` / ``hooks``: crash-safe files, reload and health hooks, rollback.
- ``state``: the SQLite state DB (held keys and digests, Kafka positions, pending acks).
- ``acks``: signing, queueing and publishing acks; ``identity``: the agent's own keys;
  ``backoff``: the retry delays (``ckms._backoff``); ``status``: the ``status`` report.
"""
