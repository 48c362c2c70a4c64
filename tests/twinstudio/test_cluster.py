"""The Ray cluster the batch and capture hosts run on: two real nodes on loopback, nothing leaves the machine."""

from __future__ import annotations

import os

import pytest

from tests.raycluster import interfaces, off_loopback_sockets, two_node_cluster
from twinstudio.cluster import Node, cluster_nodes, host_resource, node_command, placeable, why_unplaceable


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with two_node_cluster(tmp_path_factory.mktemp("ray-home")) as c:
        yield c


def test_two_nodes_on_loopback_each_a_capture_host(cluster):
    import ray

    nodes = cluster_nodes()
    assert sorted(h for n in nodes for h in n.hosts) == ["a", "b"]
    assert all(n.ip == "127.0.0.1" for n in nodes)

    @ray.remote(num_cpus=0)
    def where():
        return ray.get_runtime_context().get_node_id()

    by_host = {h: ray.get(where.options(resources={host_resource(h): 0.001}).remote()) for h in ("a", "b")}
    assert by_host["a"] != by_host["b"]
    assert {n.node_id for n in nodes if "b" in n.hosts} == {by_host["b"]}


def test_nothing_but_loopback(cluster):
    # inside the namespace there is no other interface to send by; and every socket of the
    # cluster's processes (and this driver) is bound and connected on 127.0.0.1
    if cluster.isolated:
        assert interfaces() == ["lo"]
    assert off_loopback_sockets(cluster.pids() | {os.getpid()}) == []
    assert len(cluster.pids()) >= 4  # two raylets, the GCS, workers: the check saw them


def test_placement_is_decided_from_the_nodes_totals():
    nodes = [Node("n1", "127.0.0.1", "head", {"CPU": 2.0}, head=True),
             Node("n2", "127.0.0.1", "b", {"CPU": 1.0, "capture-host:b": 1.0})]
    assert placeable({"CPU": 2}, nodes)
    assert not placeable({"CPU": 3}, nodes)
    assert not placeable({"GPU": 1}, nodes)
    assert placeable({"CPU": 1, host_resource("b"): 1}, nodes)
    assert not placeable({"CPU": 2, host_resource("b"): 1}, nodes)  # one node must hold all of it
    why = why_unplaceable({"GPU": 1, "CPU": 1}, nodes)
    assert "needs 1 CPU, 1 GPU on one node" in why and "head (head): 2 CPU, 0 GPU" in why


def test_node_command_carries_the_quiet_settings():
    line = node_command(head=False, address="10.0.0.5:6379", host="b", cpus=8)
    for part in ("RAY_USAGE_STATS_ENABLED=0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0", "--address=10.0.0.5:6379",
                 "--num-cpus=8", '"capture-host:b": 1'):
        assert part in line
