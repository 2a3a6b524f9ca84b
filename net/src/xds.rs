//! Delta xDS: the model as resources ([`resources`]) and ztunnel's client
//! ([`client`]), which keeps the model current from ambit-control.

pub mod client;
pub mod destination;
pub mod l7;
pub mod request_authn;
pub mod resources;
pub mod route;

pub use resources::{
    from_resources, policy_name, service_name, to_resources, waypoint_name, ResourceError,
};
