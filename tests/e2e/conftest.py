"""Each test here gets a real controller on the session Kafka with its own topics."""

from tests.support.controller import controller

__all__ = ["controller"]
