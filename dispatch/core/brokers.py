"""Node slots shared between dispatchers: the count that no node may exceed, whoever dispatches.

The project flow counts its own slots in the scheduler; a broker makes that count hold across every
dispatcher at once. It is asked, without blocking, just before a spec is dispatched; a refusal means
another dispatcher holds the slot, and the spec waits (or goes to another node). A shared broker keeps an
ended spec's slot a moment for this dispatcher's next spec on that node (`park`), so that one pays no round
trip to the server for it.

- `MachineSlots`: `flock`ed slot files under `DISPATCH_HOME/locks/node-<name>/`: every dispatcher of
  this machine (the embedded default). The kernel frees a dead holder's slots.
- a `SharedSlots` broker for the nodes other dispatchers reach too: in team mode the Prefect server's
  concurrency limits (`dispatch.prefect.slots.ServerSlots`, chosen by `dispatch.cluster.runtime`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from dispatch.core.locks import SlotLocks

SHARED_TRANSPORTS = ("ssh", "worker")
"""Nodes other dispatchers reach too: their slots must be counted on the server in team mode (a `local` node
is this machine, counted by its slot files)."""


class SlotBroker(Protocol):
    def try_acquire(self, node: str) -> object | None:
        """A token for one slot of `node`, or None when the node is full for now."""

    def release(self, token: object) -> None:
        """Give a slot back."""


class SharedSlots(SlotBroker, Protocol):
    """A broker whose count other dispatchers share, and whose releases take a moment to be seen."""

    def try_acquire_many(self, node: str, count: int) -> list[object]:
        """Up to `count` new slots of `node` for a burst of starts, in as few round trips as it can."""

    def releasing(self) -> int:
        """Slots given back that the others still count as held."""

    def park(self, token: object) -> None:
        """Keep an ended spec's slot a moment for this dispatcher's next spec on its node (a handoff: no call
        to the server), then give it back."""

    def take_parked(self, node: str) -> object | None:
        """A slot of `node` this dispatcher parked, or None (never asks the server)."""

    def parked(self) -> dict[str, int]:
        """Parked slots by node: held, and counted as held, until a spec takes them or they are given back."""

    def trim(self, count: int, keep: dict[str, int] | None = None) -> int:
        """Give back up to `count` parked slots now, keeping `keep[node]` on each node; how many went."""

    def close(self) -> None:
        """Give every held slot back and stop."""


class MachineSlots:
    """One `SlotLocks` per node under `directory` (shared by every dispatcher on this machine)."""

    def __init__(self, directory: Path, slots: dict[str, int]) -> None:
        self._locks = {name: SlotLocks(directory / f"node-{name}", count) for name, count in slots.items()}

    def try_acquire(self, node: str) -> int | None:
        return self._locks[node].try_acquire()

    def release(self, token: object) -> None:
        SlotLocks.release(int(token))  # type: ignore[arg-type]


class Brokers:
    """Routes each node to its broker: the server's limit where one exists, else this machine's locks."""

    def __init__(self, machine: MachineSlots, server: SharedSlots | None, server_nodes: set[str]) -> None:
        self.machine = machine
        self.server = server
        self.server_nodes = server_nodes

    def remote(self, node: str) -> bool:
        """Whether `node`'s slots are taken from the server (a round trip: asked off the dispatch loop)."""
        return self.server is not None and node in self.server_nodes

    def remote_any(self) -> bool:
        return self.server is not None and bool(self.server_nodes)

    def take_parked(self, node: str) -> tuple[str, object] | None:
        """A slot of `node` this dispatcher parked (no server call), or None."""
        if not self.remote(node):
            return None
        token = self.server.take_parked(node)  # type: ignore[union-attr]
        return ("server", token) if token is not None else None

    def try_acquire(self, node: str) -> tuple[str, object] | None:
        if self.server is not None and node in self.server_nodes:
            token = self.server.try_acquire(node)
            return ("server", token) if token is not None else None
        token = self.machine.try_acquire(node)
        return ("machine", token) if token is not None else None

    def try_acquire_many(self, node: str, count: int) -> list[tuple[str, object]]:
        """Up to `count` new server slots of a `remote` node in one round trip, fewer when it has not that many
        (a machine slot costs no round trip: it is taken one at a time with `try_acquire`)."""
        return [("server", token) for token in self.server.try_acquire_many(node, count)]  # type: ignore[union-attr]

    def release(self, held: tuple[str, object]) -> None:
        """Give a slot back: a server slot is parked for the next spec on its node (`SharedSlots.park`)."""
        kind, token = held
        if kind == "server":
            self.server.park(token)  # type: ignore[union-attr]
        else:
            self.machine.release(token)

    def parked(self) -> dict[str, int]:
        """Server slots parked for the next spec, by node (a machine slot is given back at once)."""
        return self.server.parked() if self.server is not None else {}

    def trim(self, count: int, keep: dict[str, int] | None = None) -> int:
        """Give back up to `count` parked slots now (keeping `keep[node]` on each node); how many went."""
        return self.server.trim(count, keep) if self.server is not None and count > 0 else 0

    def releasing(self) -> int:
        """Slots given back that another dispatcher cannot take yet (a machine slot is free at once)."""
        return self.server.releasing() if self.server is not None else 0

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
