//! One task per Pod bound to the Node: it prepares the process (address, network namespace and
//! host ports when pods have their own, volumes, environment), starts it, runs the Pod's probes, restarts it after a crash with backoff (per the restart
//! policy), reports the Pod's status as it changes, and when the Pod is deleted stops it as a
//! kubelet does — preStop sleep, SIGTERM, the rest of the grace period, SIGKILL — then removes
//! the Pod object (a delete with grace period 0, which only the kubelet may do).

use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Container, Pod, PodSpec, Secret};
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, Patch, PatchParams, Preconditions};
use kube::{Api, ResourceExt};
use tokio::process::{Child, Command};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::env::{PodFacts, Rewrites, Sources, arguments, resolve_env};
use crate::forward::Forwarders;
use crate::netns::{self, Bridge, PodNetwork};
use crate::node::HOST_IP;
use crate::probe::ProbeRunner;
use crate::status::{Observed, State};
use crate::{Error, Shared, SpecError, volumes};

/// Why a pod's process must stop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stop {
    /// The Pod was deleted with this grace period: stop the process, then remove the Pod.
    Delete { grace: Duration },
    /// The Pod object is gone already (force-deleted): stop the process quickly.
    Gone,
    /// The kubelet stops: stop the process within the shutdown grace, leave the Pod.
    Shutdown,
}

/// Grace for a Pod being deleted: the deletion's own, else the spec's, else 30 s.
pub fn deletion_grace(pod: &Pod) -> Duration {
    let seconds = pod
        .metadata
        .deletion_grace_period_seconds
        .or_else(|| pod.spec.as_ref()?.termination_grace_period_seconds)
        .unwrap_or(30);
    Duration::from_secs(u64::try_from(seconds).unwrap_or(0))
}

/// Grace for a process whose Pod is already gone.
const GONE_GRACE: Duration = Duration::from_secs(2);
/// How long a container must have run for its restart backoff to start over.
const BACKOFF_RESET_AFTER: Duration = Duration::from_secs(60);
/// How often due probes are looked for.
const PROBE_TICK: Duration = Duration::from_millis(250);
/// Pause between attempts to prepare a pod whose Secret or ConfigMap is missing.
const PREPARE_RETRY: Duration = Duration::from_secs(2);

/// Gives the pod's address back when the task ends, however it ends.
struct AddressLease {
    shared: Arc<Shared>,
    ip: std::net::Ipv4Addr,
}

impl Drop for AddressLease {
    fn drop(&mut self) {
        if let Ok(mut addresses) = self.shared.addresses.lock() {
            addresses.release(self.ip);
        }
    }
}

/// A pod's own network: its host-port forwarders, then (dropped after them, so their sockets
/// are closed first) its namespace and veth pair.
struct Netns {
    _forwarders: Forwarders,
    network: PodNetwork,
}

async fn create_netns(
    bridge: &Bridge,
    ip: std::net::Ipv4Addr,
    host_ports: &[u16],
    key: &str,
) -> Result<Netns, String> {
    let network = PodNetwork::create(bridge, ip)
        .await
        .map_err(|e| e.to_string())?;
    let forwarders = Forwarders::start(&network.path(), host_ports, key)
        .await
        .map_err(|e| format!("host ports {host_ports:?} in {}: {e}", network.name()))?;
    tracing::info!(pod = %key, %ip, netns = network.name(), ?host_ports, "pod network created");
    Ok(Netns {
        _forwarders: forwarders,
        network,
    })
}

/// What one start of the process needs.
struct Launch {
    /// The network namespace to start it in (else the kubelet's).
    netns: Option<PathBuf>,
    program: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    hostname: String,
    dir: PathBuf,
    log: PathBuf,
}

