//! Read-side queries over stored state: profile lookup and link explanations.

use std::collections::HashMap;

use idgraph_model::{Identifier, LinkRule};
use petgraph::graph::{NodeIndex, UnGraph};
use serde::Serialize;

use crate::state::{
    decode, decode_customer, CustomerEntry, Evidence, EvidenceLink, NodeRecord, ProfileState,
};
use crate::store::{StateRead, StoreError, Table};
use crate::Normalizer;

/// Reads a customer id's entry, following merge redirects to the live profile.
pub fn profile_by_id<S: StateRead>(
    store: &S,
    customer_id: &str,
) -> Result<Option<ProfileState>, StoreError> {
    let mut current = customer_id.to_owned();
    for _ in 0..64 {
        let Some(bytes) = store.get(Table::Customers, current.as_bytes())? else {
            return Ok(None);
        };
        match decode_customer(current.as_bytes(), &bytes)? {
            CustomerEntry::Live(state) => return Ok(Some(*state)),
            CustomerEntry::Redirect { to } => current = to,
        }
    }
    Ok(None)
}

/// The customer id that holds an identifier, given its raw value (normalized here).
pub fn customer_for_identifier<S: StateRead>(
    store: &S,
    normalizer: &Normalizer,
    kind: &str,
    raw_value: &str,
) -> Result<Option<String>, StoreError> {
    let Ok(value) = normalizer.identifier_value(kind, raw_value, None) else {
        return Ok(None);
    };
    let mut key = Identifier::new(kind, value).node_key();
    for _ in 0..1_000_000 {
        let Some(bytes) = store.get(Table::Nodes, key.as_bytes())? else {
            return Ok(None);
        };
        let node: NodeRecord = decode(Table::Nodes, key.as_bytes(), &bytes)?;
        match (node.parent, node.root) {
            (Some(parent), _) => key = parent,
            (None, Some(root)) => return Ok(Some(root.customer_id)),
            (None, None) => return Ok(None),
        }
    }
    Ok(None)
}

/// Why the members of a profile are in it.
#[derive(Debug, Clone, Serialize)]
pub struct Explanation {
    pub customer_id: String,
    pub absorbed_ids: Vec<String>,
    /// Every stored link, oldest first, per id it was recorded under.
    pub evidence: Vec<(String, Evidence)>,
    /// For each member, the chain of links from the profile's anchor to it.
    pub paths: Vec<MemberPath>,
}

#[derive(Debug, Clone, Serialize)]
pub struct MemberPath {
    pub member: String,
    /// Steps from the anchor: each names the next member and the event and rule that linked it.
    pub steps: Vec<PathStep>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PathStep {
    pub to: String,
    pub event_id: String,
    pub rule: String,
}

/// Builds the explanation of a profile from its evidence and that of the ids it absorbed.
pub fn explain<S: StateRead>(
    store: &S,
    customer_id: &str,
) -> Result<Option<Explanation>, StoreError> {
    let Some(state) = profile_by_id(store, customer_id)? else {
        return Ok(None);
    };
    let live_id = state.profile.customer_id.clone();
    let mut evidence = Vec::new();
    for id in std::iter::once(&live_id).chain(&state.profile.absorbed_ids) {
        let mut prefix = id.as_bytes().to_vec();
        prefix.push(0);
        for (key, bytes) in store.scan_prefix(Table::Evidence, &prefix)? {
            evidence.push((
                id.clone(),
                decode::<Evidence>(Table::Evidence, &key, crate::duplicates::untimed(&bytes))?,
            ));
        }
    }
    evidence.sort_by(|a, b| a.1.at.cmp(&b.1.at));
    let paths = member_paths(&live_id, &evidence);
    Ok(Some(Explanation {
        customer_id: live_id,
        absorbed_ids: state.profile.absorbed_ids.clone(),
        evidence,
        paths,
    }))
}

fn member_name(identifier: &Identifier) -> String {
    format!("{}:{}", identifier.kind, identifier.value)
}

fn profile_name(id: &str) -> String {
    format!("profile:{id}")
}

fn rule_name(rule: &LinkRule) -> String {
    match rule {
        LinkRule::Created => "created".into(),
        LinkRule::SharedIdentifier { kind, .. } => format!("shared {kind}"),
        LinkRule::Fuzzy { score, fields } => {
            // The levels that carried the link, so a path reads as the reason it is one.
            let levels: Vec<String> = fields
                .iter()
                .filter(|f| f.level != "missing")
                .map(|f| format!("{} {} {:+}", f.field, f.level, f.weight))
                .collect();
            format!("fuzzy score {score} ({})", levels.join(", "))
        }
        LinkRule::CoOccurrence => "seen on the same event".into(),
        LinkRule::SameEvent => "same event".into(),
    }
}

/// A graph whose nodes are identifiers and profile ids and whose edges are evidence; each
/// member's path is the shortest chain of evidence from the surviving profile.
fn member_paths(live_id: &str, evidence: &[(String, Evidence)]) -> Vec<MemberPath> {
    let mut graph: UnGraph<String, (String, String)> = UnGraph::new_undirected();
    let mut index: HashMap<String, NodeIndex> = HashMap::new();
    let mut node = |graph: &mut UnGraph<String, (String, String)>, name: String| {
        *index
            .entry(name.clone())
            .or_insert_with(|| graph.add_node(name))
    };
    let anchor = node(&mut graph, profile_name(live_id));
    for (owner, item) in evidence {
        let owner_node = node(&mut graph, profile_name(owner));
        let edge = |rule: &LinkRule| (item.event_id.to_string(), rule_name(rule));
        match &item.link {
            EvidenceLink::Created { identifiers } => {
                for identifier in identifiers {
                    let member = node(&mut graph, member_name(identifier));
                    graph.add_edge(owner_node, member, edge(&LinkRule::Created));
                }
            }
            EvidenceLink::IdentifierAdded {
                identifier,
                via,
                rule,
            } => {
                let member = node(&mut graph, member_name(identifier));
                let from = match via {
                    Some(via) => node(&mut graph, member_name(via)),
                    None => owner_node,
                };
                graph.add_edge(from, member, edge(rule));
            }
            EvidenceLink::Merged {
                absorbed,
                via,
                other,
                rule,
            } => {
                let absorbed_node = node(&mut graph, profile_name(absorbed));
                let from = via
                    .as_ref()
                    .map_or(owner_node, |v| node(&mut graph, member_name(v)));
                let to = other
                    .as_ref()
                    .map_or(absorbed_node, |o| node(&mut graph, member_name(o)));
                graph.add_edge(from, to, edge(rule));
                graph.add_edge(owner_node, absorbed_node, edge(rule));
            }
            EvidenceLink::EventLinked { .. } => {}
        }
    }
    let mut paths = Vec::new();
    for target in graph.node_indices() {
        if target == anchor || graph[target].starts_with("profile:") {
            continue;
        }
        let found = petgraph::algo::astar(&graph, anchor, |n| n == target, |_| 1u32, |_| 0);
        let Some((_, nodes)) = found else { continue };
        let steps = nodes
            .windows(2)
            .map(|pair| {
                let edge = graph
                    .find_edge(pair[0], pair[1])
                    .expect("consecutive path nodes share an edge");
                let (event_id, rule) = graph[edge].clone();
                PathStep {
                    to: graph[pair[1]].clone(),
                    event_id,
                    rule,
                }
            })
            .collect();
        paths.push(MemberPath {
            member: graph[target].clone(),
            steps,
        });
    }
    paths.sort_by(|a, b| a.member.cmp(&b.member));
    paths
}
