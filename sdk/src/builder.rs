//! Creating a sandbox: [`SandboxBuilder`] (from [`Sandbox::builder`]) and the steps of a
//! create, each a function below: check the options into a [`Plan`], make way for the
//! name ([`clear_name`]), claim it ([`claim_name`]), get the image ([`fetch_image`]),
//! prepare the root filesystem and persist the configuration ([`prepare_root`]), then boot
//! ([`Sandbox::boot`]) and record the sandbox as running.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use crate::config::{self, Persisted, RootfsSource, SandboxConfig};
use crate::error::{MicrosandboxError, MicrosandboxResult};
use crate::exec::ExecDefaults;
use crate::handle::{check_labels, DEFAULT_STOP_TIMEOUT};
use crate::home::{
    msb_home, private_dir, validate_name, Mebibytes, Paths, DEFAULT_MEMORY_MIB, DEFAULT_SHELL,
    MAX_SHARED_VOLUMES,
};
use crate::image::{Events, PullSession, ResolvedImage, StoreLock};
use crate::options::{Init, LogLevel, SecurityProfile};
use crate::reconcile::{reconcile, remove_all};
use crate::rootfs::PatchBuilder;
use crate::sandbox::Sandbox;
use crate::state::{open_db, NewRow, RowStatus, StateDb};
use crate::vmm::{check_kernel, find_vmm, lock_exclusive, start_lock, stop_vmm, vmm_alive};
use crate::volume::{MountBuilder, VolumeMount};

impl Sandbox {
    /// A builder for a sandbox called `name` (unique among sandboxes).
    pub fn builder(name: impl Into<String>) -> SandboxBuilder {
        SandboxBuilder {
            name: name.into(),
            cpus: 1,
            memory: Mebibytes(DEFAULT_MEMORY_MIB),
            shell: DEFAULT_SHELL.into(),
            hostname: None,
            defaults: ExecDefaults::default(),
            image: RootfsSource::Default,
            upper_size_mib: None,
            image_error: None,
            patches: PatchBuilder::default(),
            scripts: Vec::new(),
            volumes: Vec::new(),
            labels: BTreeMap::new(),
            replace: None,
            ephemeral: false,
            idle_timeout: None,
            max_duration: None,
            log_level: None,
            quiet_logs: false,
            entrypoint: None,
            security_profile: SecurityProfile::Default,
            init: None,
            pull: crate::PullOptions::default(),
            network: crate::network::NetworkBuilder::default(),
        }
    }
}

/// Options for a new sandbox ([`Sandbox::builder`]).
#[derive(Debug, Clone)]
pub struct SandboxBuilder {
    name: String,
    cpus: u8,
    memory: Mebibytes,
    shell: String,
    hostname: Option<String>,
    defaults: ExecDefaults,
    image: RootfsSource,
    upper_size_mib: Option<u32>,
    /// What [`SandboxBuilder::image_with`] found wrong (reported by `create`).
    image_error: Option<String>,
    patches: PatchBuilder,
    scripts: Vec<(String, String)>,
    volumes: Vec<(String, MountBuilder)>,
    labels: BTreeMap<String, String>,
    replace: Option<Duration>,
    ephemeral: bool,
    idle_timeout: Option<u64>,
    max_duration: Option<u64>,
    log_level: Option<LogLevel>,
    quiet_logs: bool,
    entrypoint: Option<Vec<String>>,
    security_profile: SecurityProfile,
    init: Option<Init>,
    pull: crate::PullOptions,
    network: crate::network::NetworkBuilder,
}

impl SandboxBuilder {
    /// When the image is pulled from its registry (default [`PullPolicy::IfMissing`]).
    ///
    /// [`PullPolicy::IfMissing`]: crate::PullPolicy::IfMissing
    pub fn pull_policy(mut self, policy: crate::PullPolicy) -> Self {
        self.pull = self.pull.policy(policy);
        self
    }

    /// Credentials for the image's registry (else those of `~/.docker/config.json`).
    /// They are used for this pull only and never stored.
    pub fn registry_auth(mut self, auth: crate::RegistryAuth) -> Self {
        self.pull = self.pull.auth(auth);
        self
    }

