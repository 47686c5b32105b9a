package microsandbox

import (
	"context"
	"errors"
	"testing"
	"time"
)

func createArgs(t *testing.T, opts ...SandboxOption) recordedCall {
	t.Helper()
	f := useFake(t, answers(map[string]string{"create": refAnswer}))
	sb, err := CreateSandbox(context.Background(), "box", opts...)
	disarm(t, sb)
	if err != nil {
		t.Fatalf("CreateSandbox: %v", err)
	}
	return f.last(t)
}

func TestCreateWithoutOptions(t *testing.T) {
	c := createArgs(t)
	if c.Method != "create" {
		t.Fatalf("method %s", c.Method)
	}
	sameJSON(t, "args", c.Args, `{"name":"box","config":{},"detached":false}`)
}

func TestEveryOptionReachesTheConfig(t *testing.T) {
	mode := uint32(0o644)
	maxConn := uint(64)
	mtu := uint16(1400)
	qt := uint64(2000)
	off, on := false, true
	c := createArgs(t,
		WithImage("alpine:3.20"),
		WithOCIUpperSize(2048),
		WithMemory(1024),
		WithCPUs(2),
		WithWorkdir("/app"),
		WithShell("/bin/ash"),
		WithSecurityProfile(SecurityProfileRestricted),
		WithEnv(map[string]string{"A": "1"}),
		WithEnv(map[string]string{"B": "2", "A": "3"}),
		WithLabels(map[string]string{"team": "x"}),
		WithLabel("user.id", "alice"),
		WithHostname("h1"),
		WithUser("nobody"),
		WithReplaceWithTimeout(1500*time.Millisecond),
		WithEphemeral(true),
		WithEntrypoint("python", "-u"),
		WithInit(Init.Cmd("/sbin/init", InitOptions{Args: []string{"--x"}, Env: map[string]string{"K": "V"}})),
		WithLogLevel(LogLevelDebug),
		WithQuietLogs(),
		WithScripts(map[string]string{"hi": "echo hi"}),
		WithPullPolicy(PullPolicyNever),
		WithMaxDuration(90*time.Second),
		WithIdleTimeout(500*time.Millisecond),
		WithRegistryAuth(RegistryAuth{Username: "u", Password: "p"}),
		WithPorts(map[uint16]uint16{8081: 81, 8080: 80}),
		WithPortsUDP(map[uint16]uint16{5353: 53}),
		WithPortBindings(PortBinding{Bind: "0.0.0.0", HostPort: 9000, GuestPort: 90}),
		WithNetwork(&NetworkConfig{
			Policy: NetworkPolicyPresetPublicOnly,
			Rules: []PolicyRule{
				{Action: PolicyActionDeny, Protocol: PolicyProtocolTCP, Destination: "*", Port: "25"},
				{Action: PolicyActionAllow, Direction: PolicyDirectionAny, Protocols: []PolicyProtocol{PolicyProtocolTCP, PolicyProtocolUDP}, Destination: "10.0.0.0/8", Ports: []string{"80", "8000-8100"}},
				{Action: PolicyActionDeny, Destination: ".evil.com"},
				{Action: PolicyActionDeny, Direction: PolicyDirectionIngress, Destination: "api.example.com"},
			},
			DNS:            &DNSConfig{RebindProtection: &off, Nameservers: []string{"127.0.0.53:53"}, QueryTimeoutMs: &qt},
			TLS:            &TLSConfig{Enabled: &on, Bypass: []string{"*.bank.com"}, InterceptedPorts: []uint16{443, 8443}, BlockQUIC: &on, CACert: "/ca.pem", CAKey: "/ca.key"},
			MaxConnections: &maxConn,
			MTU:            &mtu,
		}),
		WithSecrets(
			Secret.Env("API_KEY", "s3cret", SecretEnvOptions{AllowHosts: []string{"api.example.com"}, OnViolation: ViolationActionBlockAndTerminate}),
			SecretEntry{EnvVar: "TOKEN", HostEnv: "HOST_TOKEN", AllowAnyHostDangerous: true, RequireTLS: &off, InjectQuery: &on},
		),
		WithPatches(
			Patch.Text("/etc/a", "x\n", PatchOptions{Mode: &mode, Replace: true}),
			Patch.Append("/etc/b", "y"),
			Patch.Mkdir("/app", PatchOptions{}),
			Patch.Remove("/etc/c"),
			Patch.Symlink("/a", "/l", PatchOptions{Replace: true}),
			Patch.CopyFile("/h/f", "/g/f", PatchOptions{}),
			Patch.CopyDir("/h/d", "/g/d", PatchOptions{}),
		),
		WithMounts(map[string]MountConfig{
			"/data": Mount.Named("vol", MountOptions{Readonly: true}),
			"/src":  Mount.Bind("/host/src", MountOptions{}),
			"/tmp":  Mount.Tmpfs(TmpfsOptions{SizeMiB: 256}),
			"/disk": Mount.Disk("/host/d.img", DiskOptions{Fstype: "ext4"}),
		}),
		WithDetached(),
	)
	sameJSON(t, "args", c.Args, `{
	  "name": "box", "detached": true,
	  "config": {
	    "image": {"oci": "alpine:3.20", "upper_size_mib": 2048},
	    "memory": 1024, "cpus": 2, "workdir": "/app", "shell": "/bin/ash",
	    "security_profile": "restricted",
	    "env": {"A": "3", "B": "2"},
	    "labels": {"team": "x", "user.id": "alice"},
	    "hostname": "h1", "user": "nobody",
	    "replace": true, "replace_with_timeout": 1.5,
	    "ephemeral": true,
	    "entrypoint": ["python", "-u"],
	    "init": {"cmd": "/sbin/init", "args": ["--x"], "env": {"K": "V"}},
	    "log_level": "debug", "quiet_logs": true,
	    "scripts": {"hi": "echo hi"},
	    "pull_policy": "never",
	    "max_duration": 90, "idle_timeout": 1,
	    "registry_auth": {"username": "u", "password": "p"},
	    "ports": [
	      {"host": 8080, "guest": 80, "protocol": "tcp"},
	      {"host": 8081, "guest": 81, "protocol": "tcp"},
	      {"host": 5353, "guest": 53, "protocol": "udp"},
	      {"host": 9000, "guest": 90, "protocol": "tcp", "bind": "0.0.0.0"}
	    ],
	    "network": {
	      "policy": "public-only",
	      "rules": [
	        "deny egress tcp any 25",
	        "allow both tcp,udp 10.0.0.0/8 80,8000-8100",
	        "deny egress suffix=evil.com",
	        "deny ingress domain=api.example.com"
	      ],
	      "dns": {"rebind_protection": false, "nameservers": ["127.0.0.53:53"], "query_timeout_ms": 2000},
	      "tls": {"enabled": true, "bypass": ["*.bank.com"], "intercepted_ports": [443, 8443], "block_quic": true,
	              "intercept_ca_cert": "/ca.pem", "intercept_ca_key": "/ca.key"},
	      "max_connections": 64, "mtu": 1400
	    },
	    "secrets": [
	      {"env": "API_KEY", "value": "s3cret", "allow_hosts": ["api.example.com"], "on_violation": "block-and-terminate"},
	      {"env": "TOKEN", "host_env": "HOST_TOKEN", "allow_any_host_dangerous": true, "require_tls_identity": false, "inject_query": true}
	    ],
	    "patches": [
	      {"op": "text", "path": "/etc/a", "content": "x\n", "mode": 420, "replace": true},
	      {"op": "append", "path": "/etc/b", "content": "y"},
	      {"op": "mkdir", "path": "/app", "mode": null},
	      {"op": "remove", "path": "/etc/c"},
	      {"op": "symlink", "target": "/a", "link": "/l", "replace": true},
	      {"op": "copy_file", "src": "/h/f", "dst": "/g/f", "mode": null, "replace": false},
	      {"op": "copy_dir", "src": "/h/d", "dst": "/g/d", "replace": false}
	    ],
	    "volumes": {
	      "/data": {"named": "vol", "readonly": true},
	      "/src": {"bind": "/host/src"},
	      "/tmp": {"tmpfs": true, "size_mib": 256},
	      "/disk": {"disk": "/host/d.img", "fstype": "ext4"}
	    }
	  }
	}`)
}