impl Launch {
    fn spawn(&self) -> std::io::Result<Child> {
        // Opened here (with close-on-exec) and kept open until the child has exec'd.
        let netns = self.netns.as_ref().map(std::fs::File::open).transpose()?;
        let netns_fd = netns.as_ref().map(std::os::fd::AsRawFd::as_raw_fd);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let mut command = Command::new(&self.program);
        command
            .args(&self.args)
            // The process sees the Pod's environment, not the kubelet's (PATH aside, so a
            // program may find its helpers).
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOSTNAME", &self.hostname)
            .env("HOME", &self.dir)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            // Its own process group: a Ctrl-C at the kubelet's terminal is not delivered to
            // the pods; the kubelet stops them itself.
            .process_group(0)
            .kill_on_drop(true);
        // SAFETY: the closure runs in the forked child before exec and only calls prctl(2) and
        // setns(2), which are async-signal-safe; it allocates nothing and touches no shared
        // state.
        unsafe {
            command.pre_exec(move || {
                // The process dies with the kubelet, even when the kubelet is killed.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                if let Some(fd) = netns_fd {
                    netns::enter(fd)?;
                }
                Ok(())
            });
        }
        let child = command.spawn();
        drop(netns);
        child
    }
}

/// Writes the Pod's status when it differs from the last one written.
struct Reporter {
    api: Api<Pod>,
    name: String,
    key: String,
    last: Option<serde_json::Value>,
}

impl Reporter {
    async fn report(&mut self, observed: &Observed) {
        let status = match serde_json::to_value(observed.to_status()) {
            Ok(status) => status,
            Err(error) => {
                tracing::error!(pod = %self.key, %error, "pod status does not serialize");
                return;
            }
        };
        if self.last.as_ref() == Some(&status) {
            return;
        }
        let patch = serde_json::json!({ "status": status });
        match self
            .api
            .patch_status(&self.name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {
                tracing::debug!(pod = %self.key, phase = observed.phase(), ready = observed.ready, "status reported");
                self.last = Some(status);
            }
            Err(error) => {
                tracing::warn!(pod = %self.key, %error, "reporting the pod status failed")
            }
        }
    }
}

fn current(stop: &watch::Receiver<Option<Stop>>) -> Option<Stop> {
    stop.borrow().clone()
}

/// Waits `duration` unless a stop arrives first (returned).
async fn pause(stop: &mut watch::Receiver<Option<Stop>>, duration: Duration) -> Option<Stop> {
    tokio::select! {
        () = tokio::time::sleep(duration) => current(stop),
        reason = next_stop(stop) => Some(reason),
    }
}

/// Waits until the Pod must stop; a vanished sender means the kubelet is going away.
async fn next_stop(stop: &mut watch::Receiver<Option<Stop>>) -> Stop {
    match stop.wait_for(Option::is_some).await {
        Ok(reason) => reason.clone().unwrap_or(Stop::Shutdown),
        Err(_) => Stop::Shutdown,
    }
}

/// A Pod that cannot be started: reports `CreateContainerError` with `message`, then waits to be
/// told to stop and finishes it.
async fn never_started(
    reporter: &mut Reporter,
    pod: &Pod,
    stop: &mut watch::Receiver<Option<Stop>>,
    mut observed: Observed,
    message: String,
) {
    observed.state = State::Waiting {
        reason: "CreateContainerError".into(),
        message,
    };
    reporter.report(&observed).await;
    let reason = next_stop(stop).await;
    finish(reporter, pod, reason).await;
}