    /// All the pull settings at once (replacing policy, credentials and insecure hosts
    /// set before).
    pub fn pull_options(mut self, options: crate::PullOptions) -> Self {
        self.pull = options;
        self
    }

    /// Lets the registry `host` (`host:port` as in the reference) be reached over plain
    /// HTTP.
    pub fn insecure_registry(mut self, host: impl Into<String>) -> Self {
        self.pull = self.pull.insecure_registry(host);
        self
    }

    /// A label (for [`Sandbox::list_with`]); a later value for a key replaces an earlier
    /// one. Keys starting `sandbox.`, `microsandbox.` or `service.` are reserved.
    pub fn label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.labels.insert(key.into(), value.into());
        self
    }

    /// Several labels (merged with earlier ones).
    pub fn labels<K: Into<String>, V: Into<String>>(
        mut self,
        labels: impl IntoIterator<Item = (K, V)>,
    ) -> Self {
        for (k, v) in labels {
            self.labels.insert(k.into(), v.into());
        }
        self
    }

    /// If a sandbox of this name exists, stop it (10 s to power off, then killed), remove
    /// it and create this one. Without it, a taken name is
    /// [`MicrosandboxError::AlreadyExists`].
    pub fn replace(self) -> Self {
        self.replace_with_timeout(DEFAULT_STOP_TIMEOUT)
    }

    /// [`SandboxBuilder::replace`] with another grace period (zero: kill at once).
    pub fn replace_with_timeout(mut self, timeout: Duration) -> Self {
        self.replace = Some(timeout);
        self
    }

    /// Remove everything of the sandbox (row, writable layer, logs) once it stops.
    pub fn ephemeral(mut self, ephemeral: bool) -> Self {
        self.ephemeral = ephemeral;
        self
    }

    /// Stop the sandbox after this many seconds with no command running and no request,
    /// counted from boot; enforced by its VMM, whatever happens to this process.
    pub fn idle_timeout(mut self, secs: u64) -> Self {
        self.idle_timeout = Some(secs);
        self
    }

    /// Stop the sandbox this many seconds after it starts (running commands get 10 s to
    /// finish); enforced by its VMM, the guest cannot extend it.
    pub fn max_duration(mut self, secs: u64) -> Self {
        self.max_duration = Some(secs);
        self
    }

    /// The VMM's log verbosity (`vmm.log` in the sandbox's directory).
    pub fn log_level(mut self, level: LogLevel) -> Self {
        self.log_level = Some(level);
        self
    }

    /// The in-guest security profile of every command (default
    /// [`SecurityProfile::Default`]).
    pub fn security_profile(mut self, profile: SecurityProfile) -> Self {
        self.security_profile = profile;
        self
    }

    /// Hands PID 1 to an init of the image once the agent has set the guest up
    /// ([`Init::auto`], or [`Init::path`] with arguments and environment).
    pub fn init(mut self, init: Init) -> Self {
        self.init = Some(init);
        self
    }

    /// No VMM log and no guest console log.
    pub fn quiet_logs(mut self) -> Self {
        self.quiet_logs = true;
        self
    }

    /// Overrides the image's entrypoint: what `msb run` runs when given no command.
    pub fn entrypoint(mut self, cmd: impl IntoIterator<Item = impl Into<String>>) -> Self {
        self.entrypoint = Some(cmd.into_iter().map(Into::into).collect());
        self
    }

    /// vCPUs (default 1).
    pub fn cpus(mut self, count: u8) -> Self {
        self.cpus = count;
        self
    }

    /// Guest memory (default 512 MiB); pages are allocated as the guest touches them.
    pub fn memory(mut self, size: impl Into<Mebibytes>) -> Self {
        self.memory = size.into();
        self
    }

    /// An environment variable for every command; per-command env is merged on top.
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.defaults.env.push((key.into(), value.into()));
        self
    }

    /// Default working directory of commands.
    pub fn workdir(mut self, path: impl Into<String>) -> Self {
        self.defaults.workdir = Some(path.into());
        self
    }

    /// Default user of commands: a name, `uid` or `uid:gid`.
    pub fn user(mut self, user: impl Into<String>) -> Self {
        self.defaults.user = Some(user.into());
        self
    }

    /// The shell [`Sandbox::shell`] and [`Sandbox::attach_shell`] use (default `/bin/sh`).
    pub fn shell(mut self, shell: impl Into<String>) -> Self {
        self.shell = shell.into();
        self
    }

    /// The guest hostname (default: the sandbox name when it is a valid hostname).
    pub fn hostname(mut self, hostname: impl Into<String>) -> Self {
        self.hostname = Some(hostname.into());
        self
    }

    /// The root filesystem: an image archive (`docker save` or OCI archive), an OCI image
    /// layout directory, or a plain directory (used read-only as the one image layer).
    /// Without it the sandbox boots the default image (busybox). Anything that is not an
    /// existing path is an image reference (`"python:3.12"`, with Docker's defaults): it
    /// comes from the local image store, pulled from its registry first as the
    /// [`pull_policy`](SandboxBuilder::pull_policy) says (see [`crate::Image`]).
    ///
    /// A path ending in `.raw`, `.img`, `.qcow2` or `.vmdk` is a disk image, mounted as
    /// the root as it is (its filesystem read off it; see
    /// [`image_with`](SandboxBuilder::image_with) to name it): writes go to the image, the
    /// sandbox holds a lock on it while it runs, and patches and scripts (which need the
    /// overlay root) are refused.
    pub fn image(mut self, image: impl config::IntoImage) -> Self {
        if matches!(self.image, RootfsSource::Snapshot(_)) {
            self.image_error = Some("snapshot() and image() are mutually exclusive".into());
        }
        self.image = image.into_image();
        self
    }

    /// Boots from the snapshot artifact `name_or_path` (a bare name in
    /// `$MSB_HOME/snapshots`, or a path): its image, its files, and a writable layer of
    /// this sandbox's own. Mutually exclusive with [`image`](SandboxBuilder::image). The
    /// artifact's digests are checked first.
    pub fn snapshot(mut self, name_or_path: impl AsRef<str>) -> Self {
        match crate::snapshot::locate(&crate::home::msb_home(), name_or_path.as_ref()) {
            Ok(dir) => {
                if !matches!(self.image, RootfsSource::Default) {
                    self.image_error = Some("snapshot() and image() are mutually exclusive".into());
                }
                self.image = RootfsSource::Snapshot(dir);
            }
            Err(e) => self.image_error = Some(e.to_string()),
        }
        self
    }

    /// Configures the root filesystem: a disk image with an explicit filesystem type, or
    /// a size for an image's writable layer (see [`config::ImageBuilder`]).
    pub fn image_with(
        mut self,
        f: impl FnOnce(config::ImageBuilder) -> config::ImageBuilder,
    ) -> Self {
        match f(config::ImageBuilder::default()).build(self.image.clone()) {
            Ok((image, upper)) => {
                self.image = image;
                if upper.is_some() {
                    self.upper_size_mib = upper;
                }
            }
            Err(e) => self.image_error = Some(e),
        }
        self
    }

    /// Patches the root filesystem before the first boot (into the writable layer; the
    /// image stays untouched). Patches apply in order.
    ///
    /// ```no_run
    /// # async fn demo() -> microsandbox::MicrosandboxResult<()> {
    /// let sb = microsandbox::Sandbox::builder("web")
    ///     .patch(|p| p.mkdir("/app", Some(0o755)).text("/app/config.toml", "port = 80\n", None, false))
    ///     .create()
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub fn patch(mut self, f: impl FnOnce(PatchBuilder) -> PatchBuilder) -> Self {
        self.patches = f(self.patches);
        self
    }

    /// A script at `/.msb/scripts/<name>` (mode 0755, on `PATH`); a later script with the
    /// same name replaces an earlier one.
    pub fn script(mut self, name: impl Into<String>, content: impl Into<String>) -> Self {
        let name = name.into();
        self.scripts.retain(|(n, _)| *n != name);
        self.scripts.push((name, content.into()));
        self
    }

    /// A volume at `guest_path`: a host directory (`bind`), a named volume (`named`) or a
    /// tmpfs (`tmpfs().size(MiB)`); a later volume at the same path replaces an earlier one.
    ///
    /// ```no_run
    /// # async fn demo() -> microsandbox::MicrosandboxResult<()> {
    /// let sb = microsandbox::Sandbox::builder("worker")
    ///     .volume("/src", |v| v.bind("./src").readonly())
    ///     .volume("/cache", |v| v.named("pip-cache"))
    ///     .volume("/scratch", |v| v.tmpfs().size(64))
    ///     .create()
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub fn volume(
        mut self,
        guest_path: impl Into<String>,
        f: impl FnOnce(MountBuilder) -> MountBuilder,
    ) -> Self {
        let guest = crate::volume::normalise(&guest_path.into());
        self.volumes.retain(|(g, _)| *g != guest);
        let m = f(MountBuilder::default());
        self.volumes.push((guest, m));
        self
    }

    /// The network (default: on, [`NetworkPolicy::public_only`], DNS forwarded to the
    /// host's nameservers).
    ///
    /// ```no_run
    /// # async fn demo() -> microsandbox::MicrosandboxResult<()> {
    /// use microsandbox::{NetworkPolicy, NetworkProfile};
    /// let sb = microsandbox::Sandbox::builder("web")
    ///     .network(|n| {
    ///         n.policy(NetworkPolicy::from_profiles([NetworkProfile::Public, NetworkProfile::Host]))
    ///             .port(8080, 80)
    ///     })
    ///     .create()
    ///     .await?;
    /// # Ok(()) }
    /// ```
    ///
    /// [`NetworkPolicy::public_only`]: crate::NetworkPolicy::public_only
    pub fn network(
        mut self,
        f: impl FnOnce(crate::network::NetworkBuilder) -> crate::network::NetworkBuilder,
    ) -> Self {
        self.network = f(self.network);
        self
    }

    /// No network device at all: the guest has only `lo`.
    pub fn disable_network(mut self) -> Self {
        self.network = self.network.enabled(false);
        self
    }

    /// Publishes the guest's TCP port `guest` on the host's 127.0.0.1:`host`.
    pub fn port(mut self, host: u16, guest: u16) -> Self {
        self.network = self.network.port(host, guest);
        self
    }

    /// Publishes the guest's UDP port `guest` on the host's 127.0.0.1:`host`.
    pub fn port_udp(mut self, host: u16, guest: u16) -> Self {
        self.network = self.network.port_udp(host, guest);
        self
    }

    /// A secret (see [`crate::SecretBuilder`]): the guest's environment holds its
    /// placeholder, never the value; the network proxy puts the value in its place in
    /// intercepted requests to the allowed hosts. Turns TLS interception on.
    pub fn secret(mut self, f: impl FnOnce(crate::SecretBuilder) -> crate::SecretBuilder) -> Self {
        self.network = self.network.secret(f);
        self
    }

    /// `.secret(|s| s.env(env_var).value(value).allow_host(allowed_host))`.
    pub fn secret_env(
        mut self,
        env_var: impl Into<String>,
        value: impl Into<String>,
        allowed_host: impl Into<String>,
    ) -> Self {
        self.network = self.network.secret_env(env_var, value, allowed_host);
        self
    }

    /// Boots the sandbox and returns once its agent answers. The sandbox is attached: it
    /// stops when the returned [`Sandbox`] is dropped or this process exits; its state
    /// (configuration, writable layer, logs) stays until [`Sandbox::remove`].
    pub async fn create(self) -> MicrosandboxResult<Sandbox> {
        self.create_mode(false, Events::default()).await
    }

    /// [`SandboxBuilder::create`] in the background, with the image pull's progress: read
    /// the events, then take the sandbox from [`PullSession::result`]. An image already in
    /// the store yields only `Resolving`, `Resolved` and `Complete`.
    pub fn create_with_progress(self) -> PullSession<Sandbox> {
        PullSession::spawn(move |events| self.create_mode(false, events))
    }

    /// [`SandboxBuilder::create_detached`] with the image pull's progress.
    pub fn create_detached_with_progress(self) -> PullSession<Sandbox> {
        PullSession::spawn(move |events| self.create_mode(true, events))
    }

    /// Boots the sandbox detached: it runs on after this process exits, until it is
    /// stopped ([`Sandbox::get`] finds it again) or one of its limits ends it.
    pub async fn create_detached(self) -> MicrosandboxResult<Sandbox> {
        self.create_mode(true, Events::default()).await
    }

    /// The create: the steps below, in order; `detached` cuts the lifeline at the end.
    async fn create_mode(self, detached: bool, events: Events) -> MicrosandboxResult<Sandbox> {
        let plan = self.plan()?;
        // Sandboxes hold other users' data (and setuid files of images): private to us.
        private_dir(&msb_home().join("sandboxes"))?;
        let mut db = open_db()?;
        clear_name(&mut db, &plan).await?;
        // From here on a failure removes everything this call made (the claim's drop).
        let claim = claim_name(&mut db, &plan, detached)?;
        let claim_id = claim.id.clone();
        let image = fetch_image(&plan, &events).await?;
        let (claim, prepared) = prepare_root(&plan, image, claim).await?;
        // Booted on a lifeline whatever the mode: a creator killed before the sandbox is
        // recorded takes its VMM with it. Detached sandboxes cut the lifeline after.
        let sandbox = Sandbox::boot(plan.paths, prepared, claim_id).await?;
        sandbox
            .mark_running(&mut db, &[RowStatus::Creating], detached)
            .await?;
        claim.disarm();
        if detached {
            sandbox.cut_lifeline().await?;
        }
        Ok(sandbox)
    }

    /// Checks every option, and that a kernel and `msb-vmm` are there, and turns the
    /// builder into the sandbox's configuration: nothing is created yet.
    fn plan(mut self) -> MicrosandboxResult<Plan> {
        self.check()?;
        if let Some(e) = self.image_error.take() {
            return Err(MicrosandboxError::InvalidConfig(e));
        }
        // A disk root is checked (and its path made absolute) now.
        if let RootfsSource::Disk(d) = &self.image {
            self.image = RootfsSource::Disk(
                config::DiskImage::check(&d.path, d.fstype.clone())
                    .map_err(MicrosandboxError::ImageNotFound)?,
            );
        }
        let volumes = build_volumes(self.volumes)?;
        check_scripts(&self.scripts)?;
        check_kernel()?;
        find_vmm()?;
        let paths = Paths::for_name(&self.name)?;
        let (mut network, secrets) = self.network.build_with_secrets()?;
        let mut env = self.defaults.env;
        for s in &secrets {
            if env.iter().any(|(k, _)| *k == s.env_var) {
                return Err(MicrosandboxError::InvalidConfig(format!(
                    "{} is both an environment variable and a secret",
                    s.env_var
                )));
            }
            env.push((s.env_var.clone(), s.placeholder.clone()));
        }
        if network.enabled && network.tls.enabled {
            crate::secrets::interception_ca(&mut network.tls)?;
        }
        let config = SandboxConfig {
            name: self.name.clone(),
            cpus: self.cpus,
            memory_mib: self.memory.0,
            image: self.image,
            env,
            workdir: self.defaults.workdir,
            user: self.defaults.user,
            shell: Some(self.shell),
            hostname: self.hostname,
            patches: self.patches.patches,
            scripts: self.scripts,
            volumes,
            labels: self.labels,
            entrypoint: self.entrypoint,
            idle_timeout_secs: self.idle_timeout,
            max_duration_secs: self.max_duration,
            log_level: self.log_level,
            quiet_logs: self.quiet_logs,
            ephemeral: self.ephemeral,
            security_profile: self.security_profile,
            init: self.init,
            pull_policy: self.pull.pull_policy(),
            network,
            secrets: secrets.iter().map(|s| s.env_var.clone()).collect(),
            upper_size_mib: self.upper_size_mib,
        };
        let config_json = serde_json::to_string(&config).map_err(|e| {
            MicrosandboxError::InvalidConfig(format!("cannot encode the config: {e}"))
        })?;
        Ok(Plan {
            config,
            secrets,
            config_json,
            paths,
            pull: self.pull,
            replace: self.replace,
        })
    }

    /// Refuses options out of range: the name, the image reference, sizes, limits, the
    /// entrypoint, labels and the init (volumes: [`build_volumes`], scripts:
    /// [`check_scripts`]).
    fn check(&self) -> MicrosandboxResult<()> {
        validate_name(&self.name)?;
        if let RootfsSource::Oci(reference) = &self.image {
            crate::image::parse_reference(reference)?;
        }
        if self.cpus == 0 {
            return Err(MicrosandboxError::InvalidConfig(
                "cpus must be at least 1".into(),
            ));
        }
        if self.memory.0 == 0 {
            return Err(MicrosandboxError::InvalidConfig(
                "memory must be more than 0 MiB".into(),
            ));
        }
        if self.shell.is_empty() {
            return Err(MicrosandboxError::InvalidConfig(
                "the shell is empty".into(),
            ));
        }
        if self.idle_timeout == Some(0) || self.max_duration == Some(0) {
            return Err(MicrosandboxError::InvalidConfig(
                "idle_timeout and max_duration must be at least 1 second".into(),
            ));
        }
        if self.entrypoint.as_ref().is_some_and(Vec::is_empty) {
            return Err(MicrosandboxError::InvalidConfig(
                "the entrypoint is empty".into(),
            ));
        }
        check_labels(&self.labels)?;
        if let Some(init) = &self.init {
            init.check()?;
        }
        Ok(())
    }
}

