"""A client on another gRPC stack (Python grpcio, the C-core implementation)
against the real `nlb` binary: stubs generated from our .proto files at test
time, services found through server reflection, the module lifecycle calls,
and grpc.health.v1.
"""

from __future__ import annotations

import secrets
from typing import Callable

import grpc
import pytest
from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from conftest import NlbProcess, Stubs

CALL_TIMEOUT_S = 15.0
NLB_SERVICE = "marchproxy.NLBService"
HEALTH_SERVICE = "grpc.health.v1.Health"


def channel_to(nlb: NlbProcess) -> grpc.Channel:
    channel = grpc.insecure_channel(nlb.grpc_addr)
    grpc.channel_ready_future(channel).result(timeout=CALL_TIMEOUT_S)
    return channel


def registration(stubs: Stubs, instance_id: str):
    """A RegisterModuleRequest for an ALB instance that takes traffic."""
    t = stubs.types_pb2
    return stubs.nlb_pb2.RegisterModuleRequest(
        instance=t.ModuleInstance(
            instance_id=instance_id,
            module_type=t.MODULE_TYPE_ALB,
            address="127.0.0.1:7001",
            metadata={"data_address": "127.0.0.1:8081", "zone": "py"},
            max_connections=500,
            version="1.4.2",
        ),
        initial_routes=[
            t.Route(
                route_id="py-web",
                protocol=t.PROTOCOL_HTTP,
                destination_pattern="py.example.com",
                destination_port=80,
                priority=5,
            )
        ],
        health_config=t.HealthCheckConfig(interval_seconds=30, unhealthy_threshold=3),
        capabilities={"protocols": "http"},
    )


def reflection_v1_services(channel: grpc.Channel) -> set[str]:
    """`list_services` over grpc.reflection.v1. grpcio-reflection's client
    speaks v1alpha only; v1's messages are the same on the wire, so its
    message classes serve for the v1 method too."""
    call = channel.stream_stream(
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    responses = list(call(iter([request]), timeout=CALL_TIMEOUT_S))
    assert len(responses) == 1, responses
    return {s.name for s in responses[0].list_services_response.service}


def test_python_grpcio_client_interoperates(
    stubs: Stubs, start_nlb: Callable[..., NlbProcess]
) -> None:
    nlb = start_nlb()
    channel = channel_to(nlb)
    t, pb = stubs.types_pb2, stubs.nlb_pb2
    client = stubs.nlb_pb2_grpc.NLBServiceStub(channel)

    # Server reflection: v1alpha through grpcio-reflection's client ...
    db = ProtoReflectionDescriptorDatabase(channel)
    services = set(db.get_services())
    assert NLB_SERVICE in services, services
    assert HEALTH_SERVICE in services, services
    # ... which also resolves the full service definition ...
    pool = descriptor_pool.DescriptorPool(db)
    methods = {m.name for m in pool.FindServiceByName(NLB_SERVICE).methods}
    assert {"RegisterModule", "Heartbeat", "ListModules", "GetModuleInfo"} <= methods
    # The 20 reference RPCs, plus Switchyard's additive extensions:
    # HeartbeatStream and the eight rollout RPCs (rollout.proto).
    assert len(methods) == 29, sorted(methods)
    assert "HeartbeatStream" in methods, sorted(methods)
    assert {"StartRollout", "WatchRollout", "RollbackRollout"} <= methods, sorted(methods)
    # ... and v1.
    v1 = reflection_v1_services(channel)
    assert {NLB_SERVICE, HEALTH_SERVICE} <= v1, v1

    # RegisterModule.
    registered, call = client.RegisterModule.with_call(
        registration(stubs, "py-alb-1"), timeout=CALL_TIMEOUT_S
    )
    assert registered.success, registered.message
    assert registered.registration_id
    assert registered.registered_at.seconds > 0
    # Every call carries an x-request-id back in the response headers.
    headers = dict(call.initial_metadata())
    assert headers.get("x-request-id"), headers

    # Heartbeat, acknowledged.
    beat = client.Heartbeat(
        pb.HeartbeatRequest(
            instance_id="py-alb-1",
            registration_id=registered.registration_id,
            status=t.HEALTH_STATUS_HEALTHY,
            current_stats=t.ModuleStats(
                instance_id="py-alb-1",
                total_requests=1234,
                active_connections=7,
                cpu_usage_percent=12.5,
                memory_usage_mb=256.0,
            ),
        ),
        timeout=CALL_TIMEOUT_S,
    )
    assert beat.acknowledged, beat.message
    assert beat.instructions.get("action") != "reregister"
    assert beat.server_time.seconds > 0

    # Heartbeat with a registration id the NLB never gave: re-register.
    stale = client.Heartbeat(
        pb.HeartbeatRequest(instance_id="py-alb-1", registration_id="not-a-registration"),
        timeout=CALL_TIMEOUT_S,
    )
    assert not stale.acknowledged
    assert stale.instructions["action"] == "reregister", dict(stale.instructions)

    # The HeartbeatStream extension: one answer per beat, in order; an
    # unknown registration is told to re-register and the stream goes on.
    beats = [
        pb.HeartbeatRequest(instance_id="py-alb-1", registration_id=registered.registration_id),
        pb.HeartbeatRequest(instance_id="py-alb-1", registration_id="not-a-registration"),
        pb.HeartbeatRequest(instance_id="py-alb-1", registration_id=registered.registration_id),
    ]
    answers = list(client.HeartbeatStream(iter(beats), timeout=CALL_TIMEOUT_S))
    assert [a.acknowledged for a in answers] == [True, False, True], answers
    assert answers[1].instructions["action"] == "reregister"

    # ListModules: the registered instance with its fields.
    listed = client.ListModules(pb.ListModulesRequest(), timeout=CALL_TIMEOUT_S)
    assert listed.total_modules == 1
    (inst,) = listed.modules
    assert inst.instance_id == "py-alb-1"
    assert inst.module_type == t.MODULE_TYPE_ALB
    assert inst.address == "127.0.0.1:7001"
    assert inst.metadata["data_address"] == "127.0.0.1:8081"
    assert inst.metadata["zone"] == "py"
    assert inst.version == "1.4.2"
    assert inst.max_connections == 500
    assert inst.health_status == t.HEALTH_STATUS_HEALTHY
    assert inst.started_at.seconds > 0

    # GetModuleInfo: routes, the heartbeat's stats, the NLB's details.
    info = client.GetModuleInfo(
        pb.GetModuleInfoRequest(instance_id="py-alb-1"), timeout=CALL_TIMEOUT_S
    )
    assert info.instance.instance_id == "py-alb-1"
    assert [r.route_id for r in info.routes] == ["py-web"]
    assert info.stats.total_requests == 1234
    assert info.stats.active_connections == 7
    assert info.details["state"] == "healthy"
    assert info.details["takes_traffic"] == "true"
    assert info.details["data_address"] == "127.0.0.1:8081"
    assert info.details["capability.protocols"] == "http"

    with pytest.raises(grpc.RpcError) as missing:
        client.GetModuleInfo(pb.GetModuleInfoRequest(instance_id="nobody"), timeout=CALL_TIMEOUT_S)
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    assert "nobody" in missing.value.details()

    # RouteRequest reaches the instance through its announced route.
    routed = client.RouteRequest(
        pb.RouteRequestRequest(
            route=t.Route(
                protocol=t.PROTOCOL_HTTP,
                destination_pattern="py.example.com",
                destination_port=80,
                source_pattern="10.1.2.3",
            ),
            dry_run=True,
        ),
        timeout=CALL_TIMEOUT_S,
    )
    assert routed.routed, routed.message
    assert routed.target_instance_id == "py-alb-1"
    assert routed.target_address == "127.0.0.1:8081"

    # grpc.health.v1: the server as a whole and the control API.
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", NLB_SERVICE):
        status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=CALL_TIMEOUT_S)
        assert status.status == health_pb2.HealthCheckResponse.SERVING, service

    channel.close()
    assert nlb.stop() == 0, nlb.stderr()


