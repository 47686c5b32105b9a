package microsandbox

import (
	"fmt"
	"sort"
	"time"
)

// SandboxConfig is the configuration the SandboxOption functions fill in for
// CreateSandbox. Zero values mean "the runtime default".
type SandboxConfig struct {
	// Name is the sandbox name (set by CreateSandbox).
	Name string
	// Image is an OCI reference, a local directory or archive path, or a disk image
	// path. Empty: the default root filesystem (busybox).
	Image string
	// ImageFstype is the inner filesystem type of a disk-image root (WithImageDisk).
	ImageFstype string
	// OCIUpperSizeMiB is the writable overlay size of an OCI image root.
	OCIUpperSizeMiB uint32
	// Snapshot is a snapshot name or path to boot from; exclusive with Image.
	Snapshot string
	// MemoryMiB is the guest memory limit in MiB.
	MemoryMiB uint32
	// CPUs is the number of virtual CPUs.
	CPUs uint8
	// Workdir is the default working directory of commands.
	Workdir string
	// Shell is the shell of Sandbox.Shell.
	Shell string
	// SecurityProfile is the in-guest security profile.
	SecurityProfile SecurityProfile
	// Hostname is the guest hostname.
	Hostname string
	// User is the default guest user of commands (name or UID).
	User string
	// Replace replaces an existing sandbox of the same name.
	Replace bool
	// ReplaceWithTimeout is the grace period between SIGTERM and SIGKILL when
	// replacing (implies Replace).
	ReplaceWithTimeout *time.Duration
	// ReplaceWithGrace is the older reference's name of ReplaceWithTimeout (the same
	// setting: replace_with_timeout on the wire). WithReplaceWithTimeout and
	// WithReplaceWithGrace set both; set directly, the two must not differ.
	ReplaceWithGrace *time.Duration
	// Env is the environment of every command.
	Env map[string]string
	// Labels are key-value labels for filtering (ListSandboxesWith).
	Labels map[string]string
	// Detached keeps the sandbox running after its handle is released.
	Detached bool
	// Ephemeral removes all of the sandbox's state once it reaches a terminal status.
	Ephemeral bool
	// Entrypoint overrides the image's entrypoint.
	Entrypoint []string
	// Init hands PID 1 to a guest init.
	Init *InitConfig
	// LogLevel is the sandbox process's log verbosity.
	LogLevel LogLevel
	// QuietLogs suppresses sandbox-level log output.
	QuietLogs bool
	// Scripts are named scripts mounted at /.msb/scripts/<name>.
	Scripts map[string]string
	// PullPolicy controls image pulls.
	PullPolicy PullPolicy
	// MaxDuration caps the sandbox's lifetime (0: unlimited).
	MaxDuration time.Duration
	// IdleTimeout stops the sandbox after this long without exec activity (0: never).
	IdleTimeout time.Duration
	// RegistryAuth holds private registry credentials.
	RegistryAuth *RegistryAuth
	// Ports maps host TCP ports to guest ports (bound on 127.0.0.1).
	Ports map[uint16]uint16
	// PortsUDP maps host UDP ports to guest ports (bound on 127.0.0.1).
	PortsUDP map[uint16]uint16
	// PortBindings are published ports with explicit bind addresses.
	PortBindings []PortBinding
	// Network configures the network stack.
	Network *NetworkConfig
	// Secrets are credentials the network proxy substitutes.
	Secrets []SecretEntry
	// Patches are rootfs modifications applied before boot.
	Patches []PatchConfig
	// Volumes are mounts keyed by guest path.
	Volumes map[string]MountConfig

	imageDisk    bool // Image is a disk image (WithImageDisk)
	upperSizeSet bool
	memorySet    bool
	cpusSet      bool
	ephemeralSet bool
}

// SandboxOption is a functional option for CreateSandbox.
type SandboxOption func(*SandboxConfig)

// WithImage sets the root filesystem: an OCI reference ("python:3.12"), a local
// directory or archive, or a disk image path. Without it the sandbox boots the default
// root filesystem (busybox).
func WithImage(image string) SandboxOption {
	return func(c *SandboxConfig) {
		c.Image = image
		c.imageDisk = false
		c.ImageFstype = ""
	}
}