/// Refuses script names that are not one plain file name.
fn check_scripts(scripts: &[(String, String)]) -> MicrosandboxResult<()> {
    for (name, _) in scripts {
        if name.is_empty()
            || name.contains('/')
            || name.contains('\0')
            || name == "."
            || name == ".."
        {
            return Err(MicrosandboxError::InvalidConfig(format!(
                "invalid script name {name:?}"
            )));
        }
    }
    Ok(())
}

/// What a create works from once the builder's options are checked.
struct Plan {
    config: SandboxConfig,
    /// The secrets' values: in `secrets.json` (owner only), never in the config.
    secrets: Vec<msb_protocol::network::SecretSpec>,
    /// The configuration as the state row keeps it.
    config_json: String,
    paths: Paths,
    pull: crate::PullOptions,
    /// The grace period to stop an existing sandbox of the name in, when it is replaced.
    replace: Option<Duration>,
}

/// The volumes' mounts, checked: at most [`MAX_SHARED_VOLUMES`] bind and named ones, none
/// nested in another.
fn build_volumes(volumes: Vec<(String, MountBuilder)>) -> MicrosandboxResult<Vec<VolumeMount>> {
    let mut built = Vec::with_capacity(volumes.len());
    for (guest, m) in volumes {
        built.push(m.build(guest)?);
    }
    let shared = built
        .iter()
        .filter(|v| !matches!(v, VolumeMount::Tmpfs { .. }))
        .count();
    if shared > MAX_SHARED_VOLUMES {
        return Err(MicrosandboxError::InvalidConfig(format!(
            "{shared} bind and named volumes; at most {MAX_SHARED_VOLUMES} fit (one device each)"
        )));
    }
    crate::volume::check_nesting(&built)?;
    crate::volume::check_host_overlap(&built, &msb_home())?;
    Ok(built)
}

