"""free_ports: the ports the local services are started on."""

from __future__ import annotations

import socket

from kcons.testing.local import free_port, free_ports


def test_free_ports_are_distinct_bindable_and_never_handed_out_twice() -> None:
    first = free_ports(40)
    assert len(set(first)) == 40
    later = {free_port() for _ in range(40)} | set(free_ports(40))
    assert not later & set(first)
    for port in first[:5]:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", port))