// WithOCIUpperSize sets the writable overlay size, in MiB, of an OCI image root.
func WithOCIUpperSize(mebibytes uint32) SandboxOption {
	return func(c *SandboxConfig) {
		c.OCIUpperSizeMiB = mebibytes
		c.upperSizeSet = true
	}
}

// WithImageDisk uses a disk image as the root filesystem, with an optional inner
// filesystem type ("ext4"; empty to probe).
func WithImageDisk(path string, fstype string) SandboxOption {
	return func(c *SandboxConfig) {
		c.Image = path
		c.ImageFstype = fstype
		c.imageDisk = true
	}
}

// WithSnapshot boots from a snapshot artifact by name or path (exclusive with
// WithImage).
func WithSnapshot(pathOrName string) SandboxOption {
	return func(c *SandboxConfig) { c.Snapshot = pathOrName }
}

// WithMemory sets the guest memory limit in MiB.
func WithMemory(mebibytes uint32) SandboxOption {
	return func(c *SandboxConfig) {
		c.MemoryMiB = mebibytes
		c.memorySet = true
	}
}

// WithCPUs sets the number of virtual CPUs.
func WithCPUs(cpus uint8) SandboxOption {
	return func(c *SandboxConfig) {
		c.CPUs = cpus
		c.cpusSet = true
	}
}

// WithWorkdir sets the default working directory of commands.
func WithWorkdir(path string) SandboxOption {
	return func(c *SandboxConfig) { c.Workdir = path }
}

// WithShell sets the shell Sandbox.Shell runs scripts with (default /bin/sh).
func WithShell(shell string) SandboxOption {
	return func(c *SandboxConfig) { c.Shell = shell }
}

// WithSecurityProfile sets the in-guest security profile.
func WithSecurityProfile(profile SecurityProfile) SandboxOption {
	return func(c *SandboxConfig) { c.SecurityProfile = profile }
}

func mergeMap(dst *map[string]string, src map[string]string) {
	if *dst == nil {
		*dst = make(map[string]string, len(src))
	}
	for k, v := range src {
		(*dst)[k] = v
	}
}

// WithEnv adds environment variables for every command; repeated calls merge.
func WithEnv(env map[string]string) SandboxOption {
	return func(c *SandboxConfig) { mergeMap(&c.Env, env) }
}

// WithLabels attaches labels; repeated calls merge.
func WithLabels(labels map[string]string) SandboxOption {
	return func(c *SandboxConfig) { mergeMap(&c.Labels, labels) }
}

// WithLabel attaches one label.
func WithLabel(key, value string) SandboxOption {
	return func(c *SandboxConfig) { mergeMap(&c.Labels, map[string]string{key: value}) }
}

// WithHostname sets the guest hostname.
func WithHostname(hostname string) SandboxOption {
	return func(c *SandboxConfig) { c.Hostname = hostname }
}

// WithUser sets the default guest user of commands (name or UID).
func WithUser(user string) SandboxOption {
	return func(c *SandboxConfig) { c.User = user }
}

// WithReplace replaces an existing sandbox of the same name (SIGTERM, up to 10 s,
// then SIGKILL).
func WithReplace() SandboxOption {
	return func(c *SandboxConfig) { c.Replace = true }
}

// WithReplaceWithTimeout is WithReplace with the given grace period between SIGTERM
// and SIGKILL (zero kills at once).
func WithReplaceWithTimeout(timeout time.Duration) SandboxOption {
	return func(c *SandboxConfig) {
		c.Replace = true
		t, g := timeout, timeout
		c.ReplaceWithTimeout, c.ReplaceWithGrace = &t, &g
	}
}

// WithReplaceWithGrace is WithReplaceWithTimeout under the older reference's name: a
// replace with the given grace period between SIGTERM and SIGKILL (zero kills at
// once). It implies WithReplace.
func WithReplaceWithGrace(grace time.Duration) SandboxOption {
	return WithReplaceWithTimeout(grace)
}

// WithDetached creates the sandbox detached: the VM keeps running after its handle is
// released (Close does not stop it, unlike the reference says: the handle does not own
// it, OwnsLifecycle is false) or the Go process exits; reattach with GetSandbox, end it
// with Stop or Kill.
func WithDetached() SandboxOption {
	return func(c *SandboxConfig) { c.Detached = true }
}