/// Makes way for the new sandbox: an existing sandbox of the name is
/// [`MicrosandboxError::AlreadyExists`], unless the plan replaces it: then it is stopped
/// and removed (one being created right now is never replaced). (`&mut`: a shared
/// reference to a connection is not `Send`.)
async fn clear_name(db: &mut StateDb, plan: &Plan) -> MicrosandboxResult<()> {
    let (name, paths) = (&plan.config.name, &plan.paths);
    let Some(row) = db.get(name)? else {
        return Ok(());
    };
    let Some(row) = reconcile(db, row)? else {
        return Ok(());
    };
    let Some(timeout) = plan.replace else {
        return Err(MicrosandboxError::AlreadyExists(name.clone()));
    };
    if row.status == RowStatus::Creating {
        // Someone is creating it right now: not ours to replace.
        return Err(MicrosandboxError::AlreadyExists(name.clone()));
    }
    if vmm_alive(paths) {
        stop_vmm(paths, row.vmm, timeout).await?;
    }
    let (Some(_starting), Some(_held)) = (start_lock(paths)?, lock_exclusive(paths)?) else {
        return Err(MicrosandboxError::StillRunning(name.clone()));
    };
    remove_all(db, &row, paths)
}

/// Claims the name (inserts its `creating` row: whoever inserts it owns the new sandbox)
/// and makes the sandbox's directory afresh; the returned [`Claim`] removes both again
/// unless disarmed.
fn claim_name(db: &mut StateDb, plan: &Plan, detached: bool) -> MicrosandboxResult<Claim> {
    let (config, paths) = (&plan.config, &plan.paths);
    let claim_id = db.claim(&NewRow {
        name: &config.name,
        config_json: &plan.config_json,
        labels: &config.labels,
        detached,
        ephemeral: config.ephemeral,
    })?;
    let mut claim = Claim {
        name: config.name.clone(),
        id: claim_id,
        dir: None,
        armed: true,
    };
    // A directory without a row is what a process killed while removing left; one
    // whose lock is held is not ours to touch.
    if paths.dir.exists() {
        let Some(_held) = lock_exclusive(paths)? else {
            return Err(MicrosandboxError::StillRunning(config.name.clone()));
        };
        match std::fs::remove_dir_all(&paths.dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e.into()),
        }
    }
    std::fs::create_dir(&paths.dir)?;
    claim.dir = Some(paths.dir.clone());
    Ok(claim)
}

