//! Leader election over a `coordination.k8s.io/v1` Lease, so that several replicas of
//! ambit-control can serve xDS and the CA at once while exactly one writes to the
//! cluster (status conditions, the published root ConfigMaps, waypoint objects, the
//! waypoint GatewayClass).
//!
//! The algorithm is client-go's `leaderelection` (the one kube-controller-manager and
//! istiod run), over optimistic concurrency: every write of the Lease is a replace
//! carrying the `resourceVersion` that was read, so of two replicas racing for it the
//! API server lets one through and answers the other 409. Expiry is judged by the local
//! monotonic clock from when this replica last *saw* the record change, never by
//! comparing `renewTime` with the local wall clock, so clock skew between nodes does
//! not matter. A leader that cannot renew within the renew deadline (shorter than the
//! lease) stops writing before anyone else may take over; on shutdown it releases the
//! Lease (empty holder) so a standby takes over at its next retry, not a lease later.
//! See docs/decisions/0015-leader-election-by-lease-replace.md.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{PostParams, PostParams as ReplaceParams};
use kube::{Api, Client};
use tokio::sync::watch;
use tokio::task::JoinSet;

/// How an election is run: client-go's defaults are 15 s, 10 s and 2 s.
#[derive(Debug, Clone)]
pub struct ElectionConfig {
    pub namespace: String,
    pub lease_name: String,
    pub identity: String,
    /// How long a holder's claim lasts after its last renewal, as others see it.
    pub lease_duration: Duration,
    /// How long a leader keeps leading while its renewals fail.
    pub renew_deadline: Duration,
    /// How often a standby tries to acquire and a leader renews.
    pub retry_period: Duration,
}

/// What this replica last read of the Lease, and when it saw it change.
#[derive(Debug, Clone)]
struct Observed {
    holder: String,
    renew_time: Option<MicroTime>,
    lease_duration: Duration,
    at: Instant,
}

/// One replica's side of the election.
#[derive(Debug)]
pub struct Elector {
    api: Api<Lease>,
    config: ElectionConfig,
    observed: Option<Observed>,
}

/// Why an attempt did not end with this replica holding the Lease.
#[derive(Debug)]
enum Attempt {
    Held,
    HeldByOther(String),
    Failed(kube::Error),
}

impl Elector {
    pub fn new(client: Client, config: ElectionConfig) -> Elector {
        Elector {
            api: Api::namespaced(client, &config.namespace),
            config,
            observed: None,
        }
    }

    /// Runs the election until `stop` resolves, publishing whether this replica leads
    /// on `leading`; then releases the Lease if it holds it.
    pub async fn run(
        mut self,
        leading: watch::Sender<bool>,
        stop: impl std::future::Future<Output = ()>,
    ) {
        tokio::pin!(stop);
        let mut last_renewal: Option<Instant> = None;
        loop {
            match self.try_acquire_or_renew().await {
                Attempt::Held => {
                    if last_renewal.is_none() {
                        tracing::info!(lease = %self.lease(), identity = %self.config.identity, "leading: this replica writes to the cluster");
                    }
                    last_renewal = Some(Instant::now());
                    leading.send_if_modified(|l| !std::mem::replace(l, true));
                }
                Attempt::HeldByOther(holder) => {
                    if last_renewal.take().is_some() {
                        tracing::warn!(lease = %self.lease(), %holder, "another replica holds the lease: no longer leading");
                    }
                    leading.send_if_modified(|l| std::mem::replace(l, false));
                }
                Attempt::Failed(e) => match last_renewal {
                    Some(at) if at.elapsed() >= self.config.renew_deadline => {
                        tracing::warn!(lease = %self.lease(), error = %e, deadline = ?self.config.renew_deadline, "the lease could not be renewed in time: no longer leading");
                        last_renewal = None;
                        leading.send_if_modified(|l| std::mem::replace(l, false));
                    }
                    Some(_) => {
                        tracing::warn!(lease = %self.lease(), error = %e, "cannot renew the lease; retrying")
                    }
                    None => {
                        tracing::warn!(lease = %self.lease(), error = %e, "cannot read or take the lease; retrying")
                    }
                },
            }
            tokio::select! {
                _ = &mut stop => break,
                _ = tokio::time::sleep(jittered(self.config.retry_period)) => {}
            }
        }
        if last_renewal.is_some() {
            leading.send_replace(false);
            match self.release().await {
                Ok(()) => tracing::info!(lease = %self.lease(), "lease released"),
                Err(e) => {
                    tracing::warn!(lease = %self.lease(), error = %e, "cannot release the lease; another replica takes it when it expires")
                }
            }
        }
    }

    fn lease(&self) -> String {
        format!("{}/{}", self.config.namespace, self.config.lease_name)
    }

    fn spec(&self, previous: Option<&LeaseSpec>) -> LeaseSpec {
        let now = MicroTime(k8s_openapi::jiff::Timestamp::now());
        let ours = previous
            .filter(|p| p.holder_identity.as_deref() == Some(self.config.identity.as_str()));
        let transitions = previous.and_then(|p| p.lease_transitions).unwrap_or(0);
        LeaseSpec {
            holder_identity: Some(self.config.identity.clone()),
            lease_duration_seconds: Some(duration_seconds(self.config.lease_duration)),
            acquire_time: match ours {
                Some(p) => p.acquire_time.clone(),
                None => Some(now.clone()),
            },
            renew_time: Some(now),
            lease_transitions: Some(match (ours, previous) {
                (Some(_), _) | (None, None) => transitions,
                (None, Some(_)) => transitions + 1,
            }),
            ..LeaseSpec::default()
        }
    }