def test_token_auth_roles(stubs: Stubs, start_nlb: Callable[..., NlbProcess]) -> None:
    operator_token = secrets.token_urlsafe(24)
    module_token = secrets.token_urlsafe(24)
    nlb = start_nlb(env={"NLB_OPERATOR_TOKEN": operator_token, "NLB_MODULE_TOKEN": module_token})
    channel = channel_to(nlb)
    pb = stubs.nlb_pb2
    client = stubs.nlb_pb2_grpc.NLBServiceStub(channel)
    as_module = [("authorization", f"Bearer {module_token}")]
    as_operator = [("x-api-key", operator_token)]

    # No token: UNAUTHENTICATED, for a read and for a module call.
    with pytest.raises(grpc.RpcError) as anonymous:
        client.ListModules(pb.ListModulesRequest(), timeout=CALL_TIMEOUT_S)
    assert anonymous.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as anonymous:
        client.RegisterModule(registration(stubs, "py-auth-0"), timeout=CALL_TIMEOUT_S)
    assert anonymous.value.code() == grpc.StatusCode.UNAUTHENTICATED

    # A wrong token is no better than none.
    with pytest.raises(grpc.RpcError) as wrong:
        client.ListModules(
            pb.ListModulesRequest(),
            metadata=[("authorization", f"Bearer {module_token}x")],
            timeout=CALL_TIMEOUT_S,
        )
    assert wrong.value.code() == grpc.StatusCode.UNAUTHENTICATED

    # The module token registers ...
    registered = client.RegisterModule(
        registration(stubs, "py-auth-1"), metadata=as_module, timeout=CALL_TIMEOUT_S
    )
    assert registered.success, registered.message

    # ... heartbeats for its own instance ...
    beat = client.Heartbeat(
        pb.HeartbeatRequest(instance_id="py-auth-1", registration_id=registered.registration_id),
        metadata=as_module,
        timeout=CALL_TIMEOUT_S,
    )
    assert beat.acknowledged, beat.message

    # ... but may not read the registry.
    with pytest.raises(grpc.RpcError) as denied:
        client.ListModules(pb.ListModulesRequest(), metadata=as_module, timeout=CALL_TIMEOUT_S)
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED

    # The operator token (as an API key) may.
    listed = client.ListModules(pb.ListModulesRequest(), metadata=as_operator, timeout=CALL_TIMEOUT_S)
    assert [m.instance_id for m in listed.modules] == ["py-auth-1"]

    channel.close()
    assert nlb.stop() == 0, nlb.stderr()
