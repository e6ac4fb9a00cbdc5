//! The cluster's shape as `CLUSTER SLOTS` reports it: which nodes are masters, the slots each
//! serves, their replicas; whether every slot is covered. Read by the tier's upkeep (health per
//! node, the masters the backplane's heartbeats go through) and by `authz-cache init`.

use redis::Value;

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
    /// Parses a `CLUSTER SLOTS` reply: `[[start, end, [host, port, id, ..], replicas ..], ..]`.
    /// `None` when it has another shape.
    pub(crate) fn parse(reply: &Value) -> Option<Topology> {
        let Value::Array(ranges) = reply else { return None };
        let mut topology = Topology::default();
        for range in ranges {
            let Value::Array(parts) = range else { return None };
            let (start, end) = (int(parts.first()?)?, int(parts.get(1)?)?);
            if end < start || end >= i64::from(SLOTS) || start < 0 {
                return None;
            }
            let width = u32::try_from(end - start + 1).ok()?;
            topology.covered += width;
            let master = node(parts.get(2)?)?;
            let master_id = master.0.clone();
            topology.add(master, width, None);
            for replica in &parts[3..] {
                topology.add(node(replica)?, 0, Some(master_id.clone()));
            }
        }
        topology
            .nodes
            .sort_by(|a, b| (a.replica_of.is_some(), &a.host, a.port).cmp(&(b.replica_of.is_some(), &b.host, b.port)));
        Some(topology)
    }

    fn add(&mut self, (id, host, port): (String, String, u16), slots: u32, replica_of: Option<String>) {
        match self.nodes.iter_mut().find(|n| n.id == id) {
            Some(n) => n.slots += slots,
            None => self.nodes.push(Node { id, host, port, slots, replica_of }),
        }
    }

    pub(crate) fn masters(&self) -> impl Iterator<Item = &Node> {
        self.nodes.iter().filter(|n| n.is_master())
    }

    /// Whether every slot has a master.
    pub(crate) fn complete(&self) -> bool {
        self.covered == SLOTS
    }

    /// The fewest replicas any master has.
    pub(crate) fn fewest_replicas(&self) -> usize {
        self.masters()
            .map(|m| self.nodes.iter().filter(|n| n.replica_of.as_deref() == Some(m.id.as_str())).count())
            .min()
            .unwrap_or(0)
    }
}

fn int(v: &Value) -> Option<i64> {
    match v {
        Value::Int(i) => Some(*i),
        _ => None,
    }
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    }
}

fn node(v: &Value) -> Option<(String, String, u16)> {
    let Value::Array(parts) = v else { return None };
    let host = text(parts.first()?)?;
    let port = u16::try_from(int(parts.get(1)?)?).ok()?;
    let id = parts.get(2).and_then(text).unwrap_or_else(|| format!("{host}:{port}"));
    Some((id, host, port))
}

/// Whether a `CLUSTER INFO` reply says `cluster_state:ok`.
pub(crate) fn state_ok(info: &str) -> bool {
    info.lines().any(|l| l.trim() == "cluster_state:ok")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(host: &str, port: i64, id: &str) -> Value {
        Value::Array(vec![Value::BulkString(host.into()), Value::Int(port), Value::BulkString(id.into())])
    }

    #[test]
    fn parses_masters_replicas_and_coverage() {
        let reply = Value::Array(vec![
            Value::Array(vec![Value::Int(0), Value::Int(8191), n("127.0.0.1", 7000, "a"), n("127.0.0.1", 7003, "d")]),
            Value::Array(vec![Value::Int(8192), Value::Int(16383), n("127.0.0.1", 7001, "b")]),
        ]);
        let t = Topology::parse(&reply).unwrap();
        assert!(t.complete());
        assert_eq!(
            t.masters().map(|m| (m.address(), m.slots)).collect::<Vec<_>>(),
            [("127.0.0.1:7000".to_owned(), 8192), ("127.0.0.1:7001".to_owned(), 8192)]
        );
        assert_eq!(t.nodes[2].replica_of.as_deref(), Some("a"));
        assert_eq!(t.fewest_replicas(), 0);

        let partial = Value::Array(vec![Value::Array(vec![Value::Int(0), Value::Int(99), n("h", 1, "a")])]);
        assert!(!Topology::parse(&partial).unwrap().complete());
        // Garbage is no topology, not a panic.
        assert_eq!(Topology::parse(&Value::Int(3)), None);
        let bad = Value::Array(vec![Value::Array(vec![Value::Int(5), Value::Int(1), n("h", 1, "a")])]);
        assert_eq!(Topology::parse(&bad), None);
        assert!(state_ok("cluster_enabled:1\r\ncluster_state:ok\r\n") && !state_ok("cluster_state:fail"));
    }
}