/// Runs one Pod until it must stop; see the module documentation.
pub(crate) async fn supervise(
    shared: Arc<Shared>,
    pod: Pod,
    mut stop: watch::Receiver<Option<Stop>>,
) {
    let name = pod.name_any();
    let namespace = pod.namespace().unwrap_or_default();
    let key = format!("{namespace}/{name}");
    let mut reporter = Reporter {
        api: Api::namespaced(shared.client.clone(), &namespace),
        name: name.clone(),
        key: key.clone(),
        last: None,
    };
    let spec = pod.spec.clone().unwrap_or_default();
    let container = spec.containers.first().cloned().unwrap_or_default();
    let image = container.image.clone().unwrap_or_default();
    let mut observed = Observed::new(&container.name, &image, HOST_IP);

    let unsupported = if spec.containers.len() != 1 {
        Some("pods with exactly one container are supported")
    } else if spec.init_containers.as_ref().is_some_and(|c| !c.is_empty()) {
        Some("init containers are not supported")
    } else {
        None
    };
    let allocated = shared.addresses.lock().ok().and_then(|mut a| a.allocate());
    let (Some(ip), None) = (allocated, unsupported) else {
        if let Some(ip) = allocated {
            shared.addresses.lock().map(|mut a| a.release(ip)).ok();
        }
        let message = unsupported.map_or_else(|| Error::NoAddress.to_string(), str::to_owned);
        tracing::error!(pod = %key, %message, "cannot run pod");
        never_started(&mut reporter, &pod, &mut stop, observed, message).await;
        return;
    };
    let _address = AddressLease {
        shared: shared.clone(),
        ip,
    };
    observed.pod_ip = Some(ip);
    // Declared after the address lease, so it is dropped (namespace deleted) before the
    // address is handed out again.
    let own_network = match &shared.bridge {
        None => None,
        Some(bridge) => match create_netns(bridge, ip, &shared.settings.host_ports, &key).await {
            Ok(network) => Some(network),
            Err(message) => {
                tracing::error!(pod = %key, %message, "cannot create the pod's network");
                never_started(&mut reporter, &pod, &mut stop, observed, message).await;
                return;
            }
        },
    };
    let netns_path = own_network.as_ref().map(|n| n.network.path());

    let launch = loop {
        if let Some(reason) = current(&stop) {
            finish(&reporter, &pod, reason).await;
            return;
        }
        match prepare(&shared, &pod, &spec, &container, ip, netns_path.clone()).await {
            Ok(launch) => break launch,
            Err(error) => {
                tracing::warn!(pod = %key, %error, "cannot start pod yet");
                observed.state = State::Waiting {
                    reason: "CreateContainerConfigError".into(),
                    message: error.to_string(),
                };
                reporter.report(&observed).await;
                if let Some(reason) = pause(&mut stop, PREPARE_RETRY).await {
                    finish(&reporter, &pod, reason).await;
                    return;
                }
            }
        }
    };

    let pre_stop = pre_stop_sleep(&container);
    let restart_policy = spec
        .restart_policy
        .clone()
        .unwrap_or_else(|| "Always".into());
    let mut backoff = shared.settings.restart_backoff_base;
    loop {
        let started_at = Instant::now();
        let started = Timestamp::now();
        let exit = match launch.spawn() {
            Ok(mut child) => {
                tracing::info!(pod = %key, %ip, pid = child.id(), program = %launch.program.display(), "process started");
                observed.state = State::Running { since: started };
                match run(
                    &mut child,
                    &container,
                    ip,
                    &mut observed,
                    &mut reporter,
                    &mut stop,
                    pre_stop,
                    shared.settings.shutdown_grace,
                )
                .await
                {
                    Ran::Exited(status) => status,
                    Ran::Stopped(reason) => {
                        finish(&reporter, &pod, reason).await;
                        return;
                    }
                }
            }
            Err(error) => {
                tracing::error!(pod = %key, %error, program = %launch.program.display(), "process did not start");
                None
            }
        };
        let (exit_code, signal) = match exit {
            Some(status) => (
                status
                    .code()
                    .unwrap_or_else(|| 128 + status.signal().unwrap_or(0)),
                status.signal(),
            ),
            None => (128, None),
        };
        tracing::warn!(pod = %key, exit_code, ?signal, "process exited");
        let terminated = State::Terminated {
            exit_code,
            signal,
            reason: if exit_code == 0 { "Completed" } else { "Error" }.into(),
            started,
            finished: Timestamp::now(),
        };
        observed.set_ready(false);
        let restart = match restart_policy.as_str() {
            "Never" => false,
            "OnFailure" => exit_code != 0,
            _ => true,
        };
        if !restart {
            observed.state = terminated;
            observed.finished = true;
            reporter.report(&observed).await;
            let reason = next_stop(&mut stop).await;
            finish(&reporter, &pod, reason).await;
            return;
        }
        observed.last_state = Some(terminated);
        observed.restarts += 1;
        if started_at.elapsed() >= BACKOFF_RESET_AFTER {
            backoff = shared.settings.restart_backoff_base;
        }
        observed.state = State::Waiting {
            reason: "CrashLoopBackOff".into(),
            message: format!("back-off {backoff:?} restarting failed container"),
        };
        reporter.report(&observed).await;
        if let Some(reason) = pause(&mut stop, backoff).await {
            finish(&reporter, &pod, reason).await;
            return;
        }
        backoff = (backoff * 2).min(shared.settings.restart_backoff_max);
    }
}