// WithEphemeral marks whether the runtime removes all of the sandbox's state once it
// reaches a terminal status.
func WithEphemeral(ephemeral bool) SandboxOption {
	return func(c *SandboxConfig) {
		c.Ephemeral = ephemeral
		c.ephemeralSet = true
	}
}

// WithEntrypoint overrides the image's entrypoint.
func WithEntrypoint(cmd ...string) SandboxOption {
	return func(c *SandboxConfig) { c.Entrypoint = append([]string(nil), cmd...) }
}

// WithInit hands PID 1 to a guest init; build cfg with Init.
func WithInit(cfg InitConfig) SandboxOption {
	return func(c *SandboxConfig) {
		v := cfg
		c.Init = &v
	}
}

// WithLogLevel sets the sandbox process's log verbosity.
func WithLogLevel(level LogLevel) SandboxOption {
	return func(c *SandboxConfig) { c.LogLevel = level }
}

// WithQuietLogs suppresses sandbox-level log output.
func WithQuietLogs() SandboxOption {
	return func(c *SandboxConfig) { c.QuietLogs = true }
}

// WithScripts adds named scripts mounted at /.msb/scripts/<name>; repeated calls merge.
func WithScripts(scripts map[string]string) SandboxOption {
	return func(c *SandboxConfig) { mergeMap(&c.Scripts, scripts) }
}

// WithPullPolicy sets when the image is pulled.
func WithPullPolicy(p PullPolicy) SandboxOption {
	return func(c *SandboxConfig) { c.PullPolicy = p }
}

// WithMaxDuration caps the sandbox's lifetime (0: unlimited; rounded up to seconds).
func WithMaxDuration(d time.Duration) SandboxOption {
	return func(c *SandboxConfig) { c.MaxDuration = d }
}

// WithIdleTimeout stops the sandbox after this long without exec activity (0: never;
// rounded up to seconds).
func WithIdleTimeout(d time.Duration) SandboxOption {
	return func(c *SandboxConfig) { c.IdleTimeout = d }
}

// RegistryAuth holds credentials for a private OCI registry.
type RegistryAuth struct {
	Username string
	Password string
}

// WithRegistryAuth sets credentials for pulling from a private registry.
func WithRegistryAuth(auth RegistryAuth) SandboxOption {
	return func(c *SandboxConfig) {
		a := auth
		c.RegistryAuth = &a
	}
}

func mergePorts(dst *map[uint16]uint16, src map[uint16]uint16) {
	if *dst == nil {
		*dst = make(map[uint16]uint16, len(src))
	}
	for h, g := range src {
		(*dst)[h] = g
	}
}

// WithPorts publishes guest TCP ports on host ports (key: host port, value: guest
// port), bound on 127.0.0.1; repeated calls merge.
func WithPorts(ports map[uint16]uint16) SandboxOption {
	return func(c *SandboxConfig) { mergePorts(&c.Ports, ports) }
}

// WithPortsUDP publishes guest UDP ports on host ports, bound on 127.0.0.1.
func WithPortsUDP(ports map[uint16]uint16) SandboxOption {
	return func(c *SandboxConfig) { mergePorts(&c.PortsUDP, ports) }
}

// PortProtocol is the protocol of a published port.
type PortProtocol string

const (
	PortProtocolTCP PortProtocol = "tcp"
	PortProtocolUDP PortProtocol = "udp"
)

// PortBinding publishes a guest port on an explicit host address.
type PortBinding struct {
	// Bind is the host address ("0.0.0.0"); empty: 127.0.0.1.
	Bind      string
	HostPort  uint16
	GuestPort uint16
	// Protocol defaults to TCP.
	Protocol PortProtocol
}

// WithPortBindings publishes ports on explicit host bind addresses.
func WithPortBindings(bindings ...PortBinding) SandboxOption {
	return func(c *SandboxConfig) { c.PortBindings = append(c.PortBindings, bindings...) }
}

// WithNetwork configures the network stack.
func WithNetwork(net *NetworkConfig) SandboxOption {
	return func(c *SandboxConfig) { c.Network = net }
}

// WithSecrets appends secrets the network proxy substitutes (they never enter the VM).
func WithSecrets(secrets ...SecretEntry) SandboxOption {
	return func(c *SandboxConfig) { c.Secrets = append(c.Secrets, secrets...) }
}