func TestImageForms(t *testing.T) {
	cases := []struct {
		opts []SandboxOption
		want string
	}{
		{[]SandboxOption{WithImage("python:3.12")}, `"python:3.12"`},
		{[]SandboxOption{WithImage("/srv/root")}, `"/srv/root"`},
		{[]SandboxOption{WithImageDisk("/img.raw", "ext4")}, `{"disk": "/img.raw", "fstype": "ext4"}`},
		{[]SandboxOption{WithImageDisk("/img.qcow2", "")}, `{"disk": "/img.qcow2"}`},
		{[]SandboxOption{WithImageDisk("/img.raw", "ext4"), WithImage("alpine")}, `"alpine"`},
	}
	for _, c := range cases {
		rc := createArgs(t, c.opts...)
		sameJSON(t, "image", rc.Args["config"].(map[string]any)["image"], c.want)
	}
	rc := createArgs(t, WithSnapshot("snap1"), WithInit(Init.Auto()), WithReplace(), WithEphemeral(false))
	sameJSON(t, "config", rc.Args["config"], `{"snapshot": "snap1", "init": "auto", "replace": true, "ephemeral": false}`)
	rc = createArgs(t, WithReplaceWithTimeout(0))
	sameJSON(t, "config", rc.Args["config"], `{"replace": true, "replace_with_timeout": 0}`)
	rc = createArgs(t, WithInit(Init.Cmd("auto", InitOptions{})))
	sameJSON(t, "Init.Cmd(auto)", rc.Args["config"], `{"init": "auto"}`)
	rc = createArgs(t, WithInit(Init.Cmd("/lib/systemd/systemd", InitOptions{Args: []string{"--unit=multi-user.target"}, Env: map[string]string{"container": "microsandbox"}})))
	sameJSON(t, "Init.Cmd(path)", rc.Args["config"], `{"init": {"cmd": "/lib/systemd/systemd", "args": ["--unit=multi-user.target"], "env": {"container": "microsandbox"}}}`)
	rc = createArgs(t, WithInit(Init.Cmd("/sbin/init", InitOptions{})))
	sameJSON(t, "Init.Cmd(bare path)", rc.Args["config"], `{"init": {"cmd": "/sbin/init"}}`)
	// WithReplaceWithGrace is WithReplaceWithTimeout's other name; the later one wins.
	rc = createArgs(t, WithReplaceWithGrace(2500*time.Millisecond))
	sameJSON(t, "grace", rc.Args["config"], `{"replace": true, "replace_with_timeout": 2.5}`)
	rc = createArgs(t, WithReplaceWithGrace(0))
	sameJSON(t, "zero grace", rc.Args["config"], `{"replace": true, "replace_with_timeout": 0}`)
	rc = createArgs(t, WithReplaceWithTimeout(time.Second), WithReplaceWithGrace(3*time.Second))
	sameJSON(t, "timeout then grace", rc.Args["config"], `{"replace": true, "replace_with_timeout": 3}`)
	rc = createArgs(t, WithReplaceWithGrace(3*time.Second), WithReplaceWithTimeout(time.Second))
	sameJSON(t, "grace then timeout", rc.Args["config"], `{"replace": true, "replace_with_timeout": 1}`)
	grace := 4 * time.Second
	rc = createArgs(t, func(c *SandboxConfig) { c.ReplaceWithGrace = &grace })
	sameJSON(t, "the ReplaceWithGrace field alone", rc.Args["config"], `{"replace": true, "replace_with_timeout": 4}`)
	var c SandboxConfig
	WithReplaceWithGrace(grace)(&c)
	if !c.Replace || c.ReplaceWithGrace == nil || *c.ReplaceWithGrace != grace || c.ReplaceWithTimeout == nil || *c.ReplaceWithTimeout != grace {
		t.Errorf("WithReplaceWithGrace fills %+v", c)
	}
	rc = createArgs(t, WithNetwork(NetworkPolicy.Disabled()))
	sameJSON(t, "config", rc.Args["config"], `{"network": {"enabled": false}}`)
	rc = createArgs(t, WithNetwork(NetworkPolicy.NonLocal()))
	sameJSON(t, "config", rc.Args["config"], `{"network": {"policy": "public,private"}}`)
}

