//! The Pod status the kubelet reports, built from what it observed of the process (pure).

use std::net::Ipv4Addr;

use k8s_openapi::api::core::v1::{
    ContainerState, ContainerStateRunning, ContainerStateTerminated, ContainerStateWaiting,
    ContainerStatus, HostIP, PodCondition, PodIP, PodStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;

/// The container's state as the kubelet last saw it.
#[derive(Debug, Clone, PartialEq)]
pub enum State {
    Waiting {
        reason: String,
        message: String,
    },
    Running {
        since: Timestamp,
    },
    Terminated {
        exit_code: i32,
        signal: Option<i32>,
        reason: String,
        started: Timestamp,
        finished: Timestamp,
    },
}

/// Everything the status is made of.
#[derive(Debug, Clone)]
pub struct Observed {
    pub container: String,
    pub image: String,
    pub pod_ip: Option<Ipv4Addr>,
    pub host_ip: Ipv4Addr,
    pub start_time: Timestamp,
    pub state: State,
    pub last_state: Option<State>,
    pub restarts: i32,
    pub ready: bool,
    /// When `ready` last changed (the Ready condition's transition time).
    pub ready_changed: Timestamp,
    /// Set once the pod will never run again (restart policy Never or OnFailure and done).
    pub finished: bool,
}

impl Observed {
    pub fn new(container: &str, image: &str, host_ip: Ipv4Addr) -> Self {
        let now = Timestamp::now();
        Self {
            container: container.to_owned(),
            image: image.to_owned(),
            pod_ip: None,
            host_ip,
            start_time: now,
            state: State::Waiting {
                reason: "ContainerCreating".into(),
                message: String::new(),
            },
            last_state: None,
            restarts: 0,
            ready: false,
            ready_changed: now,
            finished: false,
        }
    }

    pub fn set_ready(&mut self, ready: bool) {
        if self.ready != ready {
            self.ready = ready;
            self.ready_changed = Timestamp::now();
        }
    }

    /// `Pending` until the process first runs, `Running` while it runs or restarts, then
    /// `Succeeded` / `Failed` once it is over for good.
    pub fn phase(&self) -> &'static str {
        match (&self.state, self.finished) {
            (State::Terminated { exit_code: 0, .. }, true) => "Succeeded",
            (State::Terminated { .. }, true) => "Failed",
            (State::Running { .. }, _) => "Running",
            _ if self.restarts > 0 || self.last_state.is_some() => "Running",
            _ => "Pending",
        }
    }

    pub fn to_status(&self) -> PodStatus {
        let condition = |type_: &str, status: bool, since: Timestamp| PodCondition {
            type_: type_.to_owned(),
            status: if status { "True" } else { "False" }.to_owned(),
            last_transition_time: Some(Time(since)),
            ..PodCondition::default()
        };
        let ip = self.pod_ip.map(|ip| ip.to_string());
        PodStatus {
            phase: Some(self.phase().to_owned()),
            host_ip: Some(self.host_ip.to_string()),
            host_ips: Some(vec![HostIP {
                ip: self.host_ip.to_string(),
            }]),
            pod_ip: ip.clone(),
            pod_ips: ip.map(|ip| vec![PodIP { ip }]),
            start_time: Some(Time(self.start_time)),
            conditions: Some(vec![
                condition("PodScheduled", true, self.start_time),
                condition("PodReadyToStartContainers", true, self.start_time),
                condition("Initialized", true, self.start_time),
                condition("ContainersReady", self.ready, self.ready_changed),
                condition("Ready", self.ready, self.ready_changed),
            ]),
            container_statuses: Some(vec![ContainerStatus {
                name: self.container.clone(),
                image: self.image.clone(),
                image_id: String::new(),
                container_id: None,
                ready: self.ready,
                started: Some(matches!(self.state, State::Running { .. })),
                restart_count: self.restarts,
                state: Some(container_state(&self.state)),
                last_state: self.last_state.as_ref().map(container_state),
                ..ContainerStatus::default()
            }]),
            ..PodStatus::default()
        }
    }
}

fn container_state(state: &State) -> ContainerState {
    match state {
        State::Waiting { reason, message } => ContainerState {
            waiting: Some(ContainerStateWaiting {
                reason: Some(reason.clone()),
                message: (!message.is_empty()).then(|| message.clone()),
            }),
            ..ContainerState::default()
        },
        State::Running { since } => ContainerState {
            running: Some(ContainerStateRunning {
                started_at: Some(Time(*since)),
            }),
            ..ContainerState::default()
        },
        State::Terminated {
            exit_code,
            signal,
            reason,
            started,
            finished,
        } => ContainerState {
            terminated: Some(ContainerStateTerminated {
                exit_code: *exit_code,
                signal: *signal,
                reason: Some(reason.clone()),
                started_at: Some(Time(*started)),
                finished_at: Some(Time(*finished)),
                ..ContainerStateTerminated::default()
            }),
            ..ContainerState::default()
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phase_follows_the_process() {
        let mut observed = Observed::new("main", "app:1", Ipv4Addr::LOCALHOST);
        assert_eq!(observed.phase(), "Pending");
        observed.state = State::Running {
            since: Timestamp::now(),
        };
        observed.pod_ip = Some(Ipv4Addr::new(127, 0, 0, 2));
        observed.set_ready(true);
        assert_eq!(observed.phase(), "Running");
        let status = observed.to_status();
        assert_eq!(status.pod_ip.as_deref(), Some("127.0.0.2"));
        let ready = status
            .conditions
            .iter()
            .flatten()
            .find(|c| c.type_ == "Ready")
            .map(|c| c.status.as_str());
        assert_eq!(ready, Some("True"));
        let terminated = State::Terminated {
            exit_code: 1,
            signal: None,
            reason: "Error".into(),
            started: Timestamp::now(),
            finished: Timestamp::now(),
        };
        observed.last_state = Some(terminated.clone());
        observed.restarts = 1;
        observed.state = State::Waiting {
            reason: "CrashLoopBackOff".into(),
            message: String::new(),
        };
        assert_eq!(observed.phase(), "Running", "restarting keeps the phase");
        observed.state = terminated;
        observed.finished = true;
        assert_eq!(observed.phase(), "Failed");
    }
}
