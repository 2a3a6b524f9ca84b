//! The things a mesh is made of, as its users see them: namespaces, nodes, pods and
//! services, and the address plan they get.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::path::{Path, PathBuf};

use ambit_core::model::ServicePort;

/// The nodes' underlay subnet, on the fabric bridge. It exists only inside the mesh's
/// own namespaces, so every mesh uses the same plan without colliding.
pub const UNDERLAY: Ipv4Cidr = Ipv4Cidr::new(Ipv4Addr::new(172, 30, 0, 0), 24);
/// The fabric namespace's own address on the underlay, where mesh-wide services (the
/// CA, later the control plane) can listen for every node and pod.
pub const FABRIC_IP: Ipv4Addr = Ipv4Addr::new(172, 30, 0, 254);
/// The underlay's IPv6 subnet: node `k` is `fd00:a5b1::<k+1>`, the fabric `::fe`. The
/// mesh is dual-stack: every node and pod has an IPv6 address too.
pub const UNDERLAY6: Ipv6Cidr = Ipv6Cidr::new(Ipv6Addr::new(0xfd00, 0xa5b1, 0, 0, 0, 0, 0, 0), 64);
/// The fabric namespace's IPv6 address on the underlay.
pub const FABRIC_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xa5b1, 0, 0, 0, 0, 0, 0xfe);
/// Where service VIPs come from.
pub const SERVICE_CIDR: Ipv4Cidr = Ipv4Cidr::new(Ipv4Addr::new(10, 96, 0, 0), 16);
/// The first VIP handed out when a service does not ask for one.
pub(crate) const FIRST_AUTO_VIP: u32 = 10;
/// Node `k` gets pod CIDR `10.<k+1>.0.0/24`, which must stay clear of the service CIDR.
pub const MAX_NODES: usize = 90;

/// An IPv4 network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ipv4Cidr {
    pub addr: Ipv4Addr,
    pub prefix_len: u8,
}

impl Ipv4Cidr {
    pub const fn new(addr: Ipv4Addr, prefix_len: u8) -> Ipv4Cidr {
        Ipv4Cidr { addr, prefix_len }
    }

    /// The `n`th address of the network (`n = 1` is the first host).
    pub fn host(&self, n: u32) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr).wrapping_add(n))
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        let mask = u32::MAX
            .checked_shl(32 - u32::from(self.prefix_len))
            .unwrap_or(0);
        u32::from(ip) & mask == u32::from(self.addr) & mask
    }
}

impl fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

/// An IPv6 network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ipv6Cidr {
    pub addr: Ipv6Addr,
    pub prefix_len: u8,
}

impl Ipv6Cidr {
    pub const fn new(addr: Ipv6Addr, prefix_len: u8) -> Ipv6Cidr {
        Ipv6Cidr { addr, prefix_len }
    }

    /// The `n`th address of the network (`n = 1` is the first host).
    pub fn host(&self, n: u32) -> Ipv6Addr {
        Ipv6Addr::from(u128::from(self.addr).wrapping_add(u128::from(n)))
    }
}

impl fmt::Display for Ipv6Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

/// A network namespace of the mesh, by its name in `/run/netns`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Netns {
    name: String,
    path: PathBuf,
}

impl Netns {
    pub(crate) fn named(name: String) -> Netns {
        let path = Path::new("/run/netns").join(&name);
        Netns { name, path }
    }

    /// The name `ip netns` knows it by.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/<name>`, for `nsenter --net=` or `CNI_NETNS`.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// A node: a namespace joined to the fabric bridge, routing to the other nodes' pods.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub(crate) name: String,
    pub(crate) index: usize,
    pub(crate) ip: Ipv4Addr,
    pub(crate) pod_cidr: Ipv4Cidr,
    pub(crate) ip6: Ipv6Addr,
    pub(crate) pod_cidr6: Ipv6Cidr,
    pub(crate) netns: Netns,
}

impl Node {
    pub(crate) fn new(index: usize, name: String, netns: Netns) -> Node {
        let ip = UNDERLAY.host(index as u32 + 1);
        let pod_cidr = Ipv4Cidr::new(Ipv4Addr::new(10, index as u8 + 1, 0, 0), 24);
        let ip6 = UNDERLAY6.host(index as u32 + 1);
        // fd10:<k+1>::/64, the IPv6 twin of 10.<k+1>.0.0/24.
        let pod_cidr6 = Ipv6Cidr::new(
            Ipv6Addr::new(0xfd10, index as u16 + 1, 0, 0, 0, 0, 0, 0),
            64,
        );
        Node {
            name,
            index,
            ip,
            pod_cidr,
            ip6,
            pod_cidr6,
            netns,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its position in the builder's list.
    pub fn index(&self) -> usize {
        self.index
    }

    /// Its address on the underlay (interface `eth0`).
    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    pub fn pod_cidr(&self) -> Ipv4Cidr {
        self.pod_cidr
    }

    /// Its IPv6 address on the underlay.
    pub fn ip6(&self) -> Ipv6Addr {
        self.ip6
    }

    pub fn pod_cidr6(&self) -> Ipv6Cidr {
        self.pod_cidr6
    }

    pub fn netns(&self) -> &Netns {
        &self.netns
    }
}

/// What a pod is, before it exists.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodSpec {
    pub namespace: String,
    pub name: String,
    /// `default` when empty.
    pub service_account: String,
    pub labels: BTreeMap<String, String>,
}

impl PodSpec {
    pub fn new(namespace: &str, name: &str) -> PodSpec {
        PodSpec {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            ..PodSpec::default()
        }
    }

    pub fn service_account(mut self, sa: &str) -> PodSpec {
        self.service_account = sa.to_owned();
        self
    }