/// Gets the image: a registry image is made ready in the image store (pulled as the plan's
/// pull policy says, with progress to `events`); for the other sources only the store's
/// shared lock is taken. Either way the lock is returned: prune waits until config.json
/// records the layers this sandbox uses.
async fn fetch_image(
    plan: &Plan,
    events: &Events,
) -> MicrosandboxResult<(StoreLock, Option<ResolvedImage>)> {
    let home = msb_home();
    Ok(match &plan.config.image {
        RootfsSource::Oci(reference) => {
            let (_, image, lock) =
                crate::image::ensure(&home, reference, &plan.pull, events).await?;
            (lock, Some(image))
        }
        _ => (crate::image::lock_store_shared(&home).await?, None),
    })
}

/// Prepares the root filesystem (resolves the image's layers; writes the patches and
/// scripts into the writable layer) and persists it all in config.json, off the async
/// runtime and under the store lock. The claim travels with the blocking work and comes
/// back after it: if the create is dropped mid-way, the directory goes only once nothing
/// writes into it any more.
async fn prepare_root(
    plan: &Plan,
    (store_lock, pulled): (StoreLock, Option<ResolvedImage>),
    claim: Claim,
) -> MicrosandboxResult<(Claim, Persisted)> {
    let home = msb_home();
    let config = plan.config.clone();
    let rw = plan.paths.rw();
    let config_path = plan.paths.config();
    let secrets_path = plan.paths.secrets();
    let secrets = plan.secrets.clone();
    let (claim, prepared) = tokio::task::spawn_blocking(move || {
        let _held = store_lock;
        let prepared = crate::secrets::save(&secrets_path, &secrets)
            .and_then(|()| config::prepare(&home, &config, &rw, pulled))
            .and_then(|p| config::save(&config_path, &p).map(|()| p));
        (claim, prepared)
    })
    .await
    .map_err(|e| MicrosandboxError::Io(std::io::Error::other(e)))?;
    Ok((claim, prepared?))
}

/// Removes a half-created sandbox (the directory this create made, then its own
/// `creating` row) unless disarmed. Its VMM, if it got one, ends with its lifeline.
struct Claim {
    name: String,
    id: String,
    dir: Option<PathBuf>,
    armed: bool,
}

impl Claim {
    fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        if let Some(dir) = self.dir.take() {
            let _ = std::fs::remove_dir_all(dir);
        }
        if let Ok(db) = open_db() {
            let _ = db.delete_creating(&self.name, &self.id);
        }
    }
}