// WithPatches appends rootfs patches applied before boot; build them with Patch.
func WithPatches(patches ...PatchConfig) SandboxOption {
	return func(c *SandboxConfig) { c.Patches = append(c.Patches, patches...) }
}

// WithMounts adds volume mounts keyed by guest path; build them with Mount. Repeated
// calls merge.
func WithMounts(mounts map[string]MountConfig) SandboxOption {
	return func(c *SandboxConfig) {
		if c.Volumes == nil {
			c.Volumes = make(map[string]MountConfig, len(mounts))
		}
		for k, v := range mounts {
			c.Volumes[k] = v
		}
	}
}

// ---------------------------------------------------------------------------------
// Init

// InitConfig is a guest PID-1 init; build it with Init.
type InitConfig struct {
	// Cmd is the init's absolute path in the guest, or "auto".
	Cmd string
	// Args are the arguments after argv[0].
	Args []string
	// Env is extra environment of the init.
	Env map[string]string
}

// InitOptions tunes Init.Cmd.
type InitOptions struct {
	Args []string
	Env  map[string]string
}

type initFactory struct{}

// Init builds InitConfig values for WithInit.
var Init initFactory

// Auto probes the usual init paths of the image (/sbin/init, /lib/systemd/systemd, ...).
func (initFactory) Auto() InitConfig { return InitConfig{Cmd: "auto"} }

// Cmd names the init binary (an absolute guest path) with optional argv and env.
// Cmd("auto", ...) is Auto: with arguments or environment, CreateSandbox refuses it
// (ErrInvalidArgument), as the core's auto init takes none.
func (initFactory) Cmd(cmd string, opts InitOptions) InitConfig {
	return InitConfig{Cmd: cmd, Args: append([]string(nil), opts.Args...), Env: opts.Env}
}

// ---------------------------------------------------------------------------------
// Patches

// PatchKind discriminates PatchConfig.
type PatchKind string

const (
	PatchKindText     PatchKind = "text"
	PatchKindAppend   PatchKind = "append"
	PatchKindMkdir    PatchKind = "mkdir"
	PatchKindRemove   PatchKind = "remove"
	PatchKindSymlink  PatchKind = "symlink"
	PatchKindCopyFile PatchKind = "copy_file"
	PatchKindCopyDir  PatchKind = "copy_dir"
)

// PatchConfig is one rootfs modification applied before boot; build it with Patch.
type PatchConfig struct {
	Kind PatchKind
	// Path is the guest path (text, append, mkdir, remove).
	Path string
	// Content is the text (text, append).
	Content string
	// Mode is the file or directory mode (text, mkdir, copy_file).
	Mode *uint32
	// Replace overwrites an existing path (text, symlink, copy_file, copy_dir).
	Replace bool
	// Src is the host source path (copy_file, copy_dir).
	Src string
	// Dst is the guest destination path (copy_file, copy_dir).
	Dst string
	// Target is what the symlink points to.
	Target string
	// Link is the symlink's path.
	Link string
}

// PatchOptions tunes the Patch methods that take a mode and a replace flag.
type PatchOptions struct {
	Mode    *uint32
	Replace bool
}

type patchFactory struct{}

// Patch builds PatchConfig values for WithPatches.
var Patch patchFactory

// Text writes UTF-8 text at path.
func (patchFactory) Text(path, content string, opts PatchOptions) PatchConfig {
	return PatchConfig{Kind: PatchKindText, Path: path, Content: content, Mode: opts.Mode, Replace: opts.Replace}
}

// Append appends content to an existing file.
func (patchFactory) Append(path, content string) PatchConfig {
	return PatchConfig{Kind: PatchKindAppend, Path: path, Content: content}
}

// Mkdir creates a directory (idempotent); only opts.Mode applies.
func (patchFactory) Mkdir(path string, opts PatchOptions) PatchConfig {
	return PatchConfig{Kind: PatchKindMkdir, Path: path, Mode: opts.Mode}
}

// Remove deletes a file or directory (idempotent).
func (patchFactory) Remove(path string) PatchConfig {
	return PatchConfig{Kind: PatchKindRemove, Path: path}
}

// Symlink creates link pointing to target; only opts.Replace applies.
func (patchFactory) Symlink(target, link string, opts PatchOptions) PatchConfig {
	return PatchConfig{Kind: PatchKindSymlink, Target: target, Link: link, Replace: opts.Replace}
}

