"""The outbound queue: durable spool files, envelopes, the runner, DSNs, local retries."""

from mailserver.smtp.queue.envelope import Envelope, RecipientState
from mailserver.smtp.queue.runner import QueueRunner
from mailserver.smtp.queue.store import QueueStore

__all__ = ["Envelope", "QueueRunner", "QueueStore", "RecipientState"]
