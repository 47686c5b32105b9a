"""Sandbox.create keyword arguments -> the wire's create arguments."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from conftest import FakeCore, err, ok, sandbox_ref
from microsandbox import (
    Image,
    InitConfig,
    InvalidArgumentError,
    InvalidConfigError,
    LogLevel,
    Network,
    Patch,
    PortBinding,
    PullPolicy,
    RegistryAuth,
    Sandbox,
    Secret,
    SecretInjection,
    SecurityProfile,
    TlsConfig,
    ViolationAction,
    Volume,
)
from microsandbox.types import DnsConfig


async def create(core: FakeCore, **kwargs):
    core.on("create", sandbox_ref(name="sb"))
    sb = await Sandbox.create("sb", **kwargs)
    return sb, core.last("create")


async def test_minimal_create(core: FakeCore) -> None:
    sb, args = await create(core)
    assert args == {"name": "sb", "config": {}, "detached": False}
    assert await sb.name == "sb"
    assert await sb.owns_lifecycle is True


async def test_every_page_kwarg_maps_onto_the_config(core: FakeCore, tmp_path: Path) -> None:
    sb, args = await create(
        core,
        image="python:3.12",
        cpus=2,
        memory=1024,
        workdir="/app",
        shell="/bin/bash",
        hostname="box",
        user="nobody",
        entrypoint=["python", "-u"],
        init="auto",
        replace=True,
        replace_with_timeout=2.5,
        max_duration=3600,
        idle_timeout=60.0,
        env={"A": "1"},
        scripts={"hello": "#!/bin/sh\necho hi\n"},
        pull_policy=PullPolicy.NEVER,
        log_level="debug",
        registry_auth=RegistryAuth("u", "p"),
        volumes={
            "/data": Volume.bind(tmp_path, readonly=True),
            "/cache": Volume.named("cache"),
            "/scratch": Volume.tmpfs(size_mib=64),
            "/disk": Volume.disk("/img.raw", fstype="ext4"),
        },
        patches=[
            Patch.text("/etc/motd", "hi\n", mode=0o644),
            Patch.append("/etc/profile", "export X=1\n"),
            Patch.mkdir("/srv", mode=0o755),
            Patch.remove("/etc/issue"),
            Patch.symlink("/usr/bin/python3", "/usr/bin/python", replace=True),
            Patch.copy_file("/host/f", "/guest/f"),
            Patch.copy_dir("/host/d", "/guest/d", replace=True),
        ],
        ports={8080: 80},
        network=Network(
            policy="public-only",
            rules=("deny egress tcp any 25",),
            dns=DnsConfig(nameservers=("127.0.0.53",), rebind_protection=False, query_timeout_ms=500),
            max_connections=100,
            mtu=1400,
            tls=TlsConfig(bypass=("*.internal",), verify_upstream=True, intercepted_ports=(443, 8443)),
        ),
        secrets=[Secret.env("API_KEY", value="sk-1", allow_hosts=["api.example.com"])],
        detached=True,
    )
    assert args["name"] == "sb"
    assert args["detached"] is True
    assert args["config"] == {
        "image": "python:3.12",
        "cpus": 2,
        "memory": 1024,
        "workdir": "/app",
        "shell": "/bin/bash",
        "hostname": "box",
        "user": "nobody",
        "entrypoint": ["python", "-u"],
        "init": "auto",
        "replace": True,
        "replace_with_timeout": 2.5,
        "max_duration": 3600,
        "idle_timeout": 60.0,
        "env": {"A": "1"},
        "scripts": {"hello": "#!/bin/sh\necho hi\n"},
        "pull_policy": "never",
        "log_level": "debug",
        "registry_auth": {"username": "u", "password": "p"},
        "volumes": {
            "/data": {"bind": str(tmp_path), "readonly": True},
            "/cache": {"named": "cache"},
            "/scratch": {"tmpfs": True, "size_mib": 64},
            "/disk": {"disk": "/img.raw", "fstype": "ext4"},
        },
        "patches": [
            {"op": "text", "path": "/etc/motd", "content": "hi\n", "mode": 0o644, "replace": False},
            {"op": "append", "path": "/etc/profile", "content": "export X=1\n"},
            {"op": "mkdir", "path": "/srv", "mode": 0o755},
            {"op": "remove", "path": "/etc/issue"},
            {"op": "symlink", "target": "/usr/bin/python3", "link": "/usr/bin/python", "replace": True},
            {"op": "copy_file", "src": "/host/f", "dst": "/guest/f", "mode": None, "replace": False},
            {"op": "copy_dir", "src": "/host/d", "dst": "/guest/d", "replace": True},
        ],
        "ports": [{"host": 8080, "guest": 80, "protocol": "tcp", "bind": "127.0.0.1"}],
        "network": {
            "policy": "public-only",
            "rules": ["deny egress tcp any 25"],
            "dns": {"nameservers": ["127.0.0.53"], "rebind_protection": False, "query_timeout_ms": 500},
            "max_connections": 100,
            "mtu": 1400,
            "tls": {"bypass": ["*.internal"], "verify_upstream": True, "intercepted_ports": [443, 8443]},
        },
        "secrets": [{"env": "API_KEY", "value": "sk-1", "allow_hosts": ["api.example.com"]}],
    }


async def test_snapshot_and_extra_wire_fields(core: FakeCore, tmp_path: Path) -> None:
    _, args = await create(
        core,
        snapshot=tmp_path / "snap",
        labels={"team": "a"},
        quiet_logs=True,
        ephemeral=True,
        security_profile=SecurityProfile.RESTRICTED,
    )
    assert args["config"] == {
        "snapshot": str(tmp_path / "snap"),
        "labels": {"team": "a"},
        "quiet_logs": True,
        "ephemeral": True,
        "security_profile": "restricted",
    }


async def test_image_sources(core: FakeCore, tmp_path: Path) -> None:
    for image, wire in [
        (Image.oci("python:3.12", upper_size_mib=8192), {"oci": "python:3.12", "upper_size_mib": 8192}),
        (Image.oci("alpine"), "alpine"),
        (Image.bind(tmp_path), str(tmp_path)),
        (Image.disk("/img.qcow2", fstype="ext4"), {"disk": "/img.qcow2", "fstype": "ext4"}),
        (Image.disk("/img.raw"), {"disk": "/img.raw"}),
        (tmp_path, str(tmp_path)),
        ("./rootfs.tar", "./rootfs.tar"),
    ]:
        _, args = await create(core, image=image)
        assert args["config"]["image"] == wire


async def test_init_shapes(core: FakeCore) -> None:
    for init, wire in [
        ("auto", "auto"),
        ("/sbin/init", {"cmd": "/sbin/init"}),
        ({"cmd": "/sbin/init", "args": ["--x"], "env": {"A": "b"}},
         {"cmd": "/sbin/init", "args": ["--x"], "env": {"A": "b"}}),
        (InitConfig("/lib/systemd/systemd", args=("--unit=multi-user.target",), env={"container": "msb"}),
         {"cmd": "/lib/systemd/systemd", "args": ["--unit=multi-user.target"], "env": {"container": "msb"}}),
        # "auto" is the wire's bare string whatever shape says it, never a path named auto.
        (InitConfig("auto"), "auto"),
        (InitConfig(cmd="auto", args=(), env={}), "auto"),
        ({"cmd": "auto"}, "auto"),
        ({"cmd": "auto", "args": [], "env": {}}, "auto"),
    ]:
        _, args = await create(core, init=init)
        assert args["config"]["init"] == wire


@pytest.mark.parametrize(
    "init",
    [
        InitConfig("auto", args=("--x",)),
        InitConfig("auto", env={"A": "b"}),
        {"cmd": "auto", "args": ["--x"]},
        {"cmd": "auto", "env": {"A": "b"}},
        InitConfig(""),
        {"cmd": ""},
    ],
)
async def test_init_auto_takes_no_args_or_env(core: FakeCore, init) -> None:
    # The wire's "auto" cannot carry them: refused here rather than dropped.
    with pytest.raises(InvalidArgumentError):
        await Sandbox.create("sb", init=init)
    assert core.calls == []


async def test_registry_auth_mapping_form(core: FakeCore) -> None:
    _, args = await create(core, registry_auth={"username": "u", "password": "p"})
    assert args["config"]["registry_auth"] == {"username": "u", "password": "p"}


async def test_ports_network_and_secret_shapes(core: FakeCore) -> None:
    _, args = await create(
        core,
        ports=[PortBinding.udp(5353, 53), PortBinding.tcp(8443, 443, bind="0.0.0.0")],
        network=Network.disabled(),
        secrets=[
            Secret.env(
                "TOKEN",
                host_env="HOST_TOKEN",
                allow_host_patterns=["*.example.com"],
                placeholder="$TOKEN",
                on_violation=ViolationAction.BLOCK_AND_TERMINATE,
                require_tls=False,
                injection=SecretInjection(headers=True, basic_auth=False, query_params=True, body=False),
            ),
            Secret.env("CERT", file="/etc/cert", allow_any_host_dangerous=True),
        ],
    )
    c = args["config"]
    assert c["ports"] == [
        {"host": 5353, "guest": 53, "protocol": "udp", "bind": "127.0.0.1"},
        {"host": 8443, "guest": 443, "protocol": "tcp", "bind": "0.0.0.0"},
    ]
    assert c["network"] == {"enabled": False}
    assert c["secrets"] == [
        {
            "env": "TOKEN",
            "host_env": "HOST_TOKEN",
            "allow_host_patterns": ["*.example.com"],
            "placeholder": "$TOKEN",
            "on_violation": "block-and-terminate",
            "require_tls_identity": False,
            "inject_headers": True,
            "inject_basic_auth": False,
            "inject_query": True,
            "inject_body": False,
        },
        {"env": "CERT", "file": "/etc/cert", "allow_any_host_dangerous": True},
    ]
    for net, wire in [
        (Network.none(), {"policy": "none"}),
        (Network.allow_all(), {"policy": "allow-all"}),
        (Network.public_only(), {"policy": "public-only"}),
        (Network(policy="public,private,host"), {"policy": "public,private,host"}),
        (Network(policy="public_only"), {"policy": "public-only"}),
    ]:
        _, args = await create(core, network=net)
        assert args["config"]["network"] == wire


async def test_none_values_are_left_to_the_core(core: FakeCore) -> None:
    _, args = await create(core, image=None, memory=None, env=None, detached=None)
    assert args == {"name": "sb", "config": {}, "detached": False}


@pytest.mark.parametrize(
    "kwargs",
    [
        {"imagee": "alpine"},
        {"mem": 512},
        {"timeout": 3},
        {"name": "x"},  # the name is positional
    ],
)
async def test_unknown_kwargs_raise_type_error(core: FakeCore, kwargs) -> None:
    with pytest.raises(TypeError):
        await Sandbox.create("sb", **kwargs)
    with pytest.raises(TypeError):
        Sandbox.create_with_progress("sb", **kwargs)
    assert core.calls == []


@pytest.mark.parametrize(
    "kwargs",
    [
        {"cpus": "2"},
        {"cpus": True},
        {"memory": 1.5},
        {"env": {"A": 1}},
        {"env": ["A=1"]},
        {"entrypoint": "python"},
        {"replace": 1},
        {"image": 3},
        {"volumes": {"/data": "/host"}},
        {"patches": [("text", "/a")]},
        {"ports": [(8080, 80)]},
        {"network": "none"},
        {"secrets": [("A", "b")]},
        {"registry_auth": ("u", "p")},
        {"registry_auth": {"user": "u", "password": "p"}},
        {"init": 1},
        {"init": {"command": "/sbin/init"}},
        {"detached": "yes"},
        {"pull_policy": 1},
        {"max_duration": "60"},
    ],
)
async def test_wrong_types_raise_type_error(core: FakeCore, kwargs) -> None:
    with pytest.raises(TypeError):
        await Sandbox.create("sb", **kwargs)
    assert core.calls == []


@pytest.mark.parametrize(
    "kwargs",
    [
        {"cpus": -1},
        {"memory": -512},
        {"pull_policy": "sometimes"},
        {"log_level": "loud"},
        {"security_profile": "lax"},
        {"max_duration": -1},
        {"idle_timeout": math.nan},
        {"replace_with_timeout": math.inf},
        {"ports": {70000: 80}},
        {"ports": {8080: -1}},
        {"image": ""},
        {"patches": [Patch.text("/a", "b", mode=-1)]},
    ],
)
async def test_bad_values_raise_invalid_argument(core: FakeCore, kwargs) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        await Sandbox.create("sb", **kwargs)
    assert isinstance(info.value, ValueError)
    assert info.value.kind == "invalid_argument"
    assert core.calls == []


def test_factories_check_their_arguments() -> None:
    with pytest.raises(InvalidArgumentError):
        Secret.env("A")  # no value source
    with pytest.raises(InvalidArgumentError):
        Secret.env("A", value="x", host_env="Y")
    with pytest.raises(InvalidArgumentError):
        Secret.env("A", value="x", on_violation="explode")
    with pytest.raises(InvalidArgumentError):
        Image.oci("alpine", upper_size_mib=0)
    with pytest.raises(TypeError):
        Image.oci(3)  # type: ignore[arg-type]


async def test_config_errors_are_the_cores(core: FakeCore) -> None:
    core.on("create", err("invalid_config", "image and snapshot are exclusive"))
    with pytest.raises(InvalidConfigError, match="exclusive"):
        await Sandbox.create("sb", image="alpine", snapshot="snap")
    assert core.last("create")["config"] == {"image": "alpine", "snapshot": "snap"}


def test_enums_are_strings() -> None:
    assert PullPolicy.IF_MISSING == "if-missing"
    assert str(LogLevel.TRACE) == "trace"
    assert [p.value for p in PullPolicy] == ["always", "if-missing", "never"]
    assert repr(RegistryAuth("u", "secret")).count("secret") == 0


async def test_create_with_progress_is_sync_and_lazy(core: FakeCore) -> None:
    session = Sandbox.create_with_progress("sb", image="alpine", memory=256)
    assert core.calls == []  # nothing runs before the session is used
    core.on("create_with_progress", ok({"pull": 11}))
    core.on("pull.next", ok(None))
    core.on("pull.result", sandbox_ref(handle=12))
    async with session:
        events = [e async for e in session.progress]
        sb = await session.result()
    assert events == []
    assert core.last("create_with_progress") == {
        "name": "sb",
        "config": {"image": "alpine", "memory": 256},
        "detached": False,
    }
    assert sb._handle() == 12