// CopyFile copies the host file src to dst in the guest root.
func (patchFactory) CopyFile(src, dst string, opts PatchOptions) PatchConfig {
	return PatchConfig{Kind: PatchKindCopyFile, Src: src, Dst: dst, Mode: opts.Mode, Replace: opts.Replace}
}

// CopyDir copies the host directory src to dst in the guest root; only opts.Replace
// applies.
func (patchFactory) CopyDir(src, dst string, opts PatchOptions) PatchConfig {
	return PatchConfig{Kind: PatchKindCopyDir, Src: src, Dst: dst, Replace: opts.Replace}
}

func modeValue(m *uint32) any {
	if m == nil {
		return nil
	}
	return *m
}

func (p PatchConfig) wire() (map[string]any, error) {
	switch p.Kind {
	case PatchKindText:
		return map[string]any{"op": "text", "path": p.Path, "content": p.Content, "mode": modeValue(p.Mode), "replace": p.Replace}, nil
	case PatchKindAppend:
		return map[string]any{"op": "append", "path": p.Path, "content": p.Content}, nil
	case PatchKindMkdir:
		return map[string]any{"op": "mkdir", "path": p.Path, "mode": modeValue(p.Mode)}, nil
	case PatchKindRemove:
		return map[string]any{"op": "remove", "path": p.Path}, nil
	case PatchKindSymlink:
		return map[string]any{"op": "symlink", "target": p.Target, "link": p.Link, "replace": p.Replace}, nil
	case PatchKindCopyFile:
		return map[string]any{"op": "copy_file", "src": p.Src, "dst": p.Dst, "mode": modeValue(p.Mode), "replace": p.Replace}, nil
	case PatchKindCopyDir:
		return map[string]any{"op": "copy_dir", "src": p.Src, "dst": p.Dst, "replace": p.Replace}, nil
	}
	return nil, invalidArgument(fmt.Sprintf("patch: unknown kind %q", p.Kind))
}

// ---------------------------------------------------------------------------------
// Mounts

// MountKind discriminates MountConfig.
type MountKind string

const (
	MountKindBind  MountKind = "bind"
	MountKindNamed MountKind = "named"
	MountKindTmpfs MountKind = "tmpfs"
	MountKindDisk  MountKind = "disk"
)

// MountConfig is a volume mounted at a guest path; build it with Mount.
type MountConfig struct {
	kind MountKind

	// Bind is the host directory of a bind mount.
	Bind string
	// Named is the name of a named volume.
	Named string
	// Tmpfs marks an in-memory filesystem.
	Tmpfs bool
	// Disk is the host disk image of a disk mount.
	Disk string
	// Fstype is the filesystem inside a disk image ("ext4"; empty: probe).
	Fstype string
	// Readonly mounts it read-only.
	Readonly bool
	// SizeMiB is the size limit of a tmpfs.
	SizeMiB uint32
}

// Kind reports which flavour of mount this is.
func (m MountConfig) Kind() MountKind {
	if m.kind != "" {
		return m.kind
	}
	switch {
	case m.Bind != "":
		return MountKindBind
	case m.Named != "":
		return MountKindNamed
	case m.Tmpfs:
		return MountKindTmpfs
	case m.Disk != "":
		return MountKindDisk
	}
	return ""
}

// MountOptions tunes Mount.Bind and Mount.Named.
type MountOptions struct {
	Readonly bool
}

// TmpfsOptions tunes Mount.Tmpfs.
type TmpfsOptions struct {
	SizeMiB  uint32
	Readonly bool
}

// DiskOptions tunes Mount.Disk.
type DiskOptions struct {
	// Fstype is the filesystem inside the image ("ext4"); empty: probe.
	Fstype   string
	Readonly bool
}

type mountFactory struct{}

// Mount builds MountConfig values for WithMounts.
var Mount mountFactory

// Bind mounts a host directory.
func (mountFactory) Bind(hostPath string, opts MountOptions) MountConfig {
	return MountConfig{kind: MountKindBind, Bind: hostPath, Readonly: opts.Readonly}
}

// Named mounts a named persistent volume.
func (mountFactory) Named(name string, opts MountOptions) MountConfig {
	return MountConfig{kind: MountKindNamed, Named: name, Readonly: opts.Readonly}
}