    pub fn label(mut self, key: &str, value: &str) -> PodSpec {
        self.labels.insert(key.to_owned(), value.to_owned());
        self
    }
}

/// A pod: its own network namespace, networked by the node's CNI chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pod {
    pub(crate) namespace: String,
    pub(crate) name: String,
    pub(crate) service_account: String,
    pub(crate) labels: BTreeMap<String, String>,
    pub(crate) node: String,
    pub(crate) ip: Ipv4Addr,
    pub(crate) ip6: Ipv6Addr,
    pub(crate) netns: Netns,
    pub(crate) container_id: String,
}

impl Pod {
    /// `<namespace>/<name>`, the workload uid in the model.
    pub fn uid(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn service_account(&self) -> &str {
        &self.service_account
    }

    pub fn labels(&self) -> &BTreeMap<String, String> {
        &self.labels
    }

    /// The node it runs on.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// The address the CNI chain gave it.
    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    /// `ip:port` on this pod.
    pub fn addr(&self, port: u16) -> SocketAddr {
        SocketAddrV4::new(self.ip, port).into()
    }

    /// The IPv6 address the CNI chain gave it.
    pub fn ip6(&self) -> Ipv6Addr {
        self.ip6
    }

    /// `[ip6]:port` on this pod.
    pub fn addr6(&self, port: u16) -> SocketAddr {
        SocketAddrV6::new(self.ip6, port, 0, 0).into()
    }

    pub fn netns(&self) -> &Netns {
        &self.netns
    }

    /// The sandbox id the CNI chain was invoked with (`CNI_CONTAINERID`).
    pub fn container_id(&self) -> &str {
        &self.container_id
    }
}

/// What a ClusterIP service is, before it exists.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServiceSpec {
    pub namespace: String,
    pub name: String,
    /// Taken from [`SERVICE_CIDR`] when `None`.
    pub vip: Option<Ipv4Addr>,
    pub ports: Vec<ServicePort>,
    /// Uids (`namespace/name`) of the endpoint pods. Pods that do not exist (yet) are
    /// left out of the rules until they do, as with a label selector.
    pub endpoints: Vec<String>,
}

impl ServiceSpec {
    pub fn new(namespace: &str, name: &str) -> ServiceSpec {
        ServiceSpec {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            ..ServiceSpec::default()
        }
    }

    pub fn vip(mut self, vip: Ipv4Addr) -> ServiceSpec {
        self.vip = Some(vip);
        self
    }

    /// Adds a port: `port` on the VIP goes to `target_port` on the endpoints.
    pub fn port(mut self, port: u16, target_port: u16) -> ServiceSpec {
        self.ports.push(ServicePort {
            port,
            target_port,
            app_protocol: None,
        });
        self
    }

    pub fn endpoints<'a>(mut self, pods: impl IntoIterator<Item = &'a Pod>) -> ServiceSpec {
        self.endpoints = pods.into_iter().map(Pod::uid).collect();
        self
    }
}

/// A ClusterIP service of the mesh.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    pub(crate) namespace: String,
    pub(crate) name: String,
    pub(crate) vip: Ipv4Addr,
    pub(crate) ports: Vec<ServicePort>,
}

impl Service {
    /// `<namespace>/<name>`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn vip(&self) -> Ipv4Addr {
        self.vip
    }

    /// `vip:port`.
    pub fn addr(&self, port: u16) -> SocketAddr {
        SocketAddrV4::new(self.vip, port).into()
    }

    pub fn ports(&self) -> &[ServicePort] {
        &self.ports
    }
}

/// Whether `name` is usable as a Kubernetes object name here (a DNS label: lowercase
/// letters, digits and `-`, at most 63, starting and ending alphanumeric).
pub(crate) fn is_dns_label(name: &str) -> bool {
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    !name.is_empty()
        && name.len() <= 63
        && name.bytes().all(|b| alnum(b) || b == b'-')
        && name.bytes().next().is_some_and(alnum)
        && name.bytes().last().is_some_and(alnum)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodes_get_their_address_plan_from_their_index() {
        let node = Node::new(1, "node-b".into(), Netns::named("x".into()));
        assert_eq!(node.ip(), Ipv4Addr::new(172, 30, 0, 2));
        assert_eq!(node.pod_cidr().to_string(), "10.2.0.0/24");
        assert_eq!(node.ip6().to_string(), "fd00:a5b1::2");
        assert_eq!(node.pod_cidr6().to_string(), "fd10:2::/64");
        assert_eq!(
            Node::new(89, "n".into(), Netns::named("x".into()))
                .pod_cidr6()
                .to_string(),
            "fd10:5a::/64"
        );
        let last = Node::new(MAX_NODES - 1, "n".into(), Netns::named("x".into()));
        assert!(!SERVICE_CIDR.contains(last.pod_cidr().addr));
        assert!(UNDERLAY.contains(FABRIC_IP));
    }

    #[test]
    fn cidr_contains() {
        assert!(SERVICE_CIDR.contains(Ipv4Addr::new(10, 96, 255, 1)));
        assert!(!SERVICE_CIDR.contains(Ipv4Addr::new(10, 97, 0, 1)));
        assert!(Ipv4Cidr::new(Ipv4Addr::UNSPECIFIED, 0).contains(Ipv4Addr::BROADCAST));
    }

    #[test]
    fn object_names_are_dns_labels() {
        for ok in ["a", "node-a", "cart-7d9f", "x1"] {
            assert!(is_dns_label(ok), "{ok}");
        }
        for bad in ["", "-a", "a-", "A", "a_b", "a.b", &"a".repeat(64)] {
            assert!(!is_dns_label(bad), "{bad}");
        }
    }
}
