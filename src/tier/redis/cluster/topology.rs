//! The cluster's shape as `CLUSTER NODES` reports it: which nodes are masters, the slots each
//! serves, their replicas; whether every slot is covered. Read by the tier's upkeep (health per
//! node, the masters the backplane's heartbeats go through) and by `authz-cache init`.

/// The number of hash slots of a Redis Cluster.
pub(crate) const SLOTS: u32 = 16_384;

/// One node of the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Node {
    pub(crate) id: String,
    pub(crate) host: String,
    pub(crate) port: u16,
    /// Slots it serves as a master (0 for a replica).
    pub(crate) slots: u32,
    /// The id of its master, for a replica.
    pub(crate) replica_of: Option<String>,
    /// The cluster marked it failed.
    pub(crate) failed: bool,
}

impl Node {
    pub(crate) fn address(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    pub(crate) fn is_master(&self) -> bool {
        self.replica_of.is_none()
    }
}

/// The nodes and how many slots have a master.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Topology {
    pub(crate) nodes: Vec<Node>,
    pub(crate) covered: u32,
}

impl Topology {
    /// Parses a `CLUSTER NODES` reply (one line per node: `id host:port@bus[,hostname] flags
    /// master-id ping pong epoch link slot..`). `CLUSTER SLOTS` is not used: it leaves out
    /// replicas whose replication offset is not known yet. Failed masters serve no slots here.
    /// `None` when a line has another shape.
    pub(crate) fn parse(reply: &str) -> Option<Topology> {
        let mut topology = Topology::default();
        for line in reply.lines().map(str::trim).filter(|l| !l.is_empty()) {
            let f: Vec<&str> = line.split(' ').collect();
            if f.len() < 8 {
                return None;
            }
            let address = f[1].split('@').next()?;
            let (host, port) = address.rsplit_once(':')?;
            let port: u16 = port.parse().ok()?;
            let flags = f[2];
            let failed = flags.contains("fail") && !flags.contains("fail?");
            let replica_of = flags.contains("slave").then(|| f[3].to_owned());
            let mut slots = 0u32;
            if replica_of.is_none() && !failed {
                for range in &f[8..] {
                    if range.starts_with('[') {
                        continue; // a slot being migrated
                    }
                    let (a, b) = range.split_once('-').unwrap_or((range, range));
                    let (a, b): (u32, u32) = (a.parse().ok()?, b.parse().ok()?);
                    if b < a || b >= SLOTS {
                        return None;
                    }
                    slots += b - a + 1;
                }
            }
            topology.covered += slots;
            topology.nodes.push(Node { id: f[0].to_owned(), host: host.to_owned(), port, slots, replica_of, failed });
        }
        topology
            .nodes
            .sort_by(|a, b| (a.replica_of.is_some(), &a.host, a.port).cmp(&(b.replica_of.is_some(), &b.host, b.port)));
        Some(topology)
    }

    /// The masters serving slots (not failed ones).
    pub(crate) fn masters(&self) -> impl Iterator<Item = &Node> {
        self.nodes.iter().filter(|n| n.is_master() && n.slots > 0)
    }

    /// Whether every slot has a master.
    pub(crate) fn complete(&self) -> bool {
        self.covered == SLOTS
    }

    /// The fewest live replicas any master has.
    pub(crate) fn fewest_replicas(&self) -> usize {
        self.masters()
            .map(|m| self.nodes.iter().filter(|n| !n.failed && n.replica_of.as_deref() == Some(m.id.as_str())).count())
            .min()
            .unwrap_or(0)
    }
}

/// Whether a `CLUSTER INFO` reply says `cluster_state:ok`.
pub(crate) fn state_ok(info: &str) -> bool {
    info.lines().any(|l| l.trim() == "cluster_state:ok")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_masters_replicas_and_coverage() {
        let reply = "\
a 127.0.0.1:7000@17000 myself,master - 0 0 1 connected 0-8190 8191
b 127.0.0.1:7001@17001,host master - 0 0 2 connected 8192-16383 [93->-c]
d 127.0.0.1:7003@17003 slave a 0 0 1 connected
";
        let t = Topology::parse(reply).unwrap();
        assert!(t.complete());
        assert_eq!(
            t.masters().map(|m| (m.address(), m.slots)).collect::<Vec<_>>(),
            [("127.0.0.1:7000".to_owned(), 8192), ("127.0.0.1:7001".to_owned(), 8192)]
        );
        assert_eq!(t.nodes[2].replica_of.as_deref(), Some("a"));
        assert_eq!(t.fewest_replicas(), 0);

        // A failed master serves nothing: its slots are uncovered, heartbeats skip it.
        let failed = "a h:1@2 master,fail - 0 0 1 connected 0-99\nb h:2@3 myself,master - 0 0 1 connected 100-16383\n";
        let t = Topology::parse(failed).unwrap();
        assert!(!t.complete());
        assert_eq!(t.masters().count(), 1);
        // Garbage is no topology, not a panic.
        assert_eq!(Topology::parse("nonsense"), None);
        assert_eq!(Topology::parse("a h:1@2 master - 0 0 1 connected 5-1"), None);
        assert!(state_ok("cluster_enabled:1\r\ncluster_state:ok\r\n") && !state_ok("cluster_state:fail"));
    }
}
