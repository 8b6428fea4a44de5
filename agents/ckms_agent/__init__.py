"""ckms host agent: keeps one host's keys current and acknowledges what it installed."""
