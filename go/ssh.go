package microsandbox

import (
	"context"
	"encoding/base64"
	"runtime"
	"strings"
)

// SandboxSSHOps is the SSH access of a running sandbox (Sandbox.SSH): an in-process
// client that needs no port (OpenClient), or an SSH server endpoint on 127.0.0.1 that
// ssh(1) and other clients can reach (Server).
type SandboxSSHOps struct {
	sandbox *Sandbox
}

// SSH returns the sandbox's SSH accessor.
func (s *Sandbox) SSH() *SandboxSSHOps { return &SandboxSSHOps{sandbox: s} }

type sshClientRef struct {
	Client uint64 `json:"client"`
}

// OpenClient connects an SSH client to the sandbox in process (no TCP port is opened).
// Close the client when done.
func (o *SandboxSSHOps) OpenClient(ctx context.Context) (*SSHClient, error) {
	var w sshClientRef
	if err := o.sandbox.call(ctx, "ssh.open_client", nil, &w); err != nil {
		return nil, err
	}
	return newSSHClient(w.Client, o.sandbox, nil), nil
}

type sshConfig struct {
	port    *uint16
	keys    []string
	keysSet bool
}

// SSHOption configures SandboxSSHOps.Server.
type SSHOption func(*sshConfig)

// WithSSHPort makes the endpoint listen on this port of 127.0.0.1 (default 0: a port
// the system assigns; SSHEndpoint.Port says which).
func WithSSHPort(port uint16) SSHOption {
	return func(c *sshConfig) { c.port = &port }
}

// WithAuthorizedKeys authorises OpenSSH public keys ("ssh-ed25519 AAAA... comment").
// An argument may hold several lines (an authorized_keys file's content): each line is
// one key, blank lines and # comments are skipped. Repeated calls add keys.
func WithAuthorizedKeys(lines ...string) SSHOption {
	return func(c *sshConfig) {
		c.keysSet = true
		for _, text := range lines {
			for _, line := range strings.Split(text, "\n") {
				line = strings.TrimSpace(line)
				if line == "" || strings.HasPrefix(line, "#") {
					continue
				}
				c.keys = append(c.keys, line)
			}
		}
	}
}

type wireSSHEndpoint struct {
	Endpoint       uint64 `json:"endpoint"`
	Addr           string `json:"addr"`
	Port           uint16 `json:"port"`
	HostKey        string `json:"host_key"`
	Fingerprint    string `json:"fingerprint"`
	KnownHostsLine string `json:"known_hosts_line"`
}

// Server starts an SSH server endpoint for the sandbox on 127.0.0.1: `ssh -p PORT
// root@127.0.0.1` with an authorised key gets a shell in the sandbox (the login name is
// the guest user). The core refuses an endpoint without an authorised key
// (ErrInvalidConfig): pass at least one with WithAuthorizedKeys; Authorize adds more
// later and SSHEndpoint.OpenClient authorises a fresh key of its own. Shut it down
// (Shutdown or Close) when done.
func (o *SandboxSSHOps) Server(ctx context.Context, opts ...SSHOption) (*SSHEndpoint, error) {
	var c sshConfig
	for _, opt := range opts {
		if opt != nil {
			opt(&c)
		}
	}
	args := map[string]any{}
	if c.port != nil {
		args["port"] = *c.port
	}
	if c.keysSet {
		keys := c.keys
		if keys == nil {
			keys = []string{}
		}
		args["authorized_keys"] = keys
	}
	var w wireSSHEndpoint
	if err := o.sandbox.call(ctx, "ssh.serve", args, &w); err != nil {
		return nil, err
	}
	e := &SSHEndpoint{
		h:              newHandleRef(w.Endpoint, "SSH endpoint"),
		sandbox:        o.sandbox,
		addr:           w.Addr,
		port:           w.Port,
		hostKey:        w.HostKey,
		fingerprint:    w.Fingerprint,
		knownHostsLine: w.KnownHostsLine,
	}
	runtime.SetFinalizer(e, func(e *SSHEndpoint) { releaseInBackground(e.h) })
	return e, nil
}

// SSHEndpoint is an SSH server of a sandbox listening on 127.0.0.1 (SandboxSSHOps.Server).
// Shutdown (or Close) stops it and ends its sessions. It is safe for concurrent use.
type SSHEndpoint struct {
	h              *handleRef
	sandbox        *Sandbox // kept reachable while the endpoint is
	addr           string
	port           uint16
	hostKey        string
	fingerprint    string
	knownHostsLine string
}

// Addr returns where the endpoint listens, "127.0.0.1:PORT" (for net.Dial).
func (e *SSHEndpoint) Addr() string { return e.addr }

// Port returns the port it listens on.
func (e *SSHEndpoint) Port() uint16 { return e.port }

// HostKey returns the sandbox's host public key in OpenSSH form ("ssh-ed25519 AAAA...").
func (e *SSHEndpoint) HostKey() string { return e.hostKey }

// Fingerprint returns the host key's fingerprint as ssh(1) prints it ("SHA256:...").
func (e *SSHEndpoint) Fingerprint() string { return e.fingerprint }

// KnownHostsLine returns a known_hosts line for the endpoint ("[127.0.0.1]:PORT
// ssh-ed25519 AAAA...").
func (e *SSHEndpoint) KnownHostsLine() string { return e.knownHostsLine }

