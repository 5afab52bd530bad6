"""A Flower Grid that calls ClientApps in this process: strategy tests without Ray."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

# Set once: building a Message outside a running app needs a task identity.
TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


class InProcessGrid(Grid):
    """Delivers each message to ``client_app`` with the node's persistent Context.

    Parameters
    ----------
    client_app : ClientApp
        The app every node runs.
    node_configs : list of dict
        One node config per node (e.g. partition-id, num-partitions, capacity).
    run_config : dict
        The run config every context sees.
    fail : callable, optional
        ``fail(node_id, message) -> "raise" | "drop" | None``: inject a crash (error
        reply) or a lost reply (no answer, as after a timeout).
    tamper : callable, optional
        ``tamper(node_id, reply) -> Message``: alter a reply before the server sees it.
    """

    def __init__(
        self,
        client_app: ClientApp,
        node_configs: list[dict],
        run_config: dict | None = None,
        fail: Callable[[int, Message], str | None] | None = None,
        tamper: Callable[[int, Message], Message] | None = None,
    ) -> None:
        self.client_app = client_app
        self.contexts = {
            1000 + i: Context(
                run_id=1,
                node_id=1000 + i,
                node_config=dict(cfg),
                state=RecordDict(),
                run_config=dict(run_config or {}),
            )
            for i, cfg in enumerate(node_configs)
        }
        self.fail, self.tamper = fail, tamper
        self.sent: list[Message] = []

    def set_run(self, run) -> None:
        self._run = run

    @property
    def run(self):
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return Message(content=content, message_type=message_type, dst_node_id=dst_node_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages):
        raise NotImplementedError

    def pull_messages(self, message_ids):
        raise NotImplementedError

    def send_and_receive(self, messages: Iterable[Message], *, timeout=None) -> list[Message]:
        replies = []
        for message in messages:
            node = message.metadata.dst_node_id
            self.sent.append(message)
            action = self.fail(node, message) if self.fail else None
            if action == "drop":
                continue
            # A copy, as the wire would make: the client must not alias server arrays.
            delivered = Message(
                content=copy.deepcopy(message.content),
                message_type=message.metadata.message_type,
                dst_node_id=node,
            )
            try:
                if action == "raise":
                    raise RuntimeError(f"injected failure on node {node}")
                reply = self.client_app(delivered, self.contexts[node])
            except Exception as err:  # a crashing ClientApp becomes an error reply
                reply = Message(Error(code=0, reason=repr(err)), reply_to=delivered)
            if self.tamper is not None:
                reply = self.tamper(node, reply)
            replies.append(reply)
        return replies
