"""The testcontainers backend: Kafka, Redis and PostgreSQL in Docker containers.

Each container is described by a plain :class:`ContainerSpec` (image, environment, command,
port, readiness probe) that needs no Docker engine and is unit-tested; :func:`start_container`
runs a spec with testcontainers' generic ``DockerContainer`` and kcons' own readiness wait
(the same on every testcontainers release), and returns the endpoint.

The specs speak the interface of the official images (``apache/kafka``, ``redis``,
``postgres``): the ``KAFKA_*`` environment that ``apache/kafka`` turns into
``server.properties``, ``POSTGRES_USER``/``POSTGRES_PASSWORD``/``POSTGRES_DB``, and the
servers' own command-line options. Any image that speaks it can stand in; the images are
settings: ``KCONS_TC_KAFKA_IMAGE``, ``KCONS_TC_REDIS_IMAGE``, ``KCONS_TC_POSTGRES_IMAGE``
(``deploy/local/images/build.sh`` builds such images from Debian packages, for machines
without a registry). ``KCONS_TC_START_TIMEOUT`` bounds the wait for readiness after the
container started, ``KCONS_TC_PULL_TIMEOUT`` the pull of an image that is not present yet.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlparse

from kcons.config import env_float
from kcons.errors import ServiceStartError
from kcons.testing.local import free_port

log = logging.getLogger(__name__)

__all__ = [
    "ContainerSpec",
    "docker_host",
    "kafka_env",
    "kafka_spec",
    "postgres_spec",
    "property_env_name",
    "redis_spec",
    "start_container",
]

DEFAULT_KAFKA_IMAGE = "apache/kafka:4.1.1"
DEFAULT_REDIS_IMAGE = "redis:7.4"
DEFAULT_POSTGRES_IMAGE = "postgres:16"

KAFKA_PORT = 9092
REDIS_PORT = 6379
POSTGRES_PORT = 5432

_STARTED: dict[int, Callable[[], None]] = {}
_STARTED_LOCK = threading.Lock()


def _stop_started() -> None:
    """Remove the containers this process started and did not stop (Ryuk may be off)."""
    with _STARTED_LOCK:
        stops = list(_STARTED.values())
        _STARTED.clear()
    for stop in stops:
        with contextlib.suppress(Exception):
            stop()


atexit.register(_stop_started)


def _tracked(container: Any) -> Callable[[], None]:
    """Remember ``container`` for removal at exit; return its idempotent ``stop``."""
    key = id(container)
    with _STARTED_LOCK:
        _STARTED[key] = container.stop

    def stop() -> None:
        with _STARTED_LOCK:
            if _STARTED.pop(key, None) is None:
                return
        container.stop()

    return stop


#: Placeholders in a spec that are filled in once the host and port are known.
HOST = "{host}"
PORT = "{port}"


@dataclass(frozen=True)
class ContainerSpec:
    """What to run: the service kind, image, environment, command, the port clients use and its endpoint form.

    ``env`` values and ``endpoint`` may contain ``{host}`` and ``{port}``: the address clients
    reach the container's ``port`` at. ``fixed_host_port`` publishes the port on the same
    number on the host, for servers (Kafka) that must advertise the address before starting.
    """

    kind: str
    image: str
    port: int
    endpoint: str
    env: Mapping[str, str] = field(default_factory=dict)
    command: Sequence[str] = ()
    fixed_host_port: bool = False
    secret: str = ""

    def __repr__(self) -> str:
        def hide(text: str) -> str:
            return text.replace(self.secret, "***") if self.secret else text

        env = {k: hide(v) for k, v in self.env.items()}
        return (
            f"ContainerSpec(kind={self.kind!r}, image={self.image!r}, port={self.port}, "
            f"endpoint={hide(self.endpoint)!r}, env={env!r}, command={list(self.command)!r})"
        )

    def render(self, host: str, port: int) -> tuple[dict[str, str], str]:
        """The environment and endpoint with ``{host}``/``{port}`` filled in."""
        env = {k: v.replace(HOST, host).replace(PORT, str(port)) for k, v in self.env.items()}
        return env, self.endpoint.replace(HOST, host).replace(PORT, str(port))


def property_env_name(prop: str) -> str:
    """The ``KAFKA_*`` variable that ``apache/kafka`` turns into ``prop``: "." -> "_", "_" -> "__", "-" -> "___"."""
    out = []
    for ch in prop:
        out.append({".": "_", "_": "__", "-": "___"}.get(ch, ch.upper()))
    return "KAFKA_" + "".join(out)


def kafka_env(cluster_id: str) -> dict[str, str]:
    """The ``apache/kafka`` environment of one combined KRaft broker/controller for tests.

    Clients use the ``PLAINTEXT`` listener, advertised at ``{host}:{port}`` (the host-side
    address); the broker talks to itself over ``BROKER`` and the controller quorum over
    ``CONTROLLER``, both inside the container. The internal topics get replication factor 1
    and the transaction state log ``min.isr`` 1, which transactions need on a single node.
    """
    from kcons.testing.local import broker_settings

    props = {
        "node.id": "1",
        "process.roles": "broker,controller",
        "listeners": f"PLAINTEXT://:{KAFKA_PORT},BROKER://:9093,CONTROLLER://:9094",
        "advertised.listeners": f"PLAINTEXT://{HOST}:{PORT},BROKER://localhost:9093",
        "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,BROKER:PLAINTEXT,CONTROLLER:PLAINTEXT",
        "inter.broker.listener.name": "BROKER",
        "controller.listener.names": "CONTROLLER",
        "controller.quorum.voters": "1@localhost:9094",
        "log.dirs": "/tmp/kraft-combined-logs",
        **broker_settings(1),
    }
    env = {property_env_name(k): v for k, v in props.items()}
    env["CLUSTER_ID"] = cluster_id
    env["KAFKA_HEAP_OPTS"] = "-Xms256m -Xmx768m"
    return env


def kafka_spec(environ: Mapping[str, str] | None = None) -> ContainerSpec:
    """A single KRaft broker (``apache/kafka`` interface) with transactions working on one node."""
    from kcons.testing.local import _kafka_cluster_id

    env = os.environ if environ is None else environ
    return ContainerSpec(
        kind="kafka",
        image=env.get("KCONS_TC_KAFKA_IMAGE") or DEFAULT_KAFKA_IMAGE,
        port=KAFKA_PORT,
        endpoint=f"{HOST}:{PORT}",
        env=kafka_env(_kafka_cluster_id()),
        fixed_host_port=True,
    )


def redis_spec(environ: Mapping[str, str] | None = None) -> ContainerSpec:
    """A Redis server with persistence off (``redis`` image interface: options after ``redis-server``)."""
    env = os.environ if environ is None else environ
    return ContainerSpec(
        kind="redis",
        image=env.get("KCONS_TC_REDIS_IMAGE") or DEFAULT_REDIS_IMAGE,
        port=REDIS_PORT,
        endpoint=f"redis://{HOST}:{PORT}/0",
        command=("redis-server", "--save", "", "--appendonly", "no", "--maxclients", "2000"),
    )


def postgres_spec(environ: Mapping[str, str] | None = None) -> ContainerSpec:
    """A PostgreSQL server: superuser ``kcons`` with a fresh random password, database ``kcons``, fsync off."""
    env = os.environ if environ is None else environ
    password = secrets.token_urlsafe(16)
    settings = {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off", "max_connections": "300"}
    command = ["postgres"]
    for k, v in settings.items():
        command += ["-c", f"{k}={v}"]
    return ContainerSpec(
        kind="postgres",
        image=env.get("KCONS_TC_POSTGRES_IMAGE") or DEFAULT_POSTGRES_IMAGE,
        port=POSTGRES_PORT,
        endpoint=f"postgresql://kcons:{quote(password, safe='')}@{HOST}:{PORT}/kcons",
        env={"POSTGRES_USER": "kcons", "POSTGRES_PASSWORD": password, "POSTGRES_DB": "kcons"},
        command=tuple(command),
        secret=password,
    )


def docker_host() -> str:
    """The Docker engine address testcontainers will use (``DOCKER_HOST`` or the default socket)."""
    return os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"


def _docker_client() -> Any:
    """A docker-py client that answered a ping, or a ServiceStartError that says what to do."""
    try:
        import docker
    except ImportError as exc:
        raise ServiceStartError(
            "the testcontainers backend needs the [testcontainers] extra: pip install 'kcons[testcontainers]'"
        ) from exc
    try:
        client = docker.from_env(timeout=30)
        client.ping()
    except Exception as exc:  # docker-py raises DockerException, requests' and OS errors alike
        raise ServiceStartError(
            f"no Docker daemon at {docker_host()}: start Docker or set DOCKER_HOST, "
            f"or use KCONS_TEST_BACKEND=local ({type(exc).__name__})"
        ) from None
    return client


def _ensure_image(client: Any, image: str, timeout: float) -> None:
    """Pull ``image`` unless present, within ``timeout`` seconds, with an error naming the image."""
    import docker

    try:
        client.images.get(image)
        return
    except docker.errors.ImageNotFound:
        pass
    log.info("pulling %s (first use; up to %.0fs, KCONS_TC_PULL_TIMEOUT)", image, timeout)
    started = time.monotonic()
    try:
        puller = docker.from_env(timeout=max(1, int(timeout)))
        repo, _, tag = image.rpartition(":") if ":" in image.rsplit("/", 1)[-1] else (image, "", "latest")
        puller.images.pull(repo, tag=tag)
    except Exception as exc:
        raise ServiceStartError(
            f"could not pull {image} from {docker_host()} ({type(exc).__name__}: {exc}): check the registry is "
            "reachable or build local images (deploy/local/images/build.sh) and point the KCONS_TC_*_IMAGE "
            "settings at them"
        ) from None
    log.info("pulled %s in %.1fs", image, time.monotonic() - started)


def _host_ip(host: str) -> str:
    """The address clients use for the engine's host; ``localhost`` becomes 127.0.0.1 (IPv4, as published)."""
    return "127.0.0.1" if host in ("localhost", "") else host