    async fn try_acquire_or_renew(&mut self) -> Attempt {
        let name = self.config.lease_name.clone();
        let existing = match self.api.get_opt(&name).await {
            Ok(e) => e,
            Err(e) => return Attempt::Failed(e),
        };
        let Some(mut lease) = existing else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(name),
                    namespace: Some(self.config.namespace.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(self.spec(None)),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(made) => {
                    self.observe(made.spec.as_ref());
                    Attempt::Held
                }
                // Another replica made it first.
                Err(kube::Error::Api(s)) if s.code == 409 => Attempt::HeldByOther(String::new()),
                Err(e) => Attempt::Failed(e),
            };
        };
        self.observe(lease.spec.as_ref());
        let observed = self.observed.clone();
        if let Some(o) =
            observed.filter(|o| !o.holder.is_empty() && o.holder != self.config.identity)
        {
            if o.at.elapsed() < o.lease_duration {
                return Attempt::HeldByOther(o.holder);
            }
            tracing::info!(lease = %self.lease(), holder = %o.holder, "the holder let the lease expire; taking it");
        }
        lease.spec = Some(self.spec(lease.spec.as_ref()));
        // The resourceVersion read above travels with the replace: a concurrent write
        // since makes it a 409.
        match self
            .api
            .replace(&self.config.lease_name, &ReplaceParams::default(), &lease)
            .await
        {
            Ok(written) => {
                self.observe(written.spec.as_ref());
                Attempt::Held
            }
            Err(kube::Error::Api(s)) if s.code == 409 => Attempt::HeldByOther(String::new()),
            Err(e) => Attempt::Failed(e),
        }
    }

    /// Notes the record read, restarting the expiry clock when it changed.
    fn observe(&mut self, spec: Option<&LeaseSpec>) {
        let holder = spec
            .and_then(|s| s.holder_identity.clone())
            .unwrap_or_default();
        let renew_time = spec.and_then(|s| s.renew_time.clone());
        let lease_duration = spec
            .and_then(|s| s.lease_duration_seconds)
            .and_then(|s| u64::try_from(s).ok())
            .map(Duration::from_secs)
            .unwrap_or(self.config.lease_duration);
        let changed = self
            .observed
            .as_ref()
            .is_none_or(|o| o.holder != holder || o.renew_time != renew_time);
        if changed {
            self.observed = Some(Observed {
                holder,
                renew_time,
                lease_duration,
                at: Instant::now(),
            });
        }
    }

    /// Gives the Lease up: no holder, so a standby takes it at its next attempt.
    async fn release(&mut self) -> Result<(), kube::Error> {
        let Some(mut lease) = self.api.get_opt(&self.config.lease_name).await? else {
            return Ok(());
        };
        let Some(spec) = lease.spec.as_mut() else {
            return Ok(());
        };
        if spec.holder_identity.as_deref() != Some(self.config.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(MicroTime(k8s_openapi::jiff::Timestamp::now()));
        self.api
            .replace(&self.config.lease_name, &ReplaceParams::default(), &lease)
            .await
            .map(|_| ())
    }
}

fn duration_seconds(d: Duration) -> i32 {
    i32::try_from(d.as_secs().max(1)).unwrap_or(i32::MAX)
}

/// `period` plus up to 20% (client-go's jitter factor 1.2), so replicas that started
/// together do not keep colliding.
fn jittered(period: Duration) -> Duration {
    let mut byte = [0u8; 1];
    let extra = match aws_lc_rs::rand::fill(&mut byte) {
        Ok(()) => period.mul_f64(0.2 * f64::from(byte[0]) / 255.0),
        Err(_) => Duration::ZERO,
    };
    period + extra
}

/// Runs `start`'s tasks while `leading` says so: started afresh (new writers, no
/// memory of what an earlier term wrote, so everything is written again) each time
/// this replica becomes the leader, aborted the moment it is no longer.
pub async fn while_leading(
    mut leading: watch::Receiver<bool>,
    mut start: impl FnMut() -> JoinSet<()>,
) {
    loop {
        if leading.wait_for(|l| *l).await.is_err() {
            return;
        }
        let mut tasks = start();
        let lost = leading.wait_for(|l| !*l).await.is_err();
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
        if lost {
            return;
        }
    }
}

/// This replica's identity in the election when none is given: the host's name (a
/// pod's name in a cluster) and a random suffix, so two processes never share one.
pub fn default_identity() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "ambit-control".to_owned());
    let mut suffix = [0u8; 4];
    let _ = aws_lc_rs::rand::fill(&mut suffix);
    let hex: String = suffix.iter().map(|b| format!("{b:02x}")).collect();
    format!("{host}_{hex}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_within_a_fifth_of_the_period() {
        for _ in 0..100 {
            let d = jittered(Duration::from_secs(2));
            assert!(
                d >= Duration::from_secs(2) && d <= Duration::from_millis(2400),
                "{d:?}"
            );
        }
    }

    #[test]
    fn identities_differ_between_processes_on_one_host() {
        assert_ne!(default_identity(), default_identity());
    }
}