func TestCreateDetachedAndStart(t *testing.T) {
	f := useFake(t, answers(map[string]string{"create": refAnswer, "start": refAnswer, "connect": refAnswer}))
	ctx := context.Background()
	sb1, err := CreateSandboxDetached(ctx, "box", WithMemory(256))
	disarm(t, sb1)
	if err != nil {
		t.Fatal(err)
	}
	sameJSON(t, "create", f.last(t).Args, `{"name":"box","config":{"memory":256},"detached":true}`)
	sb2, err := StartSandbox(ctx, "box")
	disarm(t, sb2)
	if err != nil {
		t.Fatal(err)
	}
	sameJSON(t, "start", f.last(t).Args, `{"name":"box","detached":false}`)
	sb3, err := StartSandboxDetached(ctx, "box")
	disarm(t, sb3)
	if err != nil {
		t.Fatal(err)
	}
	sameJSON(t, "start detached", f.last(t).Args, `{"name":"box","detached":true}`)
	sb4, err := ConnectSandbox(ctx, "box")
	disarm(t, sb4)
	if err != nil {
		t.Fatal(err)
	}
	sameJSON(t, "connect", f.last(t).Args, `{"name":"box"}`)
	if sb4.Name() != "box" {
		t.Errorf("name %q", sb4.Name())
	}
}

