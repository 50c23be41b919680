"""llmpool.children: ports handed to children that bind them later never repeat within a run."""

from __future__ import annotations

import socket

import pytest

from llmpool.children import PortAllocator, free_port


def test_a_port_the_kernel_gives_twice_is_probed_again() -> None:
    answers = iter([40001, 40001, 40002, 40001, 40003])
    ports = PortAllocator(lambda host: next(answers))
    assert [ports.take(), ports.take(), ports.take()] == [40001, 40002, 40003]


def test_the_memory_is_bounded_oldest_first() -> None:
    answers = iter([1, 2, 3, 1, 3, 4])
    ports = PortAllocator(lambda host: next(answers), memory=2)
    assert [ports.take(), ports.take(), ports.take()] == [1, 2, 3]
    assert ports.take() == 1  # forgotten: the memory held 2 and 3 only
    assert ports.take() == 4  # 3 is still remembered, so it was probed past


def test_an_allocator_that_only_sees_repeats_says_so() -> None:
    ports = PortAllocator(lambda host: 40001, tries=3)
    assert ports.take() == 40001
    with pytest.raises(OSError, match=r"no free TCP port on 127\.0\.0\.1 .*\(3 probes\)"):
        ports.take()


def test_free_port_gives_distinct_bindable_ports() -> None:
    # the kernel's bind(0) picks at random: 500 bare probes in a row repeat a handful of ports
    ports = [free_port() for _ in range(500)]
    assert len(set(ports)) == len(ports)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", ports[-1]))