enum Ran {
    /// The process ended by itself (or was restarted by its liveness probe).
    Exited(Option<ExitStatus>),
    /// The Pod must stop; the process has been stopped.
    Stopped(Stop),
}

/// Watches a running process: probes, exit, stop requests.
#[allow(clippy::too_many_arguments)]
async fn run(
    child: &mut Child,
    container: &Container,
    ip: std::net::Ipv4Addr,
    observed: &mut Observed,
    reporter: &mut Reporter,
    stop: &mut watch::Receiver<Option<Stop>>,
    pre_stop: Duration,
    shutdown_grace: Duration,
) -> Ran {
    let started = Instant::now();
    // Validated in `prepare`, so these do not fail here.
    let probe = |probe: Option<&k8s_openapi::api::core::v1::Probe>, healthy| {
        probe.and_then(|p| ProbeRunner::new(p, container, started, healthy).ok())
    };
    let mut readiness = probe(container.readiness_probe.as_ref(), false);
    let mut liveness = probe(container.liveness_probe.as_ref(), true);
    observed.set_ready(readiness.is_none());
    reporter.report(observed).await;
    let mut ticks = tokio::time::interval(PROBE_TICK);
    loop {
        tokio::select! {
            status = child.wait() => return Ran::Exited(status.ok()),
            reason = next_stop(stop) => {
                let (grace, pre_stop) = match &reason {
                    Stop::Delete { grace } => (*grace, pre_stop),
                    Stop::Gone => (GONE_GRACE, Duration::ZERO),
                    Stop::Shutdown => (shutdown_grace, Duration::ZERO),
                };
                let status = terminate(child, pre_stop, grace, &reporter.key).await;
                tracing::info!(pod = %reporter.key, ?reason, ?status, "process stopped");
                return Ran::Stopped(reason);
            }
            _ = ticks.tick() => {
                let now = Instant::now();
                if let Some(probe) = readiness.as_mut().filter(|p| p.due(now)) {
                    let ready = probe.run(ip.into()).await;
                    observed.set_ready(ready);
                    reporter.report(observed).await;
                }
                if let Some(probe) = liveness.as_mut().filter(|p| p.due(now))
                    && !probe.run(ip.into()).await
                {
                    tracing::warn!(pod = %reporter.key, "liveness probe failed; restarting the process");
                    let grace = Duration::from_secs(30);
                    return Ran::Exited(terminate(child, pre_stop, grace, &reporter.key).await);
                }
            }
        }
    }
}

/// Stops a process the way a kubelet stops a container: the preStop sleep (within the grace
/// period), SIGTERM, then SIGKILL when the grace period is over.
async fn terminate(
    child: &mut Child,
    pre_stop: Duration,
    grace: Duration,
    key: &str,
) -> Option<ExitStatus> {
    let deadline = Instant::now() + grace;
    if !pre_stop.is_zero() {
        tokio::select! {
            status = child.wait() => return status.ok(),
            () = tokio::time::sleep(pre_stop.min(grace)) => {}
        }
    }
    if let Some(pid) = child.id().and_then(|pid| libc::pid_t::try_from(pid).ok()) {
        tracing::info!(pod = key, pid, ?grace, "sending SIGTERM");
        // SAFETY: kill(2) on the pid of a child this task owns and has not reaped yet (id()
        // returns None once it has been), so the pid cannot have been reused.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
    }
    match tokio::time::timeout_at(deadline, child.wait()).await {
        Ok(status) => status.ok(),
        Err(_) => {
            tracing::warn!(pod = key, ?grace, "grace period over; sending SIGKILL");
            child.start_kill().ok();
            child.wait().await.ok()
        }
    }
}

/// The container's preStop hook when it is a sleep (the only kind a process can honour).
fn pre_stop_sleep(container: &Container) -> Duration {
    container
        .lifecycle
        .as_ref()
        .and_then(|l| l.pre_stop.as_ref())
        .and_then(|h| h.sleep.as_ref())
        .and_then(|s| u64::try_from(s.seconds).ok())
        .map_or(Duration::ZERO, Duration::from_secs)
}