// Tmpfs mounts an in-memory filesystem.
func (mountFactory) Tmpfs(opts TmpfsOptions) MountConfig {
	return MountConfig{kind: MountKindTmpfs, Tmpfs: true, SizeMiB: opts.SizeMiB, Readonly: opts.Readonly}
}

// Disk mounts a host disk image.
func (mountFactory) Disk(hostPath string, opts DiskOptions) MountConfig {
	return MountConfig{kind: MountKindDisk, Disk: hostPath, Fstype: opts.Fstype, Readonly: opts.Readonly}
}

func (m MountConfig) wire(guest string) (map[string]any, error) {
	v := map[string]any{}
	switch m.Kind() {
	case MountKindBind:
		v["bind"] = m.Bind
	case MountKindNamed:
		v["named"] = m.Named
	case MountKindTmpfs:
		v["tmpfs"] = true
	case MountKindDisk:
		v["disk"] = m.Disk
		if m.Fstype != "" {
			v["fstype"] = m.Fstype
		}
	default:
		return nil, invalidArgument(fmt.Sprintf("mount %q: no source (use Mount.Bind, Named, Tmpfs or Disk)", guest))
	}
	if m.Readonly {
		v["readonly"] = true
	}
	if m.SizeMiB > 0 {
		v["size_mib"] = m.SizeMiB
	}
	return v, nil
}

// ---------------------------------------------------------------------------------
// The configuration as the core receives it (docs/bindings.md, "config" of create).