func (e *SSHEndpoint) call(ctx context.Context, method string, args map[string]any, out any) error {
	return e.h.call(ctx, e, method, args, out)
}

// Authorize authorises one more OpenSSH public key ("ssh-ed25519 AAAA... comment") from
// now on; a malformed key is an ErrInvalidArgument error.
func (e *SSHEndpoint) Authorize(ctx context.Context, key string) error {
	return e.call(ctx, "ssh.authorize", map[string]any{"key": key}, nil)
}

// OpenClient connects an SSH client to the endpoint over TCP as user ("" is root), with
// a fresh key the endpoint authorises. Close the client when done.
func (e *SSHEndpoint) OpenClient(ctx context.Context, user string) (*SSHClient, error) {
	args := map[string]any{}
	setString(args, "user", user)
	var w sshClientRef
	if err := e.call(ctx, "ssh.endpoint_client", args, &w); err != nil {
		return nil, err
	}
	return newSSHClient(w.Client, e.sandbox, e), nil
}

// finish runs a call that consumes the handle (ssh.shutdown, ssh.close) by consume's
// rule: the handle stays only after ErrBusy (another call is using it),
// ErrInvalidArgument, or a context done before the call started. A handle that ended
// before (or that the core no longer knows) is finished: nil, a doubtful one being
// released first.
func finish(ctx context.Context, h *handleRef, method string) error {
	if _, err := h.get(); err != nil {
		_, err := h.close()
		return err
	}
	err := consume(ctx, h, method, nil, nil)
	if IsKind(err, ErrInvalidHandle) {
		_, _ = h.close()
		return nil
	}
	return err
}

// Shutdown stops listening and ends every session. Calling it again, or Close after it,
// returns nil.
func (e *SSHEndpoint) Shutdown(ctx context.Context) error {
	err := finish(ctx, e.h, "ssh.shutdown")
	runtime.KeepAlive(e)
	return err
}

// Close is Shutdown without a deadline.
func (e *SSHEndpoint) Close() error { return e.Shutdown(context.Background()) }

// SSHClient is a connected SSH client (SandboxSSHOps.OpenClient, SSHEndpoint.OpenClient).
// Close it when done. It is safe for concurrent use.
type SSHClient struct {
	h        *handleRef
	sandbox  *Sandbox     // kept reachable while the client is
	endpoint *SSHEndpoint // likewise, for a client over an endpoint
}

func newSSHClient(id uint64, sb *Sandbox, ep *SSHEndpoint) *SSHClient {
	c := &SSHClient{h: newHandleRef(id, "SSH client"), sandbox: sb, endpoint: ep}
	runtime.SetFinalizer(c, func(c *SSHClient) { releaseInBackground(c.h) })
	return c
}

type wireSSHOutput struct {
	StdoutB64  string  `json:"stdout_b64"`
	StderrB64  string  `json:"stderr_b64"`
	ExitStatus *uint32 `json:"exit_status"`
	ExitSignal *string `json:"exit_signal"`
}

// Exec runs command on a new session channel (the server's shell interprets it) and
// waits for it, collecting its output. A non-zero exit status is not an error.
func (c *SSHClient) Exec(ctx context.Context, command string) (*SSHOutput, error) {
	var w wireSSHOutput
	if err := c.h.call(ctx, c, "ssh.exec", map[string]any{"command": command}, &w); err != nil {
		return nil, err
	}
	stdout, err := base64.StdEncoding.DecodeString(w.StdoutB64)
	if err != nil {
		return nil, newError(ErrInternal, "ssh output: bad stdout_b64: "+err.Error())
	}
	stderr, err := base64.StdEncoding.DecodeString(w.StderrB64)
	if err != nil {
		return nil, newError(ErrInternal, "ssh output: bad stderr_b64: "+err.Error())
	}
	out := &SSHOutput{Stdout: stdout, Stderr: stderr, ExitStatus: w.ExitStatus}
	if w.ExitSignal != nil {
		out.ExitSignal = *w.ExitSignal
	}
	return out, nil
}

// Close disconnects the client. Calling it again returns nil.
func (c *SSHClient) Close() error {
	err := finish(context.Background(), c.h, "ssh.close")
	runtime.KeepAlive(c)
	return err
}

// SSHOutput is the collected result of SSHClient.Exec.
type SSHOutput struct {
	// Stdout is the command's standard output.
	Stdout []byte
	// Stderr is the command's standard error.
	Stderr []byte
	// ExitStatus is the exit status, nil when the command did not exit by itself (a
	// signal ended it, or the server reported none).
	ExitStatus *uint32
	// ExitSignal is the name of the signal that ended the command ("TERM", "KILL",
	// ...), "" when none did.
	ExitSignal string
}

// StdoutString returns the standard output as a string.
func (o *SSHOutput) StdoutString() string { return string(o.Stdout) }

// StderrString returns the standard error as a string.
func (o *SSHOutput) StderrString() string { return string(o.Stderr) }

// ExitCode returns the exit status, -1 when there is none.
func (o *SSHOutput) ExitCode() int {
	if o.ExitStatus == nil {
		return -1
	}
	return int(*o.ExitStatus)
}

// Success reports whether the command exited with status 0.
func (o *SSHOutput) Success() bool { return o.ExitStatus != nil && *o.ExitStatus == 0 }