def _is_local_engine() -> bool:
    parsed = urlparse(docker_host())
    return parsed.scheme in ("unix", "npipe") or parsed.hostname in ("localhost", "127.0.0.1", "::1")


def _probe(kind: str, endpoint: str) -> Callable[[], bool]:
    """A readiness check from the client's side: the service answers a real request."""
    if kind == "kafka":
        from confluent_kafka.admin import AdminClient

        admin = AdminClient({"bootstrap.servers": endpoint, "socket.connection.setup.timeout.ms": 2000, "log_level": 0})
        return lambda: len(admin.list_topics(timeout=2).brokers) >= 1
    if kind == "redis":
        import redis

        def ping() -> bool:
            client = redis.Redis.from_url(endpoint, socket_timeout=2, socket_connect_timeout=2)
            try:
                return bool(client.ping())
            finally:
                client.close()

        return ping

    def connect() -> bool:
        import psycopg

        with psycopg.connect(endpoint, connect_timeout=2) as conn:
            conn.execute("SELECT 1")
        return True

    return connect


def _wait_ready(container: Any, spec: ContainerSpec, endpoint: str, timeout: float) -> None:
    check = _probe(spec.kind, endpoint)
    wrapped = container.get_wrapped_container()
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < deadline:
        wrapped.reload()
        if wrapped.status in ("exited", "dead"):
            raise ServiceStartError(
                f"the {spec.kind} container ({spec.image}) exited while starting:\n{_logs(wrapped)}"
            )
        try:
            if check():
                return
        except Exception as exc:  # probes fail until the server is up
            last = exc
        time.sleep(0.2)
    raise ServiceStartError(
        f"the {spec.kind} container ({spec.image}) was not ready after {timeout:.0f}s (KCONS_TC_START_TIMEOUT); "
        f"last error: {last}\n{_logs(wrapped)}"
    )


