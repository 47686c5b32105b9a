package microsandbox

import (
	"context"
	"errors"
	"testing"
	"time"
)

// storedConfig is the config of a real `get` answer (the core's SandboxHandle as the
// state database holds it), copied from a sandbox created with WithMemory(384),
// WithCPUs(1), WithEnv(A=1, B=two), WithWorkdir("/tmp"), WithShell("/bin/sh"),
// WithHostname("probe-host"), WithUser("root"), WithLabel("probe", "yes"),
// WithScripts(hi), WithEntrypoint("sh", "-c"), WithIdleTimeout(600s),
// WithMaxDuration(900s), WithLogLevel(info) and the network disabled.
const storedConfig = `{"cpus":1,"entrypoint":["sh","-c"],"env":[["A","1"],["B","two"]],"ephemeral":false,` +
	`"hostname":"probe-host","idle_timeout_secs":600,"image":"default","init":null,"labels":{"probe":"yes"},` +
	`"log_level":"info","max_duration_secs":900,"memory_mib":384,"name":"go-probe-2439",` +
	`"network":{"dns":{"nameservers":[],"query_timeout_ms":5000,"rebind_protection":true},"enabled":false,` +
	`"max_connections":1024,"mtu":65520,"policy":{"default_egress":"deny","default_ingress":"allow",` +
	`"rules":[{"action":"allow","destination":{"group":"public"},"direction":"egress","ports":[],"protocols":[]}]},` +
	`"ports":[],"subnet":"10.200.200.0/30","tls":{"block_quic":true,"bypass":[],"enabled":false,` +
	`"intercept_ca_cert":null,"intercept_ca_key":null,"intercepted_ports":[443],"upstream_ca_certs":[],` +
	`"upstream_ca_certs_for":[],"verify_upstream":true,"verify_upstream_for":[]}},"patches":[],` +
	`"pull_policy":"if-missing","quiet_logs":false,"scripts":[["hi","echo hi"]],"secrets":[],` +
	`"security_profile":"default","shell":"/bin/sh","upper_size_mib":null,"user":"root","volumes":[],"workdir":"/tmp"}`

func handleWithConfig(t *testing.T, config string) *SandboxHandle {
	t.Helper()
	useFake(t, answers(map[string]string{
		"get": `{"ok":{"name":"go-probe-2439","status":"running","config":` + config + `,"labels":{"probe":"yes"},` +
			`"created_at_ms":1765105000000,"updated_at_ms":1765105020000,"vmm_pid":4242,"detached":true,` +
			`"exit_reason":null,"ephemeral":false}}`,
	}))
	h, err := GetSandbox(context.Background(), "go-probe-2439")
	if err != nil {
		t.Fatal(err)
	}
	return h
}

func TestSandboxHandleConfig(t *testing.T) {
	h := handleWithConfig(t, storedConfig)
	cfg, err := h.Config()
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Name != "go-probe-2439" || cfg.Image != "" || cfg.Snapshot != "" || cfg.MemoryMiB != 384 || cfg.CPUs != 1 ||
		cfg.Workdir != "/tmp" || cfg.Shell != "/bin/sh" || cfg.Hostname != "probe-host" || cfg.User != "root" ||
		cfg.IdleTimeout != 600*time.Second || cfg.MaxDuration != 900*time.Second || cfg.LogLevel != LogLevelInfo ||
		cfg.QuietLogs || cfg.Ephemeral || cfg.SecurityProfile != SecurityProfileDefault ||
		cfg.PullPolicy != PullPolicyIfMissing || cfg.Init != nil || !cfg.Detached || cfg.OCIUpperSizeMiB != 0 {
		t.Errorf("config %+v", cfg)
	}
	sameJSON(t, "env", cfg.Env, `{"A": "1", "B": "two"}`)
	sameJSON(t, "scripts", cfg.Scripts, `{"hi": "echo hi"}`)
	sameJSON(t, "labels", cfg.Labels, `{"probe": "yes"}`)
	sameJSON(t, "entrypoint", cfg.Entrypoint, `["sh", "-c"]`)
	if cfg.Network == nil || cfg.Network.Enabled == nil || *cfg.Network.Enabled {
		t.Errorf("network %+v", cfg.Network)
	}
	// What it decoded goes back to create as it came.
	wire, err := cfg.wire()
	if err != nil {
		t.Fatal(err)
	}
	sameJSON(t, "wire", wire, `{"memory": 384, "cpus": 1, "workdir": "/tmp", "shell": "/bin/sh",
	  "hostname": "probe-host", "user": "root", "env": {"A": "1", "B": "two"}, "scripts": {"hi": "echo hi"},
	  "labels": {"probe": "yes"}, "entrypoint": ["sh", "-c"], "idle_timeout": 600, "max_duration": 900,
	  "log_level": "info", "security_profile": "default", "pull_policy": "if-missing", "ephemeral": false,
	  "network": {"enabled": false}}`)
}