/// After the process stopped: a deleted Pod is removed for good (grace 0, this very Pod only).
async fn finish(reporter: &Reporter, pod: &Pod, reason: Stop) {
    if !matches!(reason, Stop::Delete { .. }) {
        return;
    }
    let params = DeleteParams {
        grace_period_seconds: Some(0),
        preconditions: Some(Preconditions {
            uid: pod.uid(),
            resource_version: None,
        }),
        ..DeleteParams::default()
    };
    match reporter.api.delete(&reporter.name, &params).await {
        Ok(_) => tracing::info!(pod = %reporter.key, "pod removed"),
        Err(kube::Error::Api(status)) if status.code == 404 || status.code == 409 => {}
        Err(error) => tracing::warn!(pod = %reporter.key, %error, "removing the pod failed"),
    }
}

/// Everything one start of the process needs, or why it cannot start yet.
async fn prepare(
    shared: &Shared,
    pod: &Pod,
    spec: &PodSpec,
    container: &Container,
    ip: std::net::Ipv4Addr,
    netns: Option<PathBuf>,
) -> Result<Launch, Error> {
    let image = container.image.clone().unwrap_or_default();
    let program = shared
        .settings
        .images
        .program(&image)
        .ok_or(SpecError::UnmappedImage(image.clone()))?
        .to_owned();
    let namespace = pod.namespace().unwrap_or_default();
    let name = pod.name_any();
    let sources = fetch_sources(shared, &namespace, spec).await?;
    let facts = PodFacts {
        name: name.clone(),
        namespace: namespace.clone(),
        uid: pod.uid().unwrap_or_default(),
        node_name: shared.settings.node_name.clone(),
        service_account: spec.service_account_name.clone().unwrap_or_default(),
        pod_ip: ip.to_string(),
        host_ip: HOST_IP.to_string(),
        labels: pod.labels().clone(),
        annotations: pod.annotations().clone(),
    };
    let dir = shared.settings.root_dir.join(&namespace).join(&name);
    std::fs::create_dir_all(&dir).map_err(|source| Error::Io {
        path: dir.clone(),
        source,
    })?;
    let mounts = volumes::write(spec, container, &sources, &dir)?;
    // In a namespace of its own the pod listens on its wildcard addresses as in a container.
    let listen_ip = netns.is_none().then_some(ip);
    let rewrites = Rewrites::new(listen_ip, mounts);
    let env: Vec<(String, String)> = resolve_env(container, &facts, &sources)?
        .into_iter()
        .map(|(key, value)| {
            let value = rewrites.apply(&value);
            (key, value)
        })
        .collect();
    let args = arguments(container, &env)
        .iter()
        .map(|arg| rewrites.apply(arg))
        .collect();
    // An unsupported probe is a configuration error, not a crash loop.
    for probe in [&container.readiness_probe, &container.liveness_probe]
        .into_iter()
        .flatten()
    {
        ProbeRunner::new(probe, container, Instant::now(), true)?;
    }
    Ok(Launch {
        netns,
        program,
        args,
        env,
        hostname: name,
        log: dir.join(format!("{}.log", container.name)),
        dir,
    })
}

/// Reads the Secrets and ConfigMaps the Pod refers to; absent ones are simply left out.
async fn fetch_sources(shared: &Shared, namespace: &str, spec: &PodSpec) -> Result<Sources, Error> {
    let refs = volumes::references(spec);
    let mut sources = Sources::default();
    let secrets: Api<Secret> = Api::namespaced(shared.client.clone(), namespace);
    for name in refs.secrets {
        if let Some(secret) = secrets.get_opt(&name).await? {
            let data = secret
                .data
                .unwrap_or_default()
                .into_iter()
                .map(|(key, bytes)| (key, bytes.0))
                .collect();
            sources.secrets.insert(name, data);
        }
    }
    let config_maps: Api<ConfigMap> = Api::namespaced(shared.client.clone(), namespace);
    for name in refs.config_maps {
        if let Some(config_map) = config_maps.get_opt(&name).await? {
            let mut data = config_map.data.unwrap_or_default();
            for (key, bytes) in config_map.binary_data.unwrap_or_default() {
                data.insert(key, String::from_utf8_lossy(&bytes.0).into_owned());
            }
            sources.config_maps.insert(name, data);
        }
    }
    Ok(sources)
}
