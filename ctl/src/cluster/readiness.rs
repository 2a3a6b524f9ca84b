//! Whether an object, as the API server returns it, is ready: what `install --wait`
//! waits for and `verify-install` checks. Pure functions of the object.
//!
//! - A CustomResourceDefinition: condition `Established` is `True`.
//! - A Deployment: its controller has seen the current spec (`observedGeneration` ≥
//!   `generation`), and every wanted replica is updated and available.
//! - A DaemonSet: seen likewise, and on every node it should run on
//!   (`desiredNumberScheduled`) the pod is updated and available.
//! - Anything else: ready once it exists.

use serde_json::Value;

/// `Ok` when ready, else what is still missing.
pub fn ready(object: &Value) -> Result<(), String> {
    match object["kind"].as_str() {
        Some("CustomResourceDefinition") => crd(object),
        Some("Deployment") => deployment(object),
        Some("DaemonSet") => daemon_set(object),
        _ => Ok(()),
    }
}

fn condition<'a>(object: &'a Value, kind: &str) -> Option<&'a Value> {
    object["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == kind)
}

fn crd(object: &Value) -> Result<(), String> {
    match condition(object, "Established") {
        Some(c) if c["status"] == "True" => Ok(()),
        Some(c) => Err(format!(
            "not established: {}",
            c["message"].as_str().unwrap_or("no message")
        )),
        None => Err("not established yet".to_owned()),
    }
}

fn number(object: &Value, pointer: &str) -> i64 {
    object.pointer(pointer).and_then(Value::as_i64).unwrap_or(0)
}

fn seen(object: &Value) -> Result<(), String> {
    let generation = number(object, "/metadata/generation");
    let observed = number(object, "/status/observedGeneration");
    if observed < generation {
        return Err(format!(
            "its controller has not seen the current spec yet (generation {generation}, observed {observed})"
        ));
    }
    Ok(())
}

fn deployment(object: &Value) -> Result<(), String> {
    seen(object)?;
    let wanted = object["spec"]["replicas"].as_i64().unwrap_or(1);
    let updated = number(object, "/status/updatedReplicas");
    let available = number(object, "/status/availableReplicas");
    let total = number(object, "/status/replicas");
    if updated < wanted || available < wanted || total > updated {
        return Err(format!(
            "{available} of {wanted} replicas available, {updated} updated, {total} in all"
        ));
    }
    Ok(())
}

fn daemon_set(object: &Value) -> Result<(), String> {
    seen(object)?;
    let desired = number(object, "/status/desiredNumberScheduled");
    let updated = number(object, "/status/updatedNumberScheduled");
    let available = number(object, "/status/numberAvailable");
    let ready = number(object, "/status/numberReady");
    if updated < desired || available < desired {
        return Err(format!(
            "{ready} of {desired} nodes' pods ready, {available} available, {updated} updated"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_crd_is_ready_when_established() {
        let mut crd = json!({"kind": "CustomResourceDefinition", "status": {}});
        assert!(ready(&crd).unwrap_err().contains("not established"));
        crd["status"]["conditions"] = json!([{"type": "Established", "status": "True"}]);
        assert_eq!(ready(&crd), Ok(()));
    }

    #[test]
    fn a_deployment_is_ready_when_every_replica_of_its_spec_is_available() {
        let mut d = json!({"kind": "Deployment", "metadata": {"generation": 2},
            "spec": {"replicas": 2},
            "status": {"observedGeneration": 1, "replicas": 2, "updatedReplicas": 2,
                       "availableReplicas": 2}});
        assert!(ready(&d).unwrap_err().contains("not seen"));
        d["status"]["observedGeneration"] = 2.into();
        assert_eq!(ready(&d), Ok(()));
        d["status"]["availableReplicas"] = 1.into();
        assert_eq!(
            ready(&d).unwrap_err(),
            "1 of 2 replicas available, 2 updated, 2 in all"
        );
    }

    #[test]
    fn a_daemon_set_is_ready_when_every_node_runs_the_updated_pod() {
        let mut ds = json!({"kind": "DaemonSet", "metadata": {"generation": 1},
            "status": {"observedGeneration": 1, "desiredNumberScheduled": 3,
                       "updatedNumberScheduled": 3, "numberAvailable": 2, "numberReady": 2}});
        assert_eq!(
            ready(&ds).unwrap_err(),
            "2 of 3 nodes' pods ready, 2 available, 3 updated"
        );
        ds["status"]["numberAvailable"] = 3.into();
        assert_eq!(ready(&ds), Ok(()));
    }
}