func TestSandboxHandleConfigImageForms(t *testing.T) {
	// The other RootfsSource forms and fields, as serde writes them.
	for _, c := range []struct {
		config string
		check  func(*SandboxConfig) bool
	}{
		{`{"name":"a","image":{"oci":"python:3.12"},"upper_size_mib":2048,"memory_mib":512,"cpus":2,"env":[],` +
			`"init":{"path":"/lib/systemd/systemd","args":["--unit=multi-user.target"],"env":[["container","microsandbox"]]},` +
			`"security_profile":"restricted","ephemeral":true,"quiet_logs":true,"network":{"enabled":true}}`,
			func(c *SandboxConfig) bool {
				return c.Image == "python:3.12" && c.OCIUpperSizeMiB == 2048 && c.CPUs == 2 && c.Env == nil &&
					c.Init != nil && c.Init.Cmd == "/lib/systemd/systemd" && len(c.Init.Args) == 1 &&
					c.Init.Env["container"] == "microsandbox" && c.SecurityProfile == SecurityProfileRestricted &&
					c.Ephemeral && c.QuietLogs && c.Network == nil
			}},
		{`{"name":"b","image":{"disk":{"path":"/imgs/root.qcow2","format":"qcow2","fstype":"ext4"}},"init":{"path":null,"args":[],"env":[]}}`,
			func(c *SandboxConfig) bool {
				return c.Image == "/imgs/root.qcow2" && c.ImageFstype == "ext4" && c.imageDisk &&
					c.Init != nil && c.Init.Cmd == "auto" && len(c.Init.Args) == 0 && c.Init.Env == nil
			}},
		{`{"name":"c","image":{"disk":{"path":"/imgs/root.raw","format":"raw","fstype":null}}}`,
			func(c *SandboxConfig) bool { return c.Image == "/imgs/root.raw" && c.ImageFstype == "" && c.imageDisk }},
		{`{"name":"d","image":{"directory":"/srv/rootfs"}}`,
			func(c *SandboxConfig) bool { return c.Image == "/srv/rootfs" && !c.imageDisk }},
		{`{"name":"e","image":{"archive":"/srv/img.tar"}}`,
			func(c *SandboxConfig) bool { return c.Image == "/srv/img.tar" }},
		{`{"name":"f","image":{"snapshot":"/root/.microsandbox/snapshots/s1"}}`,
			func(c *SandboxConfig) bool { return c.Snapshot == "/root/.microsandbox/snapshots/s1" && c.Image == "" }},
		// Best-effort: fields of another shape are left zero, the rest is read.
		{`{"name":"g","image":{"brand_new":"x"},"env":"A=1","memory_mib":"lots","cpus":3,"labels":null}`,
			func(c *SandboxConfig) bool {
				return c.Image == "" && c.Env == nil && c.MemoryMiB == 0 && c.CPUs == 3 && c.Labels == nil
			}},
		// A map of env (should the core ever write one) is read too.
		{`{"image":"default","env":{"K":"V"}}`,
			func(c *SandboxConfig) bool { return c.Env["K"] == "V" && c.Name == "go-probe-2439" }},
	} {
		cfg, err := handleWithConfig(t, c.config).Config()
		if err != nil || !c.check(cfg) {
			t.Errorf("%s: %+v, %v", c.config, cfg, err)
		}
	}
	for _, bad := range []string{`null`, `[1]`, `"default"`} {
		if _, err := handleWithConfig(t, bad).Config(); !errors.Is(err, ErrInternal) {
			t.Errorf("%s: %v", bad, err)
		}
	}
}