def _logs(wrapped: Any) -> str:
    try:
        return str(wrapped.logs(tail=40).decode(errors="replace"))
    except Exception:  # the container may be gone already
        return "(no logs)"


def _make_container(spec: ContainerSpec) -> Any:
    from testcontainers.core.container import DockerContainer

    return DockerContainer(spec.image)


def start_container(spec: ContainerSpec, environ: Mapping[str, str] | None = None) -> tuple[Callable[[], None], str]:
    """Start the container for ``spec`` and wait until it serves; return ``(stop, endpoint)``.

    Needs a Docker engine (``DOCKER_HOST`` or the default socket); every failure is a
    :class:`ServiceStartError` that says what to do.
    """
    start_timeout = env_float("KCONS_TC_START_TIMEOUT", 180.0, minimum=1.0, environ=environ)
    pull_timeout = env_float("KCONS_TC_PULL_TIMEOUT", 600.0, minimum=1.0, environ=environ)
    try:
        import testcontainers  # noqa: F401
    except ImportError as exc:
        raise ServiceStartError(
            "the testcontainers backend needs the [testcontainers] extra: pip install 'kcons[testcontainers]'"
        ) from exc
    client = _docker_client()
    _ensure_image(client, spec.image, pull_timeout)
    local = _is_local_engine()
    attempts = 3 if spec.fixed_host_port else 1
    for attempt in range(1, attempts + 1):
        container = _make_container(spec)
        host_port = free_port() if spec.fixed_host_port else None
        binding: Any = host_port
        if local:
            binding = ("127.0.0.1", host_port) if host_port is not None else ("127.0.0.1",)
        # docker-py's binding forms ((ip, port) or (ip,)) go straight into the ports dict that every
        # testcontainers release hands to ``docker run``; with_bind_ports accepts only a port number.
        container.ports[f"{spec.port}/tcp"] = binding
        host = "127.0.0.1" if local else _host_ip(urlparse(docker_host()).hostname or "")
        env, endpoint = spec.render(host, host_port or 0)
        for k, v in env.items():
            container.with_env(k, v)
        if spec.command:
            container.with_command(list(spec.command))
        try:
            container.start()
        except Exception as exc:
            with contextlib.suppress(Exception):
                container.stop()
            text = str(exc)
            if "address already in use" in text and attempt < attempts:
                log.info("port %s was taken; retrying the %s container", host_port, spec.kind)
                continue
            hint = ""
            if "ryuk" in text.lower():
                hint = " (testcontainers' Ryuk reaper image is unavailable: set TESTCONTAINERS_RYUK_DISABLED=true)"
            raise ServiceStartError(f"could not start the {spec.kind} container ({spec.image}): {text}{hint}") from None
        if host_port is None:
            host = _host_ip(container.get_container_host_ip()) if not local else host
            env, endpoint = spec.render(host, int(container.get_exposed_port(spec.port)))
        try:
            _wait_ready(container, spec, endpoint, start_timeout)
        except BaseException:
            with contextlib.suppress(Exception):
                container.stop()
            raise
        log.info("%s container %s ready at %s", spec.kind, spec.image, endpoint.replace(spec.secret or "\0", "***"))
        return _tracked(container), endpoint
    raise ServiceStartError(f"could not start the {spec.kind} container ({spec.image}): no free host port")