func TestValidationHappensBeforeTheCore(t *testing.T) {
	bad := map[string][]SandboxOption{
		"zero cpus":           {WithCPUs(0)},
		"zero memory":         {WithMemory(0)},
		"image and snapshot":  {WithImage("a"), WithSnapshot("s")},
		"upper size alone":    {WithOCIUpperSize(10)},
		"upper size on disk":  {WithImageDisk("/d.raw", ""), WithOCIUpperSize(10)},
		"negative duration":   {WithMaxDuration(-time.Second)},
		"init without cmd":    {WithInit(InitConfig{})},
		"auto init with args": {WithInit(Init.Cmd("auto", InitOptions{Args: []string{"--x"}}))},
		"auto init with env":  {WithInit(Init.Cmd("auto", InitOptions{Env: map[string]string{"K": "V"}}))},
		"auto with env":       {WithInit(InitConfig{Cmd: "auto", Env: map[string]string{"K": "V"}})},
		"negative grace":      {WithReplaceWithGrace(-time.Second)},
		"two grace periods": {func(c *SandboxConfig) {
			a, b := time.Second, 2*time.Second
			c.ReplaceWithTimeout, c.ReplaceWithGrace = &a, &b
		}},
		"two secret sources":  {WithSecrets(SecretEntry{EnvVar: "A", Value: "v", File: "/f"})},
		"secret without env":  {WithSecrets(SecretEntry{Value: "v"})},
		"rule without action": {WithNetwork(&NetworkConfig{Rules: []PolicyRule{{Destination: "any"}}})},
		"empty mount":         {WithMounts(map[string]MountConfig{"/x": {}})},
		"unknown patch":       {WithPatches(PatchConfig{Kind: "chmod"})},
	}
	for what, opts := range bad {
		f := useFake(t, answers(map[string]string{"create": refAnswer}))
		sb, err := CreateSandbox(context.Background(), "box", opts...)
		disarm(t, sb)
		if !errors.Is(err, ErrInvalidArgument) {
			t.Errorf("%s: got %v", what, err)
		}
		if len(f.all()) != 0 {
			t.Errorf("%s: the core was called", what)
		}
	}
	f := useFake(t, answers(map[string]string{}))
	for what, err := range map[string]error{
		"create": func() error { _, err := CreateSandbox(context.Background(), ""); return err }(),
		"start":  func() error { _, err := StartSandbox(context.Background(), ""); return err }(),
		"get":    func() error { _, err := GetSandbox(context.Background(), ""); return err }(),
		"remove": RemoveSandbox(context.Background(), ""),
	} {
		if !errors.Is(err, ErrInvalidArgument) {
			t.Errorf("%s with an empty name: %v", what, err)
		}
	}
	if len(f.all()) != 0 {
		t.Error("the core was called with an empty name")
	}
}

func TestCoreValidationErrorsComeBackTyped(t *testing.T) {
	useFake(t, answers(map[string]string{"create": `{"error":{"kind":"invalid_config","message":"label key uses a reserved prefix"}}`}))
	_, err := CreateSandbox(context.Background(), "box", WithLabel("sandbox.x", "y"))
	if !errors.Is(err, ErrInvalidConfig) {
		t.Errorf("got %v", err)
	}
}

func TestPolicyRuleString(t *testing.T) {
	for _, c := range []struct {
		r    PolicyRule
		want string
	}{
		{PolicyRule{Action: PolicyActionAllow, Destination: "public"}, "allow egress public"},
		{PolicyRule{Action: PolicyActionDeny, Destination: "::1"}, "deny egress ::1"},
		{PolicyRule{Action: PolicyActionDeny, Destination: "metadata", Protocol: PolicyProtocolICMPv4}, "deny egress icmpv4 metadata"},
		{PolicyRule{Action: PolicyActionAllow, Destination: "domain=x.io"}, "allow egress domain=x.io"},
		{PolicyRule{Action: PolicyActionAllow, Destination: "", Ports: []string{"443"}}, "allow egress any 443"},
	} {
		if got := c.r.String(); got != c.want {
			t.Errorf("%+v: %q, want %q", c.r, got, c.want)
		}
	}
}

func TestOptionsMergeAndReplace(t *testing.T) {
	var c SandboxConfig
	for _, o := range []SandboxOption{
		WithScripts(map[string]string{"a": "1"}), WithScripts(map[string]string{"b": "2"}),
		WithPorts(map[uint16]uint16{1: 2}), WithPorts(map[uint16]uint16{3: 4}),
		WithImage("a"), WithImage("b"),
		WithPatches(Patch.Remove("/a")), WithPatches(Patch.Remove("/b")),
		WithMounts(map[string]MountConfig{"/a": Mount.Tmpfs(TmpfsOptions{})}),
		WithMounts(map[string]MountConfig{"/b": Mount.Tmpfs(TmpfsOptions{})}),
	} {
		o(&c)
	}
	if len(c.Scripts) != 2 || len(c.Ports) != 2 || c.Image != "b" || len(c.Patches) != 2 || len(c.Volumes) != 2 {
		t.Errorf("%+v", c)
	}
	if Mount.Named("v", MountOptions{}).Kind() != MountKindNamed || (MountConfig{Bind: "/x"}).Kind() != MountKindBind {
		t.Error("mount kinds")
	}
}