func (c *SandboxConfig) wire() (map[string]any, error) {
	w := map[string]any{}
	if c.Image != "" && c.Snapshot != "" {
		return nil, invalidArgument("WithImage and WithSnapshot are mutually exclusive")
	}
	if c.upperSizeSet || c.OCIUpperSizeMiB > 0 {
		if c.Image == "" || c.imageDisk {
			return nil, invalidArgument("WithOCIUpperSize needs an OCI image (WithImage)")
		}
		if c.OCIUpperSizeMiB == 0 {
			return nil, invalidArgument("WithOCIUpperSize: size must be positive")
		}
	}
	switch {
	case c.imageDisk:
		if c.Image == "" {
			return nil, invalidArgument("WithImageDisk: empty path")
		}
		disk := map[string]any{"disk": c.Image}
		if c.ImageFstype != "" {
			disk["fstype"] = c.ImageFstype
		}
		w["image"] = disk
	case c.OCIUpperSizeMiB > 0:
		w["image"] = map[string]any{"oci": c.Image, "upper_size_mib": c.OCIUpperSizeMiB}
	case c.ImageFstype != "":
		w["image"] = map[string]any{"disk": c.Image, "fstype": c.ImageFstype}
	case c.Image != "":
		w["image"] = c.Image
	}
	if c.Snapshot != "" {
		w["snapshot"] = c.Snapshot
	}
	if c.cpusSet || c.CPUs > 0 {
		if c.CPUs == 0 {
			return nil, invalidArgument("WithCPUs: at least one CPU")
		}
		w["cpus"] = c.CPUs
	}
	if c.memorySet || c.MemoryMiB > 0 {
		if c.MemoryMiB == 0 {
			return nil, invalidArgument("WithMemory: memory must be positive")
		}
		w["memory"] = c.MemoryMiB
	}
	setString(w, "workdir", c.Workdir)
	setString(w, "shell", c.Shell)
	setString(w, "hostname", c.Hostname)
	setString(w, "user", c.User)
	setString(w, "security_profile", string(c.SecurityProfile))
	setString(w, "pull_policy", string(c.PullPolicy))
	setString(w, "log_level", string(c.LogLevel))
	if len(c.Entrypoint) > 0 {
		w["entrypoint"] = c.Entrypoint
	}
	if c.Init != nil {
		switch {
		case c.Init.Cmd == "auto":
			// The wire's "auto" carries no arguments or environment (the core probes the
			// image's init and runs it as it is); an init path named "auto" is not a thing.
			if len(c.Init.Args) > 0 || len(c.Init.Env) > 0 {
				return nil, invalidArgument(`WithInit: the "auto" init takes no arguments or environment; name the init's absolute path with Init.Cmd to pass them`)
			}
			w["init"] = "auto"
		case c.Init.Cmd == "":
			return nil, invalidArgument("WithInit: empty command")
		default:
			init := map[string]any{"cmd": c.Init.Cmd}
			if len(c.Init.Args) > 0 {
				init["args"] = c.Init.Args
			}
			if len(c.Init.Env) > 0 {
				init["env"] = c.Init.Env
			}
			w["init"] = init
		}
	}
	grace := c.ReplaceWithTimeout
	if c.ReplaceWithGrace != nil {
		if grace != nil && *grace != *c.ReplaceWithGrace {
			return nil, invalidArgument(fmt.Sprintf("ReplaceWithTimeout (%s) and ReplaceWithGrace (%s) are one setting with two values", *grace, *c.ReplaceWithGrace))
		}
		grace = c.ReplaceWithGrace
	}
	if c.Replace || grace != nil {
		w["replace"] = true
	}
	if grace != nil {
		if *grace < 0 {
			return nil, invalidArgument("WithReplaceWithTimeout/WithReplaceWithGrace: negative grace period")
		}
		w["replace_with_timeout"] = secondsMs(*grace)
	}
	if c.MaxDuration < 0 || c.IdleTimeout < 0 {
		return nil, invalidArgument("WithMaxDuration/WithIdleTimeout: negative duration")
	}
	if c.MaxDuration > 0 {
		w["max_duration"] = seconds(c.MaxDuration)
	}
	if c.IdleTimeout > 0 {
		w["idle_timeout"] = seconds(c.IdleTimeout)
	}
	if len(c.Env) > 0 {
		w["env"] = c.Env
	}
	if len(c.Scripts) > 0 {
		w["scripts"] = c.Scripts
	}
	if len(c.Labels) > 0 {
		w["labels"] = c.Labels
	}
	if c.QuietLogs {
		w["quiet_logs"] = true
	}
	if c.ephemeralSet || c.Ephemeral {
		w["ephemeral"] = c.Ephemeral
	}
	if c.RegistryAuth != nil {
		w["registry_auth"] = map[string]any{"username": c.RegistryAuth.Username, "password": c.RegistryAuth.Password}
	}
	if len(c.Volumes) > 0 {
		vols := make(map[string]any, len(c.Volumes))
		for guest, m := range c.Volumes {
			v, err := m.wire(guest)
			if err != nil {
				return nil, err
			}
			vols[guest] = v
		}
		w["volumes"] = vols
	}
	if len(c.Patches) > 0 {
		patches := make([]any, 0, len(c.Patches))
		for _, p := range c.Patches {
			v, err := p.wire()
			if err != nil {
				return nil, err
			}
			patches = append(patches, v)
		}
		w["patches"] = patches
	}
	if ports := c.wirePorts(); len(ports) > 0 {
		w["ports"] = ports
	}
	if c.Network != nil {
		n, err := c.Network.wire()
		if err != nil {
			return nil, err
		}
		w["network"] = n
	}
	if len(c.Secrets) > 0 {
		secrets := make([]any, 0, len(c.Secrets))
		for _, s := range c.Secrets {
			v, err := s.wire()
			if err != nil {
				return nil, err
			}
			secrets = append(secrets, v)
		}
		w["secrets"] = secrets
	}
	return w, nil
}

func setString(w map[string]any, key, value string) {
	if value != "" {
		w[key] = value
	}
}

// wirePorts lists the published ports: the maps in host-port order, then the explicit
// bindings in their order.
func (c *SandboxConfig) wirePorts() []any {
	var out []any
	add := func(m map[uint16]uint16, proto PortProtocol) {
		hosts := make([]int, 0, len(m))
		for h := range m {
			hosts = append(hosts, int(h))
		}
		sort.Ints(hosts)
		for _, h := range hosts {
			out = append(out, map[string]any{"host": h, "guest": m[uint16(h)], "protocol": string(proto)})
		}
	}
	add(c.Ports, PortProtocolTCP)
	add(c.PortsUDP, PortProtocolUDP)
	for _, b := range c.PortBindings {
		proto := b.Protocol
		if proto == "" {
			proto = PortProtocolTCP
		}
		p := map[string]any{"host": b.HostPort, "guest": b.GuestPort, "protocol": string(proto)}
		if b.Bind != "" {
			p["bind"] = b.Bind
		}
		out = append(out, p)
	}
	return out
}
